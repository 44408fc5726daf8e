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
        ("tinyqa.chat", set()),  # `chat --endpoint` is an HTTP client: no model stack
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
    code = (
        "import runpy, sys\n"
        "sys.argv = ['tinyqa', '--help']\n"
        "try:\n"
        "    runpy.run_module('tinyqa.cli', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        f"print(sorted(m for m in {HEAVY} if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: tinyqa" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# ----------------------------------------------------------------------------------------------
# the library never imports the layers above it
# ----------------------------------------------------------------------------------------------
FORBIDDEN = ("serving", "benchmarks", "jobs")
# Pending the command table of issue 13: the CLI wires `serve` / `demo` to serving by an
# import-path string there, and tinyqa/bench moves out to benchmarks/. Empty this set after the
# merge; the test then guards every file.
PENDING = {"tinyqa/cli.py", "tinyqa/bench/serve.py"}


def _imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import statement, at any depth (lazy imports count)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def _upward_imports(skip: set[str]) -> list[str]:
    found = []
    for path in sorted((REPO / "tinyqa").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel in skip:
            continue
        found += [
            f"{rel}:{line} imports {pkg}"
            for line, pkg in _imported_packages(path)
            if pkg in FORBIDDEN
        ]
    return found


def test_library_never_imports_serving_benchmarks_or_jobs() -> None:
    assert _upward_imports(PENDING) == []


@pytest.mark.xfail(
    reason="tinyqa/cli.py and tinyqa/bench/ import serving until the command table lands "
    "(issue 13); the integrator empties PENDING after the merge",
    strict=False,
)
def test_pending_files_never_import_serving_either() -> None:
    assert _upward_imports(set()) == []


def test_the_static_check_sees_lazy_imports(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from serving.deploy import deploy\n    import jobs.train\n")
    assert _imported_packages(sample) == [(2, "serving"), (3, "jobs")]
