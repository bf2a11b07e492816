"""Codecs: importing this package registers the built-in ones."""

from harness.codecs import nvcomp, zstd  # noqa: F401,E402  (register zstd, zstd_grouped, nvcomp_ans)
from harness.codecs.base import CODECS, Codec, CompressedTensor, checksum, make_codec

__all__ = ["CODECS", "Codec", "CompressedTensor", "checksum", "make_codec"]
