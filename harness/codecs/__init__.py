"""Codecs: importing this package registers the built-in ones."""

from harness.codecs import dfloat11, fused_lut3, nvcomp, nvcomp_batched, zipnn_codec, zstd  # noqa: F401,E402  (register the built-in codecs)
from harness.codecs.base import CODECS, Codec, CompressedTensor, checksum, make_codec

__all__ = ["CODECS", "Codec", "CompressedTensor", "checksum", "make_codec"]
