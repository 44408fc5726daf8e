"""The import lines of docs/architecture.md, checked.

Each entry module is imported in a fresh interpreter (the test process has torch loaded already,
so only a new process can tell what a module pulls in), and the heavy packages it loaded are
compared with what its layer allows. A static walk checks that the library never imports the
packages built on top of it.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ray", "transformers", "peft")

_PROBE = (
    "import importlib, json, sys; importlib.import_module(sys.argv[1]); "
    f"print(json.dumps(sorted(m for m in {HEAVY} if m in sys.modules)))"
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _heavy_loaded(module: str) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, module],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"import {module} failed:\n{proc.stderr[-2000:]}"
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("tinyqa.cli", set()),
        ("tinyqa.adapters", set()),
        ("tinyqa.secrets", set()),
        ("tinyqa.errors", set()),
        ("tinyqa.config", set()),
        ("tinyqa.storage", set()),
        ("tinyqa.chat", set()),  # `chat --endpoint` is an HTTP client: no model stack
        ("tinyqa.console", set()),  # the CLI imports it; Ray loads only with a long command
        ("tinyqa.runs", set()),  # `tinyqa runs` reads files and /healthz
        ("tinyqa.tracking", set()),  # mlflow loads only when a run is tracked
        ("tinyqa.card", set()),  # model cards: huggingface_hub + YAML
        ("serving.api", set()),
        ("serving.deploy", {"ray"}),  # `tinyqa serve --shutdown` needs no model
        ("serving.ingress", {"ray"}),
    ],
)
def test_light_entry_modules_load_no_model_stack(module: str, allowed: set[str]) -> None:
    loaded = _heavy_loaded(module)
    assert loaded <= allowed, f"import {module} loaded {sorted(loaded - allowed)}"


def test_model_side_does_load_torch() -> None:
    """The probe can see a heavy import (so the checks above are not vacuous)."""
    assert {"torch", "ray"} <= _heavy_loaded("serving.replica")


def test_cli_help_loads_no_model_stack() -> None:
    """``python -m tinyqa.cli --help`` as a user runs it; ``-X importtime`` lists every module
    the interpreter imported, on stderr."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tinyqa.cli", "--help"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: tinyqa" in proc.stdout
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    assert "tinyqa" in imported  # the listing works
    assert imported.isdisjoint(HEAVY), sorted(imported & set(HEAVY))


# ----------------------------------------------------------------------------------------------
# the library never imports the layers above it
# ----------------------------------------------------------------------------------------------
FORBIDDEN = ("serving", "benchmarks", "jobs")


def _imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import statement, at any depth (lazy imports count)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def _upward_imports() -> list[str]:
    found = []
    for path in sorted((REPO / "tinyqa").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        found += [
            f"{rel}:{line} imports {pkg}"
            for line, pkg in _imported_packages(path)
            if pkg in FORBIDDEN
        ]
    return found


def test_library_never_imports_serving_benchmarks_or_jobs() -> None:
    """The CLI reaches serving / benchmarks by import-path strings (tinyqa/commands.py)."""
    assert _upward_imports() == []


def test_model_py_is_the_only_peft_user() -> None:
    """Loading, applying, saving and merging adapters all go through tinyqa/model.py."""
    users = [
        f"{path.relative_to(REPO).as_posix()}:{line}"
        for path in sorted((REPO / "tinyqa").rglob("*.py"))
        for line, pkg in _imported_packages(path)
        if pkg == "peft" and path.name != "model.py"
    ]
    assert users == []


def test_the_static_check_sees_lazy_imports(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from serving.deploy import deploy\n    import jobs.train\n")
    assert _imported_packages(sample) == [(2, "serving"), (3, "jobs")]


# ----------------------------------------------------------------------------------------------
# names that moved to the torch-free core are imported from there
# ----------------------------------------------------------------------------------------------
MOVED = {
    "MANIFEST",
    "BEST_FILE",
    "check_adapter_id",
    "read_manifest",
    "base_settings_from_manifest",
    "list_adapters",
    "resolve_adapter",
    "read_best",
    "ServingPlan",
    "serving_plan",
    "UnknownAdapter",
    "AdapterMismatch",
    "PromptTooLong",
}
OLD_HOMES = {"tinyqa.model", "tinyqa.inference", "tinyqa.evaluation"}


def test_moved_names_come_from_their_new_home() -> None:
    stale = []
    for top in ("tinyqa", "serving", "jobs", "tests", "benchmarks"):
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
                if isinstance(node, ast.ImportFrom) and node.module in OLD_HOMES:
                    stale += [
                        f"{rel}:{node.lineno} imports {alias.name} from {node.module}"
                        for alias in node.names
                        if alias.name in MOVED
                    ]
    assert stale == [], "import these from tinyqa.adapters / tinyqa.errors: " + "; ".join(stale)
