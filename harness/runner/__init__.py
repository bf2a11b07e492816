"""Lightning runner: the generation module, the phase callbacks and the phase loop."""
