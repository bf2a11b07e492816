"""Compile the fused kernels with NVRTC on a machine with no GPU, and print each kernel's registers and spills.

A kernel edit otherwise meets its compiler only on a lent GPU. This runs the same compiler the harness uses
(torch's loader calls NVRTC) with torch's own NVRTC flags, for a named architecture, and checks that every kernel
`lut3_cuda` launches is in the binary:

    pip download --no-deps -d /tmp/nvrtc "nvidia-cuda-nvrtc==13.0.*" && unzip -q /tmp/nvrtc/*.whl -d /tmp/nvrtc
    python bench/kernel_build.py --lib /tmp/nvrtc/nvidia/cu13/lib --out kernel_build.json

Register counts are ptxas's (the same as the driver reports on the H200 for the builds timed so far: docs/fused.md).
Exit 1 when the source does not compile or a kernel is missing.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.fused import lut3_cuda  # noqa: E402

_PTXAS = re.compile(
    r"Compiling entry function '(\w+)'.*?(\d+) bytes stack frame, (\d+) bytes spill stores.*?Used (\d+) registers",
    re.S,
)


def load_nvrtc(lib_dir: str | None) -> ctypes.CDLL:
    """libnvrtc from `lib_dir`, or wherever the loader finds it. Its builtins library is loaded first by path:
    NVRTC opens it by name, and a library already loaded under that name is the one it gets."""
    if lib_dir is None:
        try:  # a CUDA torch from PyPI brings it as the nvidia-cuda-nvrtc wheel
            import nvidia.cu13

            lib_dir = str(Path(nvidia.cu13.__path__[0]) / "lib")
        except ImportError:
            return ctypes.CDLL("libnvrtc.so.13")
    d = Path(lib_dir)
    for builtins in sorted(d.glob("libnvrtc-builtins.so.*")):
        if ".alt." not in builtins.name:
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(str(d / "libnvrtc.so.13"))


def compile_source(nvrtc: ctypes.CDLL, source: str, arch: str, includes: list[str]) -> tuple[int, str]:
    """(NVRTC's result code, its log with ptxas's verbose report)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    prog = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"lut3_kernel.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture=sm_{arch}", "--ptxas-options=--verbose", *(f"-I{i}" for i in includes)]
    opts += [f for f in COMMON_NVCC_FLAGS if f != "--expt-relaxed-constexpr"]  # as torch's _nvrtc_compile
    arr = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace")


def resources(log: str) -> dict[str, dict[str, int]]:
    """kernel -> registers, stack and spill bytes, from ptxas's verbose report."""
    return {
        m[1]: {"registers": int(m[4]), "stack_bytes": int(m[2]), "spill_bytes": int(m[3])} for m in _PTXAS.finditer(log)
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", help="folder holding libnvrtc.so.13 (default: the loader's search path)")
    ap.add_argument("--arch", default="90", help="compute capability, e.g. 90 (H100/H200)")
    ap.add_argument("--include", action="append", default=[], help="CUDA headers, if the source needs any")
    ap.add_argument("--out", help="write the table as JSON here")
    args = ap.parse_args()
    rc, log = compile_source(load_nvrtc(args.lib), lut3_cuda._SOURCE.read_text(), args.arch, args.include)
    if rc:
        print(f"error: NVRTC could not compile {lut3_cuda._SOURCE.name} (code {rc}):\n{log}", file=sys.stderr)
        return 1
    table = resources(log)
    missing = [n for n in lut3_cuda._NAMES if n not in table]
    print(f"{'kernel':22} {'registers':>9} {'stack B':>8} {'spill B':>8}")
    for name in sorted(table):
        r = table[name]
        print(f"{name:22} {r['registers']:9d} {r['stack_bytes']:8d} {r['spill_bytes']:8d}")
    if args.out:
        Path(args.out).write_text(json.dumps({"arch": args.arch, "kernels": table, "missing": missing}, indent=1))
    if missing:
        print(f"error: kernels lut3_cuda launches but the binary lacks: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
