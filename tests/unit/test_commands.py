"""The command table: the CLI and the jobs run the same commands, every import path in it resolves,
and the library reaches serving / benchmarks only through those paths."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tinyqa import commands
from tinyqa.cli import build_job_parser, build_parser, main
from tinyqa.commands import COMMANDS, Command, CommandImportError, load


def _import_paths() -> set[str]:
    """Every ``"module:attribute"`` literal in commands.py (targets, summaries' formatters, ...)."""
    source = Path(commands.__file__).read_text()
    pattern = r"[\"']((?:tinyqa|serving|benchmarks)[\w.]*:[A-Za-z_]\w*)[\"']"
    return set(re.findall(pattern, source))


def test_every_import_path_in_the_table_resolves():
    paths = _import_paths()
    # The ones a reader expects, so the regex cannot silently find nothing.
    assert {
        "serving.deploy:deploy",
        "benchmarks:run_bench",
        "tinyqa.training:run_training",
    } <= paths
    assert {c.target for c in COMMANDS.values()} <= paths
    for path in sorted(paths):
        assert callable(load(path)), path


def test_bench_suites_match_the_benchmarks_package():
    from benchmarks import SUITES

    assert tuple(SUITES) == commands.BENCH_SUITES


def _options(parser: argparse.ArgumentParser) -> list[tuple]:
    return sorted(
        (tuple(a.option_strings) or (a.dest,), a.nargs, a.choices and tuple(a.choices), a.default)
        for a in parser._actions
        if not isinstance(a, argparse._HelpAction)
    )


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_each_job_runs_its_command_with_the_same_arguments(repo_root):
    jobs = {p.stem: p for p in (repo_root / "jobs").glob("*.py")}
    by_job = {c.job: c for c in COMMANDS.values() if c.job}
    assert set(jobs) == set(by_job), "every jobs/*.py has exactly one command in the table"
    for job, path in jobs.items():
        command = by_job[job]
        assert f'run_job("{command.name}")' in path.read_text(), path
        assert _options(build_job_parser(command)) == _options(_subparser(command.name)), job


def test_every_subcommand_takes_config_and_overrides():
    for name in COMMANDS:
        flags = {s for a in _subparser(name)._actions for s in a.option_strings}
        dests = {a.dest for a in _subparser(name)._actions}
        assert {"--config", "--verbose"} <= flags and "overrides" in dests, name


def test_load_errors_name_the_path_and_the_fix(monkeypatch):
    with pytest.raises(CommandImportError, match="not of the form 'module:attribute'"):
        load("serving.deploy")
    with pytest.raises(CommandImportError, match="has no attribute 'nope'"):
        load("tinyqa.config:nope")
    monkeypatch.setitem(sys.modules, "benchmarks", None)  # as if only tinyqa were installed
    with pytest.raises(CommandImportError, match="cannot import 'benchmarks'.*tinyqa checkout"):
        load("benchmarks:run_bench")


def test_load_names_a_missing_dependency(monkeypatch, tmp_path):
    (tmp_path / "needs_dep.py").write_text("import no_such_dependency_xyz\nrun = print\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(CommandImportError, match="provides 'no_such_dependency_xyz'"):
        load("needs_dep:run")


def test_missing_benchmarks_package_is_a_one_line_user_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "benchmarks", None)
    code = main(["bench", "gpu", "--quick", f"storage_path={tmp_path}"])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("tinyqa bench: error: cannot import 'benchmarks'")
    assert err.count("\n") == 1


def test_bench_endpoint_only_for_the_serve_suite(capsys, tmp_path):
    code = main(["bench", "train", "--endpoint", "http://x", f"storage_path={tmp_path}"])
    assert code == 2
    assert "--endpoint applies to the serve suite only" in capsys.readouterr().err


def test_execute_returns_summary_or_the_commands_own_exit_code(make_config):
    cfg, args = make_config(), argparse.Namespace()
    summarized = Command(
        "x",
        "h",
        "json:dumps",
        call=lambda fn, cfg, args: fn({"a": 1}),
        summary=lambda result, cfg, args: f"got {result}",
    )
    assert summarized.execute(cfg, args) == (0, 'got {"a": 1}')
    interactive = Command("y", "h", "operator:index", call=lambda fn, cfg, args: fn(3))
    assert interactive.execute(cfg, args) == (3, None)


def test_job_user_mistake_is_one_line_exit_2(repo_root, tmp_path):
    proc = subprocess.run(
        [sys.executable, "jobs/train.py", "lora.r=0", f"storage_path={tmp_path}"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "lora.r" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not any(tmp_path.iterdir())
