"""python -m harness.report.wandb_workspace: a W&B report (or saved workspace view) of one sweep's runs.

    python -m harness.report.wandb_workspace outputs/multirun/2025-01-01/12-00-00   # group/project from the jobs
    python -m harness.report.wandb_workspace --group sweep-2025-01-01-12-00-00 [--project P] [--entity E]
    ... --kind workspace    # a saved workspace view of the project instead of a report
    ... --print             # build it offline and print its spec as JSON; saves nothing

Every job of a sweep is a W&B run in one group (harness.tracking), so the report is the runs of that group:
scatter plots of tokens/s, slowdown, peak memory and decompressions per pass against the compressed layers,
bar plots per run and per cache policy, a parallel-coordinates plot over the flat config keys
(model_name, codec, cache_policy, layers) and the results, and a run comparer.

Needs `pip install 'codecllm-harness[wandb-report]'` (wandb-workspaces), a W&B login and the network. Offline
(WANDB_MODE=offline, no API key, W&B unreachable) it says so in one line and exits 2. Runs logged offline
(the default) must be uploaded first: `wandb sync DIR/*/wandb/offline-run-*`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from harness.errors import HarnessError
from harness.report.collect import find_job_dirs, read_results
from harness.schema import panel_keys, wandb_key

EXIT_OFFLINE = 2

# W&B summary keys written by harness.tracking (results.json sections, flattened with "/"): looked up in the
# schema, so a renamed field fails here at import instead of plotting nothing.
LAYERS = wandb_key("compressed/layers_compressed")
TOK_S = wandb_key("{side}/tokens_per_s", "compressed")
BASE_TOK_S = wandb_key("{side}/tokens_per_s", "baseline")
SLOWDOWN = wandb_key("comparison/slowdown")
PEAK = wandb_key("{side}/memory/peak_bytes", "compressed")
BASE_PEAK = wandb_key("{side}/memory/peak_bytes", "baseline")
DECOMP_PER_PASS = wandb_key("compressed/decompressions_per_forward_pass")
RATIO = wandb_key("compressed/compression_ratio")
# Flat config keys (harness.tracking.FLAT_KEYS); the policy is what panels and the second run set group by.
GROUP_KEY = "cache_policy"
CONFIG_KEYS = ("model_name", "codec", "cache_policy", "layers")


class Offline(Exception):
    """W&B cannot be reached from here: the message says why."""


def sweep_target(sweep_dir: Path) -> dict[str, Any]:
    """group/project/entity the sweep's jobs logged to, from their results.json (config.logger)."""
    for job_dir in find_job_dirs(sweep_dir):
        results, _ = read_results(job_dir)
        logger = (results.get("config") or {}).get("logger") or {}
        if logger.get("group"):
            return {k: logger.get(k) for k in ("group", "project", "entity")}
    raise HarnessError(f"no job under {str(sweep_dir)!r} logged to a W&B group (run the sweep with logger=wandb)")


def build_panels(wr: Any) -> tuple[list[Any], list[Any]]:
    """(panels per run, panels of the run set grouped by cache policy), laid out 3 across. W&B line plots need a
    history x-axis; a sweep's numbers are per-run summaries, so "vs layers" is a scatter plot, one point a run."""
    s = wr.SummaryMetric

    def scatter(y: str, title: str) -> Any:
        return wr.ScatterPlot(title=title, x=s(LAYERS), y=s(y))

    per_run = [
        scatter(TOK_S, "compressed tokens/s vs compressed layers"),
        scatter(SLOWDOWN, "slowdown vs compressed layers"),
        scatter(PEAK, "compressed peak memory (bytes) vs compressed layers"),
        scatter(DECOMP_PER_PASS, "decompressions per forward pass vs compressed layers"),
        wr.BarPlot(title="tokens/s, baseline and compressed", metrics=[BASE_TOK_S, TOK_S]),
        wr.BarPlot(title="peak memory (bytes), baseline and compressed", metrics=[BASE_PEAK, PEAK]),
        wr.BarPlot(
            title="slowdown per cache policy (mean)",
            metrics=[SLOWDOWN],
            groupby=wr.Config(GROUP_KEY),
            groupby_aggfunc="mean",
        ),
        wr.BarPlot(
            title="decompressions per pass per cache policy (mean)",
            metrics=[DECOMP_PER_PASS],
            groupby=wr.Config(GROUP_KEY),
            groupby_aggfunc="mean",
        ),
        wr.BarPlot(title="compression ratio", metrics=[RATIO]),
    ]
    _grid(wr, per_run)
    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k)) for k in CONFIG_KEYS]
    # every schema field with a `panel` axis name (harness.schema.FIELDS)
    columns += [wr.ParallelCoordinatesPlotColumn(metric=s(k), display_name=name) for k, name in panel_keys()]
    y = 6 * ((len(per_run) + 2) // 3)
    per_run.append(
        wr.ParallelCoordinatesPlot(title="config -> results", columns=columns, layout=wr.Layout(x=0, y=y, w=24, h=8))
    )
    per_run.append(wr.RunComparer(diff_only="split", layout=wr.Layout(x=0, y=y + 8, w=24, h=10)))

    grouped = [
        scatter(TOK_S, "compressed tokens/s vs compressed layers, per cache policy"),
        scatter(SLOWDOWN, "slowdown vs compressed layers, per cache policy"),
        scatter(PEAK, "compressed peak memory vs compressed layers, per cache policy"),
    ]
    _grid(wr, grouped)
    return per_run, grouped


def _grid(wr: Any, panels: list[Any], w: int = 8, h: int = 6) -> None:
    for i, p in enumerate(panels):
        p.layout = wr.Layout(x=(i % 3) * w, y=(i // 3) * h, w=w, h=h)


def build_report(group: str, project: str, entity: str, sweep_dir: Path | None = None) -> Any:
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    def runset(name: str, groupby: list[str]) -> Any:
        return wr.Runset(
            entity=entity,
            project=project,
            name=name,
            filters=[expr.Metric("Group") == group],
            groupby=groupby,
            order=[wr.OrderBy(name="CreatedTimestamp", ascending=True)],
        )

    per_run, grouped = build_panels(wr)
    where = f" (sweep dir `{sweep_dir}`)" if sweep_dir else ""
    return wr.Report(
        entity=entity,
        project=project,
        title=f"Sweep {group}"[:128],
        description=f"codecllm harness sweep: the runs of W&B group {group}{where}.",
        width="fluid",
        blocks=[
            wr.P(
                f"One run per Hydra job of group {group}{where}, named after the overrides the sweep varies. "
                "Config keys to group and filter by: model_name, codec, cache_policy, layers (and the nested "
                "config, e.g. compress.layers). The same numbers as comparison.csv and dashboard.html in the sweep dir."
            ),
            wr.H2("Per run"),
            wr.PanelGrid(runsets=[runset(group, [])], panels=per_run),
            wr.H2("Grouped by cache policy"),
            wr.PanelGrid(runsets=[runset(f"{group} by {GROUP_KEY}", [f"config.{GROUP_KEY}"])], panels=grouped),
        ],
    )


def build_workspace(group: str, project: str, entity: str) -> Any:
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    per_run, grouped = build_panels(wr)
    return ws.Workspace(
        entity=entity,
        project=project,
        name=f"Sweep {group}",
        sections=[
            ws.Section(name=f"Sweep {group}", panels=per_run, is_open=True),
            ws.Section(name="Per cache policy", panels=grouped, is_open=True),
        ],
        runset_settings=ws.RunsetSettings(filters=[expr.Metric("Group") == group]),
    )


def check_online(timeout: float) -> Any:
    """A logged-in wandb.Api once the W&B server answers, or Offline saying what is missing. The server is
    tried first with a plain connection: wandb.Api() would spend its whole retry budget on a dead network."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        raise Offline(f"WANDB_MODE={mode}")
    import wandb
    from wandb import env
    from wandb.sdk import wandb_setup

    url = urlparse(env.get_base_url(wandb_setup.singleton().settings.base_url))
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise Offline(f"{host}:{port} unreachable: {type(e).__name__}: {e}") from None
    try:
        return wandb.Api(timeout=int(timeout))
    except wandb.errors.UsageError:
        raise Offline("no W&B API key: `wandb login`, or set WANDB_API_KEY") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.report.wandb_workspace",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep_dir", nargs="?", help="a sweep dir whose jobs ran with logger=wandb")
    parser.add_argument("--group", help="W&B group of the sweep (default: from the sweep dir's jobs)")
    parser.add_argument("--project", help="W&B project (default: the jobs' logger.project, else codecllm)")
    parser.add_argument("--entity", help="W&B entity (default: the jobs' logger.entity, else your default entity)")
    parser.add_argument("--kind", choices=("report", "workspace"), default="report")
    parser.add_argument(
        "--print",
        dest="print_only",
        action="store_true",
        help="print the spec (entity left blank) as JSON instead of saving it; works offline",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the W&B server")
    args = parser.parse_args(argv)
    if not args.sweep_dir and not args.group:
        parser.error("give a sweep dir or --group")

    sweep_dir = Path(args.sweep_dir) if args.sweep_dir else None
    try:
        if sweep_dir is not None and not sweep_dir.is_dir():
            raise HarnessError(f"sweep dir {str(sweep_dir)!r} does not exist or is not a directory")
        target = sweep_target(sweep_dir) if sweep_dir is not None and not args.group else {}
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    group = args.group or target["group"]
    project = args.project or target.get("project") or "codecllm"
    entity = args.entity or target.get("entity")

    try:
        import wandb_workspaces  # noqa: F401
    except ImportError:
        print("error: needs wandb-workspaces: pip install 'codecllm-harness[wandb-report]'", file=sys.stderr)
        return 2

    if args.print_only:
        # Without an entity: a report's run sets would look the project up on the server.
        built = _build(args.kind, group, project, "", sweep_dir)
        print(built._to_model().model_dump_json(by_alias=True, exclude_none=True, indent=1))
        return 0

    try:
        api = check_online(args.timeout)
        built = _build(args.kind, group, project, entity or api.default_entity, sweep_dir)
        built.save()
    except Offline as e:
        runs = f"{sweep_dir}/*/wandb/offline-run-*" if sweep_dir else "<job dir>/wandb/offline-run-*"
        print(
            f"error: a W&B {args.kind} needs the network and a W&B login ({e}); upload offline runs with "
            f"`wandb sync {runs}` and rerun this online, or open the sweep's dashboard.html",
            file=sys.stderr,
        )
        return EXIT_OFFLINE
    except Exception as e:  # the server said no: permissions, a project that is not there, ...
        print(
            f"error: W&B {args.kind} not saved: {type(e).__name__}: {' '.join(str(e).split())[:300]}", file=sys.stderr
        )
        return 1
    print(json.dumps({"kind": args.kind, "group": group, "project": project, "url": built.url}))
    return 0


def _build(kind: str, group: str, project: str, entity: str, sweep_dir: Path | None) -> Any:
    if kind == "workspace":
        return build_workspace(group, project, entity)
    return build_report(group, project, entity, sweep_dir)


if __name__ == "__main__":
    sys.exit(main())
