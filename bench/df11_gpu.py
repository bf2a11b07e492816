"""DFloat11 on the GPU, on a random-init Llama-1B-shaped model: encode speed, kernel bit-exactness, decode GB/s,
and DF11's own runtime against dense generation.

    python bench/df11_gpu.py --out $OUT/df11.json

Steps (each one's result, or its error and traceback, goes into the JSON, written after every step):
  encode    the vectorised encoder (`compress.codec=dfloat11`) on every distinct weight of the model, on the GPU
            (the tied lm_head is the embedding: encoded once)
  exact     every weight decoded by DF11's CUDA kernel (payload in VRAM), compared bit for bit with the original
  speed     the kernel's decode throughput per decoder block (its 7 weights one after another; CUDA events)
  runtime   DF11's own runtime built on our buffers: per decoder block, one Huffman code over its 7 weights (as
            DF11 compresses Llama), saved as a DF11 safetensors file and loaded by DF11's `DFloat11Model` with
            `bfloat16_model=` (its loader registers the buffers, the forward pre-hook per block and the reused
            output buffer). Greedy generation (batch 1, 32 tokens) alternates with dense, and must match it.
Needs: CUDA, cupy, dfloat11 0.5.0, dahuffman 0.4.2 (pip install '.[dfloat11]' cupy-cuda12x|cupy-cuda13x).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from harness.codecs import dfloat11_format as fmt  # noqa: E402
from harness.codecs import make_codec  # noqa: E402
from harness.generation import greedy_generate  # noqa: E402
from harness.models import load_model  # noqa: E402

BLOCK_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
PATTERN = r"model\.layers\.\d+"  # DF11's pattern_dict key: one compressed unit per decoder block


def sync_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def distinct_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every Linear/Embedding weight once (a tied lm_head shares the embedding's storage)."""
    seen, out = set(), {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Embedding) and m.weight.data_ptr() not in seen:
            seen.add(m.weight.data_ptr())
            out[name] = m.weight.detach()
    return out


def step_encode(state: dict, res: dict) -> None:
    codec = state["codec"] = make_codec("dfloat11")
    if state["device"] == "cuda":
        assert codec.decode_device == "cuda", "dfloat11 would decode on the CPU: is cupy installed?"
    weights = state["weights"] = distinct_weights(state["dense"].model)
    codec.encode(next(iter(weights.values()))[:64].contiguous())  # warm-up: CUDA kernels, dahuffman import
    start, cts, per = sync_time(), {}, {}
    for name, w in weights.items():
        t0 = sync_time()
        cts[name] = codec.encode(w)
        per[name] = sync_time() - t0
    total_s = sync_time() - start
    state["cts"] = cts
    nbytes = sum(w.numel() * 2 for w in weights.values())
    res.update(
        tensors=len(cts), original_gb=nbytes / 1e9, seconds=total_s, gb_per_s=nbytes / total_s / 1e9,
        ratio=nbytes / sum(ct.compressed_nbytes for ct in cts.values()), target_s=10.0, within_target=total_s <= 10.0,
        slowest=sorted(((round(s, 4), n) for n, s in per.items()), reverse=True)[:5],
    )  # fmt: skip


def step_exact(state: dict, res: dict) -> None:
    codec, bad = state["codec"], []
    for name, ct in state["cts"].items():
        ct.payload = ct.payload.to(state["device"])  # placement=gpu: the kernel reads the bytes in VRAM
        w = state["weights"][name]
        if not torch.equal(codec.decode(ct).view(torch.int16), w.view(torch.int16)):
            bad.append(name)
    res.update(checked=len(state["cts"]), mismatched=bad, bit_exact=not bad)


def step_speed(state: dict, res: dict, repeats: int = 20) -> None:
    codec, cts, blocks = state["codec"], state["cts"], []
    n_layers = state["dense"].model.config.num_hidden_layers
    for i in range(n_layers):
        names = [f"model.layers.{i}.{s}" for s in BLOCK_LINEARS]
        outs = [torch.empty(cts[n].shape, dtype=torch.bfloat16, device=state["device"]) for n in names]
        for n, o in zip(names, outs):
            codec.decode(cts[n], out=o)
        times = []
        for _ in range(repeats):
            t0 = sync_time()  # one sync per pass of 7 kernels: the launches queue back to back in between
            for n, o in zip(names, outs):
                codec.decode(cts[n], out=o)
            times.append(sync_time() - t0)
        nbytes = sum(o.numel() * 2 for o in outs)
        blocks.append({"block": i, "mb": nbytes / 1e6, "median_ms": statistics.median(times) * 1e3,
                       "gb_per_s": nbytes / statistics.median(times) / 1e9})  # fmt: skip
    res.update(per_block=blocks, median_gb_per_s=statistics.median(b["gb_per_s"] for b in blocks), repeats=repeats)


def df11_file(model: torch.nn.Module, path: Path) -> dict:
    """DF11's per-block buffers (as its compress_model stores them) from our vectorised encoder, in a safetensors file."""
    from safetensors.torch import save_file

    tensors, n_luts, original = {}, [], 0
    for i, layer in enumerate(model.model.layers):
        weights = [layer.get_submodule(s).weight.detach().view(-1) for s in BLOCK_LINEARS]
        exponent, sign_mantissa = fmt.split_bf16(torch.cat(weights))
        table, luts = fmt.build_tables(exponent)
        encoded, gaps, positions = fmt.encode_exponents(exponent, table)
        sizes = torch.tensor([w.numel() for w in weights], dtype=torch.int64)
        original += 2 * int(sizes.sum())
        prefix = f"model.layers.{i}"
        for key, value in {"luts": luts, "encoded_exponent": encoded, "sign_mantissa": sign_mantissa,
                           "output_positions": positions.view(torch.uint8), "gaps": gaps,
                           "split_positions": torch.cumsum(sizes, 0)[:-1]}.items():  # fmt: skip
            tensors[f"{prefix}.{key}"] = value.contiguous().cpu()
        n_luts.append(int(luts.shape[0]))
    save_file(tensors, str(path))
    compressed = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"file_gb": path.stat().st_size / 1e9, "per_block_ratio": original / compressed, "n_luts": n_luts}


def import_dfloat11(res: dict):
    """DF11's package module (it imports cupy and loads its kernel at import). It also imports pkg_resources for one
    resource_filename call; setuptools >= 81 no longer ships pkg_resources, so then a stand-in that returns the
    same path is registered (recorded in the JSON)."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        import importlib.util
        import types

        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda pkg, name: str(Path(importlib.util.find_spec(pkg).origin).parent / name)
        sys.modules["pkg_resources"] = shim
        res["pkg_resources_shim"] = True
    from dfloat11 import DFloat11Model

    return DFloat11Model


def step_runtime(state: dict, res: dict, rounds: int = 3, tokens: int = 32) -> None:
    DFloat11Model = import_dfloat11(res)  # noqa: N806 (a class)

    dense = state["dense"]
    model = copy.deepcopy(dense.model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        res.update(df11_file(model, path))
        model = DFloat11Model.from_single_file(str(path), {PATTERN: BLOCK_LINEARS}, model, device=state["device"])
    model.eval()
    prompts = ["The capital of France is"]
    runs = {"dense": dense.model, "dfloat11": model}
    ref = {k: greedy_generate(m, dense.tokenizer, prompts, tokens, tokens) for k, m in runs.items()}  # warm-up
    res["same_tokens"] = ref["dense"].new_token_ids == ref["dfloat11"].new_token_ids
    res["same_logits"] = bool(torch.equal(ref["dense"].logits, ref["dfloat11"].logits))
    times = {k: [] for k in runs}
    for _ in range(rounds):  # alternating: drift in clocks or neighbours hits both sides alike
        for k, m in runs.items():
            t0 = sync_time()
            greedy_generate(m, dense.tokenizer, prompts, tokens, tokens)
            times[k].append(sync_time() - t0)
    res["tok_per_s"] = {k: tokens / min(v) for k, v in times.items()}
    res["seconds"] = times
    res["speed_vs_dense"] = res["tok_per_s"]["dfloat11"] / res["tok_per_s"]["dense"]
    if torch.cuda.is_available():
        res["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--layers", type=int, default=None, help="decoder blocks (default: the 1B shape's 16)")
    ap.add_argument("--vocab-size", type=int, default=None, help="(default: the 1B shape's 128256)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (CPU reference decoder)")
    ap.add_argument("--repeats", type=int, default=20, help="decode passes per block in the speed step")
    args = ap.parse_args()
    report: dict = {"versions": {}, "steps": {}}
    for dist in ("torch", "dfloat11", "dahuffman", "cupy", "cupy-cuda12x", "cupy-cuda13x"):
        try:
            report["versions"][dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))

    state: dict = {}
    steps = [("model", None), ("encode", step_encode), ("exact", step_exact), ("speed", step_speed),
             ("runtime", step_runtime)]  # fmt: skip
    for name, fn in steps:
        res: dict = {}
        start = time.perf_counter()
        try:
            if fn is None:
                state["device"] = args.device
                report["device"] = torch.cuda.get_device_name() if args.device == "cuda" else args.device
                cfg = {"kind": "synthetic", "shape": "llama_1b", "seed": 0, "num_hidden_layers": args.layers,
                       "vocab_size": args.vocab_size}  # fmt: skip
                state["dense"] = load_model(cfg, args.device)
            elif fn is step_speed:
                fn(state, res, repeats=args.repeats)
            else:
                fn(state, res)
            res["ok"] = True
        except Exception as e:  # record and go on: later steps say why they could not run
            res.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        res["wall_s"] = time.perf_counter() - start
        report["steps"][name] = res
        save()
        print(f"{name}: {'ok' if res['ok'] else res['error']} ({res['wall_s']:.1f} s)", flush=True)
        if name == "model" and not res["ok"]:
            break  # nothing can run without the model
    brief = {
        k: {kk: v for kk, v in s.items() if kk not in ("traceback", "per_block")} for k, s in report["steps"].items()
    }
    print(json.dumps(brief, indent=1, default=str))


if __name__ == "__main__":
    main()
