"""Artifact cache: a model's compressed layers on disk, so each configuration is compressed once.

Compression is deterministic, so the compressed layers are a function of their key: the model's identity, an
xxh3 of every selected weight's bytes (with its name, shape and dtype), the codec with the settings that change
its bytes and a hash of its code, and the selected layer names. The artifact is one safetensors file,
<root>/<sha256 of the key>.safetensors: a flat uint8 tensor per layer holding its payload, and one metadata entry,
"codecllm": "<xxh3 of the JSON> <JSON>", the JSON holding the key and each layer's CompressedTensor header and
payload xxh3. (One entry: safetensors writes its metadata map in no fixed order, and one entry keeps the bytes of
an artifact deterministic.) No pickle: nothing in the file is executed.

Writes are atomic (a temp file in the same directory, then os.replace): jobs writing the same key at once each
install a complete file with the same content, the last rename wins, and readers only ever see whole files.
Loading checks everything it can without decompressing (the metadata hash, the key, every payload's hash,
every layer's original-bytes checksum against the live weight); a truncated, corrupted or stale file is
reported with a warning and rebuilt. The runtime still checks each decompressed weight (compress.verify).
Nothing is evicted: delete the directory to reclaim the space.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from harness.atomic import atomic_path
from harness.codecs.base import Codec, CompressedTensor, checksum, dtype_name
from harness.runtime.compress import CompressedRuntime, compress_model
from harness.selection import Selection, select_layers

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the file layout changes: older artifacts become misses
META_KEY = "codecllm"
ORPHAN_AGE_S = 3600  # a temp file this old belongs to a writer that died


def cache_root(artifact_dir: str | os.PathLike | None = None) -> Path:
    """compress.artifact_dir, else $CODECLLM_CACHE_DIR/artifacts, else ~/.cache/codecllm/artifacts."""
    if artifact_dir:
        return Path(artifact_dir).expanduser()
    base = os.environ.get("CODECLLM_CACHE_DIR")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "codecllm") / "artifacts"


def model_identity(loaded: Any, kind: str) -> dict[str, str]:
    """What names the model (a LoadedModel); the weight hash in the key is what really identifies it."""
    return {"kind": str(kind), "name": str(loaded.name), "source": str(loaded.source), "dtype": dtype_name(loaded.dtype)}


def _code_hash(codec: Codec) -> str:
    # A codec edit may change its bytes or its meta layout; an artifact written by other code is a miss.
    modules = [type(codec).__module__, Codec.__module__, *type(codec).format_modules]
    files = [importlib.import_module(m).__file__ for m in modules]
    return xxhash.xxh3_64_hexdigest(b"".join(Path(f).read_bytes() for f in files))


@dataclass(frozen=True)
class ArtifactKey:
    fields: dict[str, Any]  # everything that decides the compressed bytes (JSON); its sha256 names the file
    layers: dict[str, dict[str, Any]]  # name -> shape, dtype, checksum of the live weight

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fields, sort_keys=True).encode()).hexdigest()[:32]


def artifact_key(identity: Mapping[str, Any], selection: Selection, codec: Codec) -> ArtifactKey:
    """Hash the selected weights (xxh3, ~10 GB/s; far cheaper than compressing them) into the key."""
    layers: dict[str, dict[str, Any]] = {}
    weights = xxhash.xxh3_128()
    for cand in selection.chosen:
        w = cand.module.weight
        layers[cand.name] = {"shape": list(w.shape), "dtype": dtype_name(w.dtype), "checksum": checksum(w)}
        weights.update(json.dumps([cand.name, layers[cand.name]]).encode())
    fields = {
        "format": FORMAT,
        "model": dict(identity),
        "codec": codec.name,
        "codec_settings": codec.settings(),
        "codec_code_xxh3": _code_hash(codec),
        "layers": list(layers),
        "weights_xxh3_128": weights.hexdigest(),
    }
    return ArtifactKey(json.loads(json.dumps(fields)), layers)  # JSON round trip: compares equal to a stored key


class Unusable(Exception):
    """An artifact that must not be used (truncated, corrupted or stale)."""


class ArtifactCache:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, key: ArtifactKey) -> Path:
        return self.root / f"{key.digest}.safetensors"

    def load(self, key: ArtifactKey) -> dict[str, CompressedTensor] | None:
        """The cached compressed layers of `key`, or None (a miss; an unusable file is warned about)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return _read(path, key)
        except (MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as e:  # whatever a damaged file makes the reader raise, it means the same: rebuild
            why = str(e) if isinstance(e, Unusable) else f"unreadable: {type(e).__name__}: {' '.join(str(e).split())}"
            log.warning("artifact cache: %s is %s; compressing again and rewriting it", path, why)
            return None

    def store(self, key: ArtifactKey, layers: Mapping[str, CompressedTensor]) -> Path | None:
        """Write the artifact atomically; None if it could not be written (the run goes on without it)."""
        path = self.path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._remove_orphans(path)
            tensors = {name: ct.payload.detach().reshape(-1).cpu() for name, ct in layers.items()}  # GPU -> host
            info = {
                "key": key.fields,
                "layers": {
                    name: {"header": ct.header(), "payload_xxh3": xxhash.xxh3_64_hexdigest(tensors[name].numpy())}
                    for name, ct in layers.items()
                },
            }
            text = json.dumps(info, sort_keys=True)
            # atomic; a concurrent writer of the same key installs identical content
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={META_KEY: f"{xxhash.xxh3_64_hexdigest(text.encode())} {text}"})
            return path
        except (OSError, SafetensorError) as e:
            log.warning("artifact cache: could not write %s (%s); continuing without it", path, e)
            return None

    @staticmethod
    def _remove_orphans(path: Path) -> None:
        now = time.time()
        for orphan in path.parent.glob(f".{path.stem}.*.tmp"):
            try:
                if now - orphan.stat().st_mtime > ORPHAN_AGE_S:
                    orphan.unlink()
            except OSError:
                pass  # another writer's cleanup got there first


def _read(path: Path, key: ArtifactKey) -> dict[str, CompressedTensor]:
    with safe_open(path, framework="pt") as f:  # checks the header and that the file covers every tensor
        meta = (f.metadata() or {}).get(META_KEY)
        if meta is None:
            raise Unusable("not a codecllm artifact (no codecllm metadata)")
        digest, _, text = meta.partition(" ")
        if xxhash.xxh3_64_hexdigest(text.encode()) != digest:
            raise Unusable("corrupted (its metadata fails its checksum)")
        info = json.loads(text)
        if info["key"] != key.fields:
            raise Unusable("stale (written for another key)")
        if sorted(f.keys()) != sorted(key.layers):
            raise Unusable("corrupted (its layers are not the key's)")
        pin = torch.cuda.is_available()
        out = {}
        for name, live in key.layers.items():
            entry = info["layers"][name]
            header = entry["header"]
            if (header["checksum"], header["shape"], header["dtype"]) != (live["checksum"], live["shape"], live["dtype"]):
                raise Unusable(f"stale (layer {name} was compressed from other weights)")
            stored = f.get_tensor(name)
            if stored.dtype != torch.uint8 or stored.dim() != 1:
                raise Unusable(f"corrupted (layer {name}: payload is {stored.dtype} {tuple(stored.shape)})")
            # get_tensor maps the file: copy, so the runtime never depends on it (and pin, as the codecs do).
            payload = torch.empty(stored.numel(), dtype=torch.uint8, pin_memory=pin).copy_(stored)
            if xxhash.xxh3_64_hexdigest(payload.numpy()) != entry["payload_xxh3"]:
                raise Unusable(f"corrupted (layer {name}: its payload fails its checksum)")
            out[name] = CompressedTensor.from_header(header, payload)
    return out


def artifact_cache(compress_cfg: Mapping[str, Any]) -> ArtifactCache | None:
    """The cache a run's compress config asks for (compress.artifact_cache, compress.artifact_dir), or None."""
    if not compress_cfg.get("artifact_cache", True):
        return None
    return ArtifactCache(cache_root(compress_cfg.get("artifact_dir")))


def compress_cached(
    model: nn.Module,
    codec: Codec,
    cache: ArtifactCache | None,
    identity: Mapping[str, Any],
    selection: Selection | None = None,
    layers: int | str = "all",
    order: str = "first",
    include: Any = None,
    exclude: Any = None,
    embeddings: bool = False,
    **compress_kwargs: Any,
) -> CompressedRuntime:
    """`compress_model` through the artifact cache: on a hit the compressed layers are loaded, on a miss they are
    compressed and stored. The report's compress_time_s is then the whole wait (hash + load, or hash + compress +
    store), artifact_time_s the cache's share of it, artifact_cache_hit None when no cache is used."""
    if selection is None:
        selection = select_layers(model, layers, order, include, exclude, embeddings, refuse=codec.refuse)
    if cache is None or not selection.chosen:
        return compress_model(model, codec, selection=selection, **compress_kwargs)
    start = time.perf_counter()
    key = artifact_key(identity, selection, codec)
    cached = cache.load(key)
    cache_s = time.perf_counter() - start
    runtime = compress_model(model, codec, selection=selection, precompressed=cached, **compress_kwargs)
    path: Path | None = cache.path(key)
    if cached is None:
        store_start = time.perf_counter()
        path = cache.store(key, {layer.name: layer.ct for layer in runtime.layers})
        cache_s += time.perf_counter() - store_start
    report = runtime.report
    report.compress_time_s = time.perf_counter() - start
    report.artifact_cache_hit = cached is not None
    report.artifact_path = None if path is None else str(path)
    report.artifact_time_s = cache_s
    log.info(
        "artifact cache %s: %d layers in %.2f s (%s)",
        "hit" if cached is not None else "miss", len(runtime.layers), report.compress_time_s, path,
    )
    return runtime
