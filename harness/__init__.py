"""codecllm harness: LLM inference with losslessly compressed weights, measured against the baseline."""

__version__ = "0.1.0"
