"""Codecs: importing this package registers the built-in ones."""

from harness.codecs import zstd  # noqa: F401,E402  (registers "zstd" and "zstd_grouped")
from harness.codecs.base import CODECS, Codec, CompressedTensor, checksum, make_codec

__all__ = ["CODECS", "Codec", "CompressedTensor", "checksum", "make_codec"]
