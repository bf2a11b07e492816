"""Fused lossless decode + matmul (issue 12): the exp3 format (format.py) and its Triton kernels (kernel.py).

kernel.py needs triton; format.py is plain torch, so `from harness.fused import encode, decode` works anywhere.
"""

from harness.fused.format import Packed, decode, encode

__all__ = ["Packed", "decode", "encode"]
