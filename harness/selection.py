"""Which weight-bearing layers to compress: a count of linear layers with an order, or all, filtered by regexes;
optionally every (untied) embedding table as well."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from harness.errors import HarnessError

ORDERS = ("first", "last", "largest")


def conv1d_type() -> type | None:
    try:  # the GPT-2 family's transposed linear layer
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it today
        return None
    return Conv1D


def is_weight_linear(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


@dataclass
class Candidate:
    name: str
    module: nn.Module

    @property
    def numel(self) -> int:
        return self.module.weight.numel()

    @property
    def nbytes(self) -> int:
        w = self.module.weight
        return w.numel() * w.element_size()


@dataclass
class Selection:
    chosen: list[Candidate]
    total: int  # every weight-bearing linear layer in the model (Y of "X/Y")
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it cannot be compressed

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.chosen]


def _tied_owner(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> the first module path that owns it (shared parameters appear under several names)."""
    owners: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), name)
    return owners


def parse_count(layers: int | str) -> int | None:
    """None means all."""
    if isinstance(layers, str):
        if layers.strip().lower() == "all":
            return None
        try:
            layers = int(layers)
        except ValueError:
            raise HarnessError(f"compress.layers={layers!r} is not a count; use an integer >= 0 or 'all'") from None
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
        raise HarnessError(f"compress.layers={layers!r} is invalid; use an integer >= 0 or 'all'")
    return layers


def _compile(patterns: str | Sequence[str] | None, what: str) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise HarnessError(f"compress.{what} regex {p!r} is invalid: {e}") from None
    return out


def _refused(refuse: Callable[[tuple[int, ...], torch.dtype], str | None] | None, weight) -> str | None:
    # A Conv1D (GPT-2) stores [in, out]; the codec sees the weight as stored, which is what it would encode.
    return refuse(tuple(weight.shape), weight.dtype) if refuse is not None else None


def check_order(order: str) -> None:
    """compress.order, checked (before the model loads, and again by select_layers for direct callers)."""
    if order not in ORDERS:
        raise HarnessError(f"compress.order={order!r} is invalid; valid: {', '.join(ORDERS)}")


def select_layers(
    model: nn.Module,
    layers: int | str = "all",
    order: str = "first",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    embeddings: bool = False,
    refuse: Callable[[tuple[int, ...], torch.dtype], str | None] | None = None,
) -> Selection:
    """`layers` linear layers (a count or all) in `order`, then, with `embeddings`, every nn.Embedding whose
    table is not shared with another module (a tied input embedding is skipped with the reason). Embeddings do
    not take places in the count; they add to both X and Y of "X/Y". `refuse` (the codec's `Codec.refuse`) says
    why a weight cannot be stored: such a layer is skipped with that reason before counting, as a tied one is."""
    check_order(order)
    count = parse_count(layers)
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")

    owners = _tied_owner(model)
    all_linear = [(n, m) for n, m in model.named_modules() if is_weight_linear(m)]
    # A pattern that matches no layer is a typo, not a wish: refuse it before any phase runs. Embedding names
    # count even without `embeddings`, so excluding "embed" by habit stays harmless.
    names = [n for n, _ in all_linear] + [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    for what, patterns in (("include", inc), ("exclude", exc)):
        for p in patterns:
            if not any(p.search(n) for n in names):
                raise HarnessError(
                    f"compress.{what}={p.pattern!r} matches no layer of this model; names look like "
                    f"{', '.join(names[:2]) or 'none'} ({len(names)} in all)"
                )
    eligible: list[Candidate] = []
    skipped: dict[str, str] = {}
    for name, module in all_linear:
        owner = owners.get(id(module.weight), f"{name}.weight")
        if owner != f"{name}.weight":
            skipped[name] = f"weight tied to {owner} (compressing it would leave the other user dense)"
            continue
        if inc and not any(p.search(name) for p in inc):
            continue
        if exc and any(p.search(name) for p in exc):
            continue
        why = _refused(refuse, module.weight)
        if why:
            skipped[name] = why
            continue
        eligible.append(Candidate(name, module))

    if count is None:
        count = len(eligible)
    if count > len(eligible):
        first = next(iter(skipped.items()), None)
        why = f" ({len(skipped)} skipped, e.g. {first[0]}: {first[1]})" if first else ""
        raise HarnessError(
            f"compress.layers={count} but only {len(eligible)} of {len(all_linear)} linear layers are eligible{why}; "
            f"use at most {len(eligible)} or 'all'"
        )
    if order == "first":
        chosen = eligible[:count]
    elif order == "last":
        chosen = eligible[len(eligible) - count :]
    else:  # largest first; ties keep model order (sorted is stable)
        picked = set(id(c) for c in sorted(eligible, key=lambda c: -c.numel)[:count])
        chosen = [c for c in eligible if id(c) in picked]
    total = len(all_linear)
    if embeddings:
        uses: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            uses.setdefault(id(p), []).append(name)
        for name, module in model.named_modules():
            if not isinstance(module, nn.Embedding):
                continue
            total += 1
            others = [n for n in uses.get(id(module.weight), []) if n != f"{name}.weight"]
            if others:
                skipped[name] = (f"embedding table tied to {others[0]} (compressing it would leave that user dense; "
                                 "a tied table needs a chunked output layer, not built)")
            elif module.max_norm is not None:
                skipped[name] = "embedding with max_norm (its lookup rewrites the table)"
            elif (not inc or any(p.search(name) for p in inc)) and not (exc and any(p.search(name) for p in exc)):
                if why := _refused(refuse, module.weight):
                    skipped[name] = why
                else:
                    chosen.append(Candidate(name, module))
    return Selection(chosen=chosen, total=total, skipped=skipped)
