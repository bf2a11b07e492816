"""Converted models (model.converted_dir): a conversion (GGUF -> safetensors) is built once, keyed by its source, and
installed atomically so that readers never see a half-written one and concurrent jobs never corrupt it."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

log = logging.getLogger(__name__)

CACHE_KEY_FILE = "codecllm_source.json"  # written last into a conversion: its presence marks a complete one


def converted_root(converted_dir: str | None = None) -> Path:
    """Where converted models live: model.converted_dir, else $CODECLLM_CACHE_DIR/models, else ~/.cache/codecllm/models."""
    if converted_dir:
        return Path(converted_dir).expanduser()
    base = os.environ.get("CODECLLM_CACHE_DIR")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "codecllm") / "models"


def cached_conversion(key: dict[str, Any], cache_dir: Path, build: Callable[[Path], None]) -> bool:
    """Make `cache_dir` hold `build`'s output for `key`; True when it already did (a cache hit).

    `build(tmp_dir)` writes into a fresh temp dir next to `cache_dir`, which is then renamed into place, so
    readers never see a half-written conversion. If another process installs the same key first, theirs is kept.
    """
    if _read_key(cache_dir) == key:
        return True
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        build(tmp)
        (tmp / CACHE_KEY_FILE).write_text(json.dumps(key, indent=1))
        _install(tmp, cache_dir, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return False


def _read_key(cache_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((cache_dir / CACHE_KEY_FILE).read_text())
    except (OSError, ValueError):
        return None


def _install(tmp: Path, cache_dir: Path, key: dict[str, Any]) -> None:
    if cache_dir.exists() and _read_key(cache_dir) != key:
        _discard_stale(cache_dir)
    try:
        os.rename(tmp, cache_dir)
    except OSError:
        if _read_key(cache_dir) != key:  # not a concurrent twin of this conversion: something else is in the way
            raise HarnessError(f"could not install the converted model at {cache_dir}; remove that directory") from None
        log.info("another process converted %s first; using its copy", cache_dir)


def _discard_stale(cache_dir: Path) -> None:
    if not (cache_dir / CACHE_KEY_FILE).exists():  # never delete a directory this code did not write
        raise HarnessError(
            f"model cache dir {cache_dir} exists but is not a codecllm conversion; remove it or set model.converted_dir"
        )
    log.info("source of %s changed; reconverting", cache_dir)
    trash = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.stale-", dir=cache_dir.parent))
    try:
        os.rename(cache_dir, trash / "old")  # atomic: readers see the old copy or none, never a half-deleted one
    except FileNotFoundError:
        pass  # another process moved it already
    shutil.rmtree(trash, ignore_errors=True)


def _safe_dirname(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_.") or "model"
