"""A single-device strategy that leaves the model where it is.

Lightning's stock strategy moves the module to the device at setup and back to the CPU at teardown. For
inference benchmarks that is wrong twice over: an 8B model would cross PCIe twice per phase, and a model whose
weights live elsewhere on purpose (accelerate's cpu_offload keeps them as meta tensors plus hooks) cannot be
moved at all. The model is placed once, by the loader.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy


class StayOnDevice(SingleDeviceStrategy):
    def model_to_device(self) -> None:
        pass  # the loader already put the model on its device

    def teardown(self) -> None:
        self.precision_plugin.teardown()
        if self.accelerator is not None:
            self.accelerator.teardown()
        self.checkpoint_io.teardown()


def stay_on(device: torch.device) -> StayOnDevice:
    return StayOnDevice(device=device)
