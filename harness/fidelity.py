"""Fidelity check: run lm-eval tasks on the baseline and on the compressed model, and compare per sample.

Lossless compression must leave every log-likelihood and every generated token unchanged, so the comparison
is exact float equality per request, not a tolerance on aggregate metrics. Results are plain JSON-able dicts:

    evaluate(...) -> {task: {"output_type": str, "metrics": {name: float},
                             "samples": [{"doc_id", "args_hash", "loglikelihoods", "greedy", "generations"}]}}

lm_eval is imported inside the functions: importing it takes seconds, and most runs never evaluate.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_TASKS = ["codecllm_cloze", "codecllm_mc", "codecllm_ppl", "codecllm_qa"]


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: int | None,
    include_path: str | Path | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
) -> dict[str, dict]:
    """Run lm-eval `tasks` (names of tasks or groups) on an in-memory HF causal LM; per-task metrics and samples.

    Call it with the same tasks, limit, batch_size and max_length in both phases: lm-eval batches the requests
    of all tasks together, and a different batch (padding, matmul shapes) changes the last bits of the logits.
    Side effects of lm-eval: the model is put in eval mode; python, numpy and torch RNGs are seeded (0/1234/1234).
    """
    tasks = list(tasks)
    manager = _task_manager(tasks, include_path)

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    # HFLM calls model.tie_weights() on the object it is given. After the compressed swap that would graft the
    # dense embedding matrix back onto a compressed (tied) lm_head and make the check compare dense against dense.
    # The model was tied when it was loaded; shadow the method while HFLM is built.
    model.tie_weights = lambda *args, **kwargs: None
    try:
        # softmax_dtype: by default log-probs are summed in the model dtype; for bf16 that rounds a passage's
        # log-likelihood to a few units, hiding most logit differences. fp32 keeps the check sensitive.
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            softmax_dtype=torch.float32,
        )
    finally:
        del model.tie_weights
    try:
        # Response caching stays off (use_cache=None): the compressed run must really run the model.
        out = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=limit, bootstrap_iters=0, log_samples=True
        )
    except ConnectionError as err:  # a task whose data is on the hub, with no network or HF_DATASETS_OFFLINE=1
        raise HarnessError(
            f"could not load the data of lm-eval tasks {tasks} (no network, or HF_DATASETS_OFFLINE=1 without a cached "
            f"copy; the bundled codecllm_* tasks need neither): {err}"
        ) from err

    return {
        task: {
            "output_type": out["configs"][task]["output_type"],
            "metrics": _metrics(out["results"].get(task, {})),
            "samples": _samples(samples),
        }
        for task, samples in out["samples"].items()  # leaf tasks only: groups are expanded
    }


def _task_manager(tasks: list[str], include_path: str | Path | None):
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise HarnessError("no lm-eval tasks given; bundled: " + ", ".join(bundled_tasks()))
    paths = [TASKS_DIR]
    if include_path:
        if not Path(include_path).is_dir():
            raise HarnessError(f"eval include_path '{include_path}' is not a directory of lm-eval task YAMLs")
        paths.append(Path(include_path).resolve())
    manager = TaskManager(include_path=paths, include_defaults=False)
    if any(t not in manager.all_tasks for t in tasks):
        # Indexing lm-eval's own ~15k task YAMLs takes 7-11 s: only when a name is not one of ours.
        manager = TaskManager(include_path=paths, include_defaults=True)
    for task in tasks:
        if task not in manager.all_tasks:
            close = difflib.get_close_matches(task, manager.all_tasks, n=3, cutoff=0.6)
            hint = (
                f"Did you mean {', '.join(repr(c) for c in close)}?"
                if close
                else "`lm-eval ls tasks` lists all it knows."
            )
            raise HarnessError(f"unknown lm-eval task '{task}'; bundled: {', '.join(bundled_tasks())}. {hint}")
    return manager


def bundled_tasks() -> list[str]:
    """Names of the tasks and groups shipped in harness/tasks (read from their YAMLs, without lm_eval)."""
    import yaml

    names = []
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        # BaseLoader: the `!function` tags need no resolving just to read a name.
        cfg = yaml.load(path.read_text(), Loader=yaml.BaseLoader)
        names.append(cfg.get("group") or cfg["task"])
    return names


def _metrics(result: dict) -> dict[str, float]:
    # lm-eval keys are "metric,filter"; with bootstrap_iters=0 every stderr is "N/A", so stderrs are dropped.
    metrics = {}
    for key, value in result.items():
        name, sep, filt = key.partition(",")
        if not sep or name.endswith("_stderr") or isinstance(value, (str, bool)) or value is None:
            continue
        metrics[name if filt == "none" else key] = float(value)
    return metrics


def _samples(samples: list[dict]) -> list[dict]:
    records: dict[int, dict] = {}
    for s in samples:
        # With several filters (e.g. strict/flexible answer extraction) a doc repeats once per filter with the same
        # raw responses; the model's output is what compression can change, so keep one record per doc.
        if s["doc_id"] in records:
            continue
        lls, greedy, gens = [], [], []
        for resp in s["resps"]:  # one entry per request (per choice), each a list over repeats
            for r in resp:
                if isinstance(r, str):  # generate_until
                    gens.append(r)
                elif isinstance(r, (tuple, list)):  # loglikelihood, multiple_choice: (logprob, is_greedy)
                    lls.append(float(r[0]))
                    greedy.append(bool(r[1]))
                else:  # loglikelihood_rolling
                    lls.append(float(r))
        args = json.dumps(s["arguments"], default=str, ensure_ascii=False)
        records[s["doc_id"]] = {
            "doc_id": int(s["doc_id"]),
            "args_hash": hashlib.sha256(args.encode()).hexdigest()[:16],
            "loglikelihoods": lls,
            "greedy": greedy,
            "generations": gens,
        }
    return [records[k] for k in sorted(records)]


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _abs_diff(a: float, b: float) -> float:
    if _same(a, b):
        return 0.0
    d = abs(a - b)
    return math.inf if math.isnan(d) else d  # inf - inf or a NaN on one side: as different as it gets


def compare(baseline: dict[str, dict], compressed: dict[str, dict]) -> dict:
    """Per-task comparison of two `evaluate` results; verdict "identical" only if every per-sample value is equal."""
    identical = True
    tasks = {}
    for task in [*baseline, *(t for t in compressed if t not in baseline)]:
        b, c = baseline.get(task), compressed.get(task)
        bm, cm = (b or {}).get("metrics", {}), (c or {}).get("metrics", {})
        bs = {r["doc_id"]: r for r in (b or {}).get("samples", [])}
        cs = {r["doc_id"]: r for r in (c or {}).get("samples", [])}
        ids = sorted(bs.keys() | cs.keys())
        prompts_matched = b is not None and c is not None
        differing = greedy_diff = gen_diff = 0
        max_diff = 0.0
        for i in ids:
            rb, rc = bs.get(i), cs.get(i)
            if (
                rb is None
                or rc is None
                or rb["args_hash"] != rc["args_hash"]
                or any(len(rb[k]) != len(rc[k]) for k in ("loglikelihoods", "greedy", "generations"))
            ):
                prompts_matched = False
                differing += 1
                continue
            # _abs_diff is 0.0 exactly when the two floats are equal (IEEE: x - y == 0 iff x == y).
            lls = [_abs_diff(x, y) for x, y in zip(rb["loglikelihoods"], rc["loglikelihoods"], strict=True)]
            g = sum(x != y for x, y in zip(rb["greedy"], rc["greedy"], strict=True))
            t = sum(x != y for x, y in zip(rb["generations"], rc["generations"], strict=True))
            max_diff = max([max_diff, *lls])
            greedy_diff += g
            gen_diff += t
            differing += bool(any(lls) or g or t)
        identical = identical and prompts_matched and differing == 0
        tasks[task] = {
            "baseline": bm,
            "compressed": cm,
            "metric_diff": {k: cm[k] - bm[k] for k in bm if k in cm},
            "max_abs_loglikelihood_diff": max_diff,
            "samples_differing": differing,
            "samples": len(ids),
            "greedy_flags_differing": greedy_diff,
            "generations_differing": gen_diff,
            "all_prompts_matched": prompts_matched,
        }
    return {"verdict": "identical" if identical else "different", "tasks": tasks}


def per_sample_table(baseline: dict[str, dict], compressed: dict[str, dict]) -> list[dict]:
    """One row per request (a choice, a passage, a generation) of every doc, both phases side by side.

    Columns keep one type each (W&B tables reject mixed columns): log-likelihoods in baseline/compressed/abs_diff,
    generated text in baseline_text/compressed_text, the other pair None.
    """
    rows = []
    for task in [*baseline, *(t for t in compressed if t not in baseline)]:
        bs = {r["doc_id"]: r for r in baseline.get(task, {}).get("samples", [])}
        cs = {r["doc_id"]: r for r in compressed.get(task, {}).get("samples", [])}
        for i in sorted(bs.keys() | cs.keys()):
            rb, rc = bs.get(i), cs.get(i)
            same_args = rb is not None and rc is not None and rb["args_hash"] == rc["args_hash"]

            def pick(r: dict | None, key: str, j: int):
                return r[key][j] if r is not None and j < len(r[key]) else None

            n_ll = max(len(r["loglikelihoods"]) for r in (rb, rc) if r is not None)
            for j in range(n_ll):
                x, y = pick(rb, "loglikelihoods", j), pick(rc, "loglikelihoods", j)
                gx, gy = pick(rb, "greedy", j), pick(rc, "greedy", j)
                both = x is not None and y is not None
                rows.append(
                    {
                        "task": task,
                        "doc_id": i,
                        "request": j,
                        "baseline": x,
                        "compressed": y,
                        "abs_diff": _abs_diff(x, y) if both else None,
                        "baseline_text": None,
                        "compressed_text": None,
                        "match": bool(same_args and both and _same(x, y) and gx == gy),
                    }
                )
            n_gen = max(len(r["generations"]) for r in (rb, rc) if r is not None)
            for j in range(n_gen):
                x, y = pick(rb, "generations", j), pick(rc, "generations", j)
                rows.append(
                    {
                        "task": task,
                        "doc_id": i,
                        "request": j,
                        "baseline": None,
                        "compressed": None,
                        "abs_diff": None,
                        "baseline_text": x,
                        "compressed_text": y,
                        "match": bool(same_args and x is not None and x == y),
                    }
                )
    return rows
