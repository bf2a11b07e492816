"""Runtime: compressed linear layers served through a cache policy (and embedding lookups), with exact counters."""

from harness.runtime import block, captured, fused, policies  # noqa: F401  (register the cache policies)
from harness.runtime.compress import CompressedRuntime, CompressionReport, compress_model
from harness.runtime.embedding import CompressedEmbedding
from harness.runtime.layer import CompressedLinear
from harness.runtime.policy import CAPTURED_POLICIES, POLICIES, CachePolicy, make_policy
from harness.runtime.stats import Stats

__all__ = [
    "CAPTURED_POLICIES",
    "POLICIES",
    "CachePolicy",
    "CompressedEmbedding",
    "CompressedLinear",
    "CompressedRuntime",
    "CompressionReport",
    "Stats",
    "compress_model",
    "make_policy",
]
