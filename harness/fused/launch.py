"""Kernel launches that cost the host a few microseconds: the driver's cuLaunchKernel through ctypes, with the
argument array built once per call site.

torch's launcher for NVRTC kernels (`torch.cuda._utils._CudaKernel.__call__`) opens libcuda again and builds a
ctypes argument array on every call: tens of microseconds for the lut3 kernels' 15-19 arguments. Inside a CUDA
graph that cost is paid once, at capture; in an eager prefill it is paid per layer, which made the 8B fused
prefill host-bound (docs/fused.md). A `Launch` holds the kernel's arguments as ctypes cells; per call only the
cells marked PTR or INT are rewritten. The argument layout is torch's: a tensor or PTR is a `void*`, an int a C
`int`.
"""

from __future__ import annotations

import ctypes

import torch

PTR, INT = object(), object()  # argument slots set per call: a tensor's address, a C int
_driver = None
_driver_ex = None
# cuLaunchKernelEx's attribute that lets a launch overlap the kernel before it on the stream (programmatic dependent
# launch, compute capability 9.0+); the kernel itself waits for that kernel's results (lut3_kernel.cu: pdl_wait)
PROGRAMMATIC_STREAM_SERIALIZATION = 6


class LaunchAttribute(ctypes.Structure):
    """cuda.h's CUlaunchAttribute: an id, padding to 8 bytes, a 64-byte value union (its first int used here)."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class LaunchConfig(ctypes.Structure):
    """cuda.h's CUlaunchConfig."""

    _fields_ = [
        *[(f, ctypes.c_uint) for f in ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")],
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(LaunchAttribute)),
        ("num_attrs", ctypes.c_uint),
    ]


def _current_stream() -> int:
    """The current CUDA stream's handle. torch.cuda.current_stream() builds a Stream object (~10 us); Inductor's
    generated code reads the raw handle as here, where the build has it."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(torch._C._cuda_getDevice()) if raw is not None else torch.cuda.current_stream().cuda_stream


def _cu_launch_kernel():
    global _driver
    if _driver is None:
        fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernel
        fn.argtypes = [ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                       ctypes.c_void_p]  # fmt: skip
        fn.restype = ctypes.c_int
        _driver = fn
    return _driver


def _cu_launch_kernel_ex():
    global _driver_ex
    if _driver_ex is None:
        fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
        fn.argtypes = [ctypes.POINTER(LaunchConfig), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        fn.restype = ctypes.c_int
        _driver_ex = fn
    return _driver_ex


class Launch:
    """One kernel at one grid, block and shared-memory size, with its arguments. `args`: ints (C ints), tensors
    and `ctypes.c_void_p` (fixed addresses), or PTR / INT, whose values `__call__` takes in order. `pdl`: launch
    with programmatic dependent launch (cuLaunchKernelEx), only for a kernel that waits for its inputs itself."""

    def __init__(self, kernel, grid: tuple[int, int, int], block: tuple[int, int, int], shared_mem: int,
                 args: list, pdl: bool = False) -> None:  # fmt: skip
        self._func = kernel.func
        self._dims = (*grid, *block, shared_mem)
        self._config = None
        if pdl:
            self._attr = LaunchAttribute(id=PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
            self._config = LaunchConfig(*grid, *block, shared_mem, None, ctypes.pointer(self._attr), 1)
        self._cells, self._vary = [], []  # the cells keep the values the array points at alive
        for a in args:
            if a is PTR or a is INT:
                cell = ctypes.c_void_p(0) if a is PTR else ctypes.c_int(0)
                self._vary.append(cell)
            elif isinstance(a, torch.Tensor):
                cell = ctypes.c_void_p(a.data_ptr())
            elif isinstance(a, ctypes.c_void_p):
                cell = ctypes.c_void_p(a.value)
            elif isinstance(a, int):
                cell = ctypes.c_int(a)
            else:
                raise TypeError(f"kernel argument of unsupported type {type(a).__name__}")
            self._cells.append(cell)
        self._argv = (ctypes.c_void_p * len(self._cells))(*(ctypes.addressof(c) for c in self._cells))

    def __call__(self, *values) -> None:
        """Launch on the current stream (recorded, like any launch, when the stream is capturing a CUDA graph)."""
        for cell, v in zip(self._vary, values, strict=True):
            cell.value = v.data_ptr() if isinstance(v, torch.Tensor) else v
        if self._config is None:
            rc = _cu_launch_kernel()(self._func, *self._dims, _current_stream(), self._argv, None)
        else:
            self._config.stream = _current_stream()
            rc = _cu_launch_kernel_ex()(ctypes.byref(self._config), self._func, self._argv, None)
        if rc:
            from torch.cuda._utils import _check_cuda

            _check_cuda(rc)  # raises with the driver's message
