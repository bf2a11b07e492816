"""harness/fused/launch.py on the CPU: the ctypes mirrors of cuda.h's launch structs, and what a Launch holds.

cuLaunchKernelEx reads CUlaunchConfig and CUlaunchAttribute by layout: a field out of place would pass a wrong grid
or attribute to the driver. The offsets below are cuda.h's (CUDA 12.x/13.x) on a 64-bit host.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

from harness.fused.launch import PROGRAMMATIC_STREAM_SERIALIZATION, Launch, LaunchAttribute, LaunchConfig


def test_launch_structs_match_cuda_h():
    assert ctypes.sizeof(LaunchAttribute) == 72  # id (4) + pad to 8 + a 64-byte value union
    assert LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(LaunchConfig) == 56
    offsets = {name: getattr(LaunchConfig, name).offset for name in ("shared_mem", "stream", "attrs", "num_attrs")}
    assert offsets == {"shared_mem": 24, "stream": 32, "attrs": 40, "num_attrs": 48}


def test_a_pdl_launch_carries_the_attribute_and_a_plain_one_none():
    kernel = SimpleNamespace(func=None)  # the driver's function handle; nothing is launched here
    plain = Launch(kernel, (7, 1, 1), (256, 1, 1), 1024, [3])
    assert plain._config is None
    pdl = Launch(kernel, (7, 2, 1), (256, 1, 1), 1024, [3], pdl=True)
    c = pdl._config
    assert (c.grid_x, c.grid_y, c.grid_z, c.block_x, c.block_y, c.block_z, c.shared_mem) == (7, 2, 1, 256, 1, 1, 1024)
    assert c.num_attrs == 1
    assert (c.attrs[0].id, c.attrs[0].value) == (PROGRAMMATIC_STREAM_SERIALIZATION, 1) == (6, 1)
