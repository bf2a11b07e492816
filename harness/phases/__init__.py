"""Measured phases under Lightning: the generation module, the phase callbacks, the phase loop and the paired rounds."""
