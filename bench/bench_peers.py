"""Peers side by side (issue 14): ours against DFloat11 and accelerate's offload, one GPU, one process per shape.

    python bench/bench_peers.py --shape llama_1b --out $OUT/peers_1b.jsonl
    python bench/bench_peers.py --shape llama_8b --tokens 16 --rounds 3 --slow-tokens 4 --slow-rounds 2 \\
        --skip accel_offload ours_compiled --out $OUT/peers_8b.jsonl
    python bench/bench_peers.py --device cpu --tiny --batch 1 --tokens 2 --rounds 1 --slow-rounds 1 --out x.jsonl  # smoke

Arms (rows), each its own model object, all resident on the card at once; random-init Llama shapes in bf16
(harness.models `synthetic`), greedy, fixed length. Three groups, each timed against its own reference:
  eager     (--tokens, --rounds) against `dense`
    dense           HF eager generate (dynamic cache): the reference
    ours            nvcomp_ans_batched + cache=block, compressed bytes in VRAM (every eligible linear layer: the 8B's
                    lm_head too; the 1B's tied lm_head is not eligible)
    df11            DF11's runtime as it ships: one Huffman code per decoder block over its 7 weights (DF11's buffers
                    from our vectorised encoder, bench/df11_gpu.py `df11_file`), loaded by DF11's `DFloat11Model`
                    (its loader registers the buffers, a forward pre-hook per block, its one reused output buffer);
                    lm_head and embeddings stay bf16, as in DF11's own Llama files
    df11_codec      codec dfloat11 (DF11's kernel, per layer) + cache=block, bytes in VRAM, inside our runtime
  offload   (--slow-tokens, --slow-rounds, --slow-batch) against `dense` at that length
    accel_offload   accelerate `cpu_offload`: bf16 weights copied per module from pageable host memory
    df11_offload    DF11 `cpu_offload=True`: encoded exponents and sign/mantissa bytes pinned on the host, copied
                    to the GPU per block in its pre-hook, decoded, dropped
    ours_cpu        nvcomp_ans_batched + cache=block ahead=1, bytes in pinned host memory (compress.placement=cpu)
  compiled  (--tokens, --rounds) against `dense_compiled` (generate.compile=true: static cache, transformers
            compiles the decode step, CUDA graphs; harness/phases/compiled.py)
    dense_compiled, ours_compiled (the capturable block policy over ours' bytes)
    df11_compiled   never run: the row says why
The group's reference always runs when any arm of the group does. --arms picks arms, --skip drops some.

Method, per group and batch: every arm first runs one generation through harness.phases.phase.run_phase (compiled:
2 warm-ups first), which gives exactness (token ids and every logit torch.equal to the reference's) and memory;
then the group's arms alternate in paired rounds (harness.phases.paired.run_rounds: each round one generation of
every arm, the order rotated); "x ref" is the median of the per-round ratios with its IQR. A failure is a row
(error + traceback) and the other arms go on; if a group's rounds fail, they are rerun as (reference, arm) pairs.
Rows go to --out as JSON lines as they are measured; a markdown table is printed last (and written to <out>.md).
  weight VRAM  parameters, buffers and compressed bytes on the compute device (offloaded weights are not)
  peak VRAM    weight VRAM + what the arm keeps allocated between generations (decode buffers, DF11's output
               buffer, CUDA-graph pools: left by its first generation) + the most one generation at that batch
               allocates on top; all arms share the card, so the card's own peak would be everyone's
  compress s   ours/df11_codec: encoding every layer on the GPU (+ checksums); df11/df11_offload: DF11's
               per-block buffers with our encoder + writing DF11's file (loading it: load_s)

Time per arm, both batches: setup + (1 + rounds) generations per batch (compiled: 3 + rounds). From the H200/H100
figures of docs/benchmarks.md and docs/bench-data/h200/compile_*.jsonl; "est." = no figure yet, a guess.
  arm             setup 1B / 8B              one generation 1B (32 tok) / 8B (16 tok)     total 1B / 8B
  dense           first CUDA generation 7 s  0.4-0.7 s / 0.4-0.5 s                        ~13 s / ~12 s
  ours            encode 2 s / 15 s          0.4-0.8 s / 0.6 s                            ~9 s / ~23 s
  df11            file+load 7 s / 40 s est.  ~1 s / ~1 s est. (DF11: "~2x slower")        ~19 s / ~46 s
  df11_codec      encode 5 s / 30 s est.     ~1.2 s / ~1.2 s est. (7 launches a block)    ~19 s / ~40 s
  accel_offload   copy 1 s / 8 s             ~4.3 s (8 tok) / ~10.5 s (4 tok)             ~35 s / ~71 s
  df11_offload    load+pin 3 s / 10 s est.   ~1 s / ~1 s est. (its bytes over PCIe)       ~11 s / ~16 s
  ours_cpu        pin 1 s / 10 s             0.3 s (8 tok) / 0.9 s (4 tok)                ~4 s / ~15 s
  dense_compiled  -                          compile + capture 24 s (b=1) + 33 s (b=8)    ~60 s / ~72 s
  ours_compiled   -                          compile + capture 18 s + 34 s                ~56 s / ~70 s
Plus ~20 s of process start and imports. 1B, defaults (32 tokens x 5 rounds, slow 8 tokens x 3): ~4-4.5 min.
8B with --tokens 16 --rounds 3 --slow-tokens 4 --slow-rounds 2 --skip accel_offload dense_compiled ours_compiled:
~3 min; accel_offload adds ~70 s (~35 s with --slow-batch 1), the compiled pair ~2.5 min. One command may run 10.
Needs: CUDA, the [gpu] and [dfloat11] extras, cupy-cuda12x|13x, accelerate. On --device cpu the GPU arms are
reported as skipped (with the reason) and the rest runs: a smoke test of this script.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib.metadata
import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # machine, df11_gpu, bench_gpu: also when a test imports this

import machine  # noqa: E402
import torch  # noqa: E402
from bench_gpu import callbacks, prompts  # noqa: E402
from df11_gpu import BLOCK_LINEARS, PATTERN, df11_file, import_dfloat11  # noqa: E402

from harness.codecs import make_codec  # noqa: E402
from harness.measure import sync  # noqa: E402
from harness.models import TINY_ARCH, load_model  # noqa: E402
from harness.phases.compiled import release_compiled  # noqa: E402
from harness.phases.module import GenerationModule  # noqa: E402
from harness.phases.paired import run_rounds  # noqa: E402
from harness.phases.phase import run_phase  # noqa: E402
from harness.runtime import CompressedEmbedding, CompressedLinear, compress_model  # noqa: E402
from harness.selection import select_layers  # noqa: E402

PEER_PACKAGES = ("accelerate", "lightning", "dfloat11", "dahuffman", "cupy-cuda12x", "cupy-cuda13x", "triton")


@dataclass
class Built:
    model: torch.nn.Module
    runtime: Any = None
    compile: bool = False
    df11: bool = False  # holds DF11's process-wide output buffer
    info: dict = field(default_factory=dict)  # ratio, compress_s, load_s, layers, note: copied into every row
    module: GenerationModule | None = None
    weight_bytes: int = 0
    held_bytes: int | None = None  # left allocated by the arm's first generation


class Ctx:
    """What the arms share: the dense model, ours' encoded bytes (per codec), DF11's file."""

    def __init__(self, args, dense, device: torch.device) -> None:
        self.args, self.dense, self.device = args, dense, device
        self.encoded: dict[str, tuple[dict, float]] = {}  # codec -> (layer name -> CompressedTensor, encode seconds)
        self._tmp = tempfile.TemporaryDirectory(dir=args.tmp_dir, prefix="bench_peers_")
        self._df11: tuple[Path, dict] | None = None

    def df11_file(self) -> tuple[Path, dict]:
        """DF11's safetensors file of the dense model, written once (df11 and df11_offload load the same file)."""
        if self._df11 is None:
            path = Path(self._tmp.name) / "model.safetensors"
            t0 = time.perf_counter()
            info = df11_file(self.dense.model, path)
            self._df11 = path, {**info, "compress_s": time.perf_counter() - t0}
        return self._df11


def fresh_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy without the top-level hooks (a GenerationModule's: they would dispatch into the dense arm's
    callbacks) and without the compiled step (it would run the dense model), as paired.dense_twin does."""
    compiled = model.__dict__.pop("_compiled_call", None)
    try:
        twin = copy.deepcopy(model)
    finally:
        if compiled is not None:
            model.__dict__["_compiled_call"] = compiled
    twin._forward_pre_hooks.clear()
    twin._forward_hooks.clear()
    return twin


def device_weight_bytes(model: torch.nn.Module, device: torch.device) -> int:
    """Parameters, buffers and our compressed bytes held on `device`, each tensor once. Offloaded weights live on
    the host or on "meta" (accelerate) and do not count; DF11's buffers are registered buffers and do."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [m.ct.payload for m in model.modules() if isinstance(m, CompressedLinear | CompressedEmbedding)]
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t.device.type == device.type and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def df11_reset_buffer() -> None:
    """Drop DF11's process-wide output buffer (TensorManager), so the next DF11 arm allocates its own in its first
    generation and pays for it in its memory figures."""
    module = sys.modules.get("dfloat11.dfloat11")
    if module is not None:
        module.TensorManager._tensors.clear()


# ------------------------------------------------------------------------------------------------ the arms' builders


def build_dense(ctx: Ctx, compile_: bool = False) -> Built:
    return Built(ctx.dense.model, compile=compile_, info={"ratio": 1.0})


def build_ours(ctx: Ctx, codec: str = "nvcomp_ans_batched", placement: str = "gpu", ahead: int = 0,
               captured: bool = False, share: bool = True) -> Built:  # fmt: skip
    """Our runtime, cache=block. The first arm of a codec encodes and (`share`) keeps its bytes for later arms of
    that codec, which reuse them (as new CompressedTensor objects: placing one arm's bytes must not move
    another's) and report that encode time as theirs."""
    model = fresh_copy(ctx.dense.model)
    shared = ctx.encoded.get(codec)
    pre = {name: dataclasses.replace(ct) for name, ct in shared[0].items()} if shared else None
    t0 = time.perf_counter()
    rt = compress_model(model, make_codec(codec), selection=select_layers(model, "all"), policy="block",
                        policy_options={"ahead": ahead} if ahead else {}, placement=placement, precompressed=pre,
                        captured=captured, attach=False, progress=False)  # fmt: skip
    sync(ctx.device)
    seconds = time.perf_counter() - t0
    report = rt.report
    info = {"ratio": report.compression_ratio, "layers": f"{report.layers_compressed}/{report.layers_total}",
            "codec": codec, "placement": placement, "ahead": ahead}  # fmt: skip
    if shared:
        info.update(compress_s=shared[1], place_s=seconds, note=f"bytes from the first {codec} arm's encode")
    else:
        info["compress_s"] = seconds
        if share:
            ctx.encoded[codec] = {layer.name: layer.ct for layer in rt.layers}, seconds
    return Built(model, rt, compile=captured, info=info)


def build_df11(ctx: Ctx, offload: bool) -> Built:
    info: dict = {}
    DFloat11Model = import_dfloat11(info)  # noqa: N806 (a class); info records the pkg_resources stand-in if used
    path, file_info = ctx.df11_file()
    model = fresh_copy(ctx.dense.model)
    t0 = time.perf_counter()
    model = DFloat11Model.from_single_file(str(path), {PATTERN: BLOCK_LINEARS}, model, device=str(ctx.device),
                                           cpu_offload=offload)  # fmt: skip
    model.eval()
    sync(ctx.device)
    n = len(model.model.layers)
    info.update(ratio=file_info["per_block_ratio"], compress_s=file_info["compress_s"], file_gb=file_info["file_gb"],
                load_s=time.perf_counter() - t0, layers=f"{n * len(BLOCK_LINEARS)} in {n} blocks", cpu_offload=offload)  # fmt: skip
    return Built(model, df11=True, info=info)


def build_accel_offload(ctx: Ctx) -> Built:
    from accelerate import cpu_offload

    t0 = time.perf_counter()
    model = fresh_copy(ctx.dense.model).to("cpu")
    cpu_offload(model, execution_device=torch.cuda.current_device())
    return Built(model, info={"ratio": 1.0, "load_s": time.perf_counter() - t0,
                              "note": "bf16, per module, from pageable host memory"})  # fmt: skip


@dataclass
class Arm:
    label: str
    group: str  # eager | offload | compiled
    build: Callable[[Ctx], Built] | None
    gpu_only: str = ""  # why it cannot run on the CPU ("": it can)
    not_run: str = ""  # why it is never run


CUDA_DF11 = "DF11's kernel runs through cupy, on CUDA only"
ARMS: dict[str, Arm] = {
    "dense": Arm("dense (HF eager)", "eager", build_dense),
    "ours": Arm("ours: nvcomp_ans_batched + block, VRAM", "eager", build_ours, "nvCOMP decodes on CUDA only"),
    "df11": Arm("DF11 runtime (DFloat11Model)", "eager", lambda c: build_df11(c, offload=False), CUDA_DF11),
    "df11_codec": Arm("dfloat11 codec + block, VRAM", "eager", lambda c: build_ours(c, codec="dfloat11", share=False),
                      CUDA_DF11),
    "accel_offload": Arm("accelerate cpu_offload (bf16)", "offload", build_accel_offload,
                         "it offloads a GPU's weights to the host"),
    "df11_offload": Arm("DF11 cpu_offload=True", "offload", lambda c: build_df11(c, offload=True), CUDA_DF11),
    "ours_cpu": Arm("ours: placement=cpu, block ahead=1", "offload",
                    lambda c: build_ours(c, placement="cpu", ahead=1), "nvCOMP decodes on CUDA only"),
    "dense_compiled": Arm("dense compiled", "compiled", lambda c: build_dense(c, compile_=True),
                          "CUDA graphs exist on CUDA only (Inductor's CPU compile alone takes minutes)"),
    "ours_compiled": Arm("ours compiled (capturable block)", "compiled",
                         lambda c: build_ours(c, captured=True), "nvCOMP decodes on CUDA only"),
    "df11_compiled": Arm("DF11 runtime compiled", "compiled", None, not_run=(
        "DF11 cannot be captured: its decode is a cupy kernel launch in a Python forward pre-hook that reassigns "
        "module weights, which torch.compile cannot trace and a CUDA graph cannot replay")),
}  # fmt: skip
GROUPS = ("eager", "offload", "compiled")  # the order they run in: the cheap, most-wanted rows first
REFERENCE = {"eager": "dense", "offload": "dense", "compiled": "dense_compiled"}


# ------------------------------------------------------------------------------------------------ measuring


class Bench:
    def __init__(self, args, device: torch.device) -> None:
        self.args, self.device = args, device
        self.accelerator = "gpu" if device.type == "cuda" else "cpu"
        self.rows: list[dict] = []

    def emit(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.args.out, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        brief = {k: v for k, v in row.items() if k not in ("traceback", "times_s", "vs_ref_per_round")}
        print(json.dumps(brief, default=str), flush=True)

    def status_row(self, name: str, group: str, status: str, batch: int | None = None, stage: str | None = None,
                   error: BaseException | None = None, reason: str = "", **extra) -> None:  # fmt: skip
        row = {"event": "row", "shape": self.args.shape, "batch": batch, "arm": name, "label": ARMS[name].label,
               "group": group, "status": status, **extra}  # fmt: skip
        if error is not None:
            row.update(stage=stage, error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        if reason:
            row["reason"] = reason
        self.emit(row)

    def run_group(self, group: str, names: list[str], ctx: Ctx) -> None:
        args, ref = self.args, names[0]
        offload = group == "offload"
        tokens, rounds = (args.slow_tokens, args.slow_rounds) if offload else (args.tokens, args.rounds)
        if group == "compiled":
            torch._dynamo.config.cache_size_limit = 64  # several compiled models share transformers' code objects
        arms: dict[str, Built] = {}
        for name in names:
            try:
                t0 = time.perf_counter()
                built = ARMS[name].build(ctx)
                built.info["build_s"] = time.perf_counter() - t0
                built.module = GenerationModule(built.model, ctx.dense.tokenizer, tokens, tokens, compile=built.compile)
                built.module.runtime = built.runtime
                built.weight_bytes = device_weight_bytes(built.model, self.device)
                arms[name] = built
                self.emit({"event": "built", "arm": name, "group": group, "weight_vram_bytes": built.weight_bytes,
                           **built.info})  # fmt: skip
            except Exception as e:  # a failed arm is a row, not the end of the benchmark
                self.status_row(name, group, "error", stage="build", error=e)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        try:
            for b in args.slow_batch if offload else args.batch:
                self.run_batch(group, ref, arms, b, tokens, rounds)
        finally:
            self.release(arms)

    def run_batch(self, group: str, ref: str, arms: dict[str, Built], b: int, tokens: int, rounds: int) -> None:
        ps = prompts(b)
        phases: dict[str, tuple[Any, int]] = {}
        for name, built in arms.items():
            try:
                phases[name] = self.cold_phase(name, built, ps)
            except Exception as e:
                self.status_row(name, group, "error", batch=b, stage="phase", error=e)
        live = [n for n in arms if n in phases]
        if ref not in phases:
            for name in live:
                self.status_row(name, group, "error", batch=b, stage="rounds", reason=f"the reference {ref} failed")
            return
        paired = self.rounds(live, arms, ps, rounds)
        for name in live:
            self.emit(self.row(group, ref, name, b, tokens, arms[name], phases, paired[name]))

    def cold_phase(self, name: str, built: Built, ps: list[str]) -> tuple[Any, int]:
        """One generation (compiled: after 2 warm-ups) through the phase path; returns it and the arm's peak bytes."""
        if built.df11 and built.held_bytes is None:
            df11_reset_buffer()
        res = run_phase(name, built.module, callbacks(), ps, repeats=1, warmup=0, accelerator=self.accelerator,
                        progress=False)  # fmt: skip
        mem, g = res.memory, res.generation
        transient = mem.peak_bytes - mem.before_bytes
        if built.held_bytes is None:  # its first phase: what it left allocated, less the outputs the phase still held
            outputs = len(res.record.times_s) * (g.logits.nbytes + g.sequences.nbytes)
            built.held_bytes = max(0, mem.after_bytes - mem.before_bytes - outputs)
            return res, built.weight_bytes + transient
        return res, built.weight_bytes + built.held_bytes + transient

    def rounds(self, names: list[str], arms: dict[str, Built], ps: list[str], rounds: int) -> dict[str, Any]:
        """{arm: the PairedRounds holding it, or the exception that stopped them}. The phases warmed every arm at
        this batch, so no warm-up rounds. If the group's rounds fail, each arm is rerun paired with the reference
        alone, so that one failing arm does not take the others' figures."""

        def run(sides: list[str]):
            return run_rounds({n: arms[n].module for n in sides}, {n: callbacks() for n in sides}, ps, rounds, 0,
                              self.accelerator, mechanism="one model per arm")  # fmt: skip

        try:
            paired = run(names)
            return dict.fromkeys(names, paired)
        except Exception as e:
            group_error = f"{type(e).__name__}: {e}"
            print(f"rounds of {names} failed ({group_error}); rerunning them in pairs with {names[0]}", flush=True)
        out: dict[str, Any] = {}
        for name in names[1:]:
            try:
                out[name] = run([names[0], name])
                out.setdefault(names[0], out[name])
            except Exception as e:
                e.add_note(f"(the group's rounds had failed first: {group_error})")
                out[name] = e
        out.setdefault(names[0], RuntimeError(f"every pair failed; the group's rounds: {group_error}"))
        return out

    def row(self, group, ref, name, b, tokens, built: Built, phases, paired) -> dict:
        (res, peak), (ref_res, _) = phases[name], phases[ref]
        g, rg = res.generation, ref_res.generation
        same_shape = g.logits.shape == rg.logits.shape
        row = {"event": "row", "shape": self.args.shape, "batch": b, "arm": name, "label": ARMS[name].label,
               "group": group, "reference": ref, "tokens": tokens, "status": "ok", **built.info,
               "weight_vram_bytes": built.weight_bytes, "held_bytes": built.held_bytes, "peak_vram_bytes": peak,
               "memory_kind": res.memory.kind, "cold_time_s": res.record.times_s[-1],
               "tokens_equal": g.new_token_ids == rg.new_token_ids,
               "logits_equal": bool(same_shape and torch.equal(g.logits, rg.logits)),
               "max_abs_logit_diff": (g.logits.float() - rg.logits.float()).abs().max().item() if same_shape else None}  # fmt: skip
        if isinstance(paired, Exception):
            row.update(status="error", stage="rounds", error=f"{type(paired).__name__}: {paired}",
                       traceback="".join(traceback.format_exception(paired)))  # fmt: skip
            return row
        side = paired.side_dict(name)
        row.update(time_s=side["time_s"], times_s=side["times_s"], gpu_time_s=side["gpu_time_s"],
                   tok_s=b * tokens / side["time_s"], rounds=len(side["times_s"]),
                   rounds_arms=list(paired.records))  # all the group's live arms, or a rerun pair  # fmt: skip
        if name == ref:
            row.update(vs_ref=1.0, vs_ref_iqr=[1.0, 1.0], exact=True)
        else:
            r = paired.ratios[name]
            row.update(vs_ref=r["speed_ratio"], vs_ref_iqr=[r["speed_ratio_q1"], r["speed_ratio_q3"]],
                       vs_ref_per_round=r["speed_ratio_per_round"],
                       exact=bool(row["tokens_equal"] and row["logits_equal"] and paired.exact[name]))  # fmt: skip
        stats = [paired.records[name].runtime_stats[i] for i in paired.timed(name)] if built.runtime else []
        if stats and all(s["decompress_time_s"] is not None for s in stats):  # host time to issue the decodes
            seconds = sum(s["decompress_time_s"] for s in stats)
            row["decompress_host_ms_per_token"] = 1e3 * seconds / (len(stats) * tokens)
        return row

    def release(self, arms: dict[str, Built]) -> None:
        """Nothing of a group may stay alive into the next one's memory figures."""
        for built in arms.values():
            built.module.close()
            if built.runtime is not None:
                built.runtime.close()
            if built.compile:
                release_compiled(built.model)
        if any(built.df11 for built in arms.values()):
            df11_reset_buffer()
        arms.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ table and main


def table(rows: list[dict]) -> str:
    gb = lambda n: f"{n / 1e9:.3f}" if n is not None else "-"  # noqa: E731
    out = ["| shape | b | arm | ratio | weight VRAM GB | peak VRAM GB | tok/s | x ref (IQR) | exact | compress s | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    arm_order = {name: i for i, name in enumerate(ARMS)}
    rows = sorted((r for r in rows if r.get("event") == "row"),  # by group, batch, arm; stable otherwise
                  key=lambda r: (GROUPS.index(r["group"]) if r["group"] in GROUPS else 9, r.get("batch") or 0,
                                 arm_order.get(r["arm"], 99)))  # fmt: skip
    for r in rows:
        head = f"| {r['shape']} | {r.get('batch') or '-'} | {r['label']} |"
        if r["status"] != "ok" and "tok_s" not in r:
            why = r.get("reason") or r.get("error", "")
            out.append(f"{head} | | | | | | | {r['status']}: {why[:100]} |")
            continue
        vs = f"{r['vs_ref']:.3f} ({r['vs_ref_iqr'][0]:.3f}-{r['vs_ref_iqr'][1]:.3f}) vs {r['reference']}"
        cs = f"{r['compress_s']:.1f}" if r.get("compress_s") is not None else "-"
        out.append(f"{head} {r.get('ratio', 1.0):.4f} | {gb(r['weight_vram_bytes'])} | {gb(r['peak_vram_bytes'])} | "
                   f"{r['tok_s']:.2f} | {vs} | {'yes' if r['exact'] else 'NO'} | {cs} | {r['tokens']} tokens |")  # fmt: skip
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama_1b", help="llama_1b | llama_8b")
    ap.add_argument("--tiny", action="store_true", help="the shape with tiny dimensions (CPU smoke tests)")
    ap.add_argument("--device", default="cuda", help="cpu: smoke test (GPU arms are reported as skipped)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per generation, eager and compiled groups")
    ap.add_argument("--rounds", type=int, default=5, help="paired rounds, eager and compiled groups")
    ap.add_argument("--slow-tokens", type=int, default=8, help="new tokens per generation, offload group")
    ap.add_argument("--slow-rounds", type=int, default=3, help="paired rounds, offload group")
    ap.add_argument("--slow-batch", type=int, nargs="+", default=None, help="offload group batches (default --batch)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), metavar="ARM",
                    help=f"arms to run (default all): {' '.join(ARMS)}")  # fmt: skip
    ap.add_argument("--skip", nargs="+", default=[], choices=list(ARMS), metavar="ARM", help="arms not to run")
    ap.add_argument("--tmp-dir", default=None, help="where DF11's file is written (8B: ~11 GB; default: system temp)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "bench_peers.jsonl")
    args = ap.parse_args(argv)
    if set(args.skip) & set(REFERENCE.values()):
        ap.error(f"{' and '.join(sorted(set(REFERENCE.values())))} are references: they run whenever their group does")
    args.slow_batch = args.slow_batch or args.batch
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric"):  # a Trainer per phase and side: its banner every time
        logging.getLogger(name).setLevel(logging.ERROR)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    bench = Bench(args, device)
    info = machine.describe()  # first: the rows below are this machine's
    for dist in PEER_PACKAGES:
        try:
            info["packages"][dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    print(machine.line(info), flush=True)
    bench.emit({"event": "machine", "machine": info, "args": vars(args)})

    selected = [n for n in ARMS if n in args.arms]
    runnable: dict[str, list[str]] = {g: [] for g in GROUPS}  # per group, the arms besides its reference
    for name in selected:
        arm = ARMS[name]
        if name in args.skip:
            bench.status_row(name, arm.group, "skipped", reason="--skip")
        elif arm.not_run:
            bench.status_row(name, arm.group, "not_run", reason=arm.not_run)
        elif device.type != "cuda" and arm.gpu_only:
            bench.status_row(name, arm.group, "skipped", reason=f"GPU arm: {arm.gpu_only}")
        elif name != REFERENCE[arm.group]:
            runnable[arm.group].append(name)
    cfg = {"kind": "synthetic", "name": args.shape, "shape": args.shape, "seed": 0, "dtype": "bfloat16",
           **(TINY_ARCH if args.tiny else {})}  # fmt: skip
    t0 = time.perf_counter()
    try:
        dense = load_model(cfg, device)
    except Exception as e:  # nothing runs without it
        bench.emit({"event": "error", "stage": "load", "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()})  # fmt: skip
        raise
    bench.emit({"event": "loaded", "shape": args.shape, "tiny": args.tiny, "load_s": time.perf_counter() - t0,
                "weight_bytes": device_weight_bytes(dense.model, device)})  # fmt: skip
    ctx = Ctx(args, dense, device)
    try:
        for group in GROUPS:
            ref = REFERENCE[group]
            ref_alone = ARMS[ref].group == group and ref in selected  # e.g. --arms dense: its own row
            if device.type != "cuda" and ARMS[ref].gpu_only or not (runnable[group] or ref_alone):
                continue
            bench.run_group(group, [ref, *runnable[group]], ctx)
    finally:
        ctx._tmp.cleanup()
        md = table(bench.rows)
        print(f"\n{machine.line(info)}\n\n{md}", flush=True)
        args.out.with_suffix(".md").write_text(f"{machine.line(info)}\n\n{md}\n")
    return bench.rows


if __name__ == "__main__":
    # `timeout` sends SIGTERM: exit through main's `finally`, so the table is printed and DF11's file removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
