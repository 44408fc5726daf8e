"""`tinyqa runs`: experiments, stages, adapters, best.json and the endpoint, from the files."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tinyqa.cli import main
from tinyqa.config import load_config
from tinyqa.runs import collect_runs, format_runs


def _adapter(run, adapter_id, eval_loss, created):
    folder = run / "adapters" / adapter_id
    folder.mkdir(parents=True)
    (folder / "tinyqa.json").write_text(
        json.dumps(
            {
                "adapter_id": adapter_id,
                "base_model": "tiny",
                "created": created,
                "metrics": {"eval_loss": eval_loss, "eval_loss_initial": 3.6, "steps": 60},
            }
        )
    )


@pytest.fixture
def get_free_port():
    def free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return free


@pytest.fixture
def storage(tmp_path):
    root = tmp_path / "runs"
    demo = root / "tiny-demo"
    _adapter(demo, "trial-00-r4-lr1.0e-03", 3.1, "2026-12-02T10:00:00Z")
    _adapter(demo, "trial-01-r8-lr3.0e-03", 2.9, "2026-12-02T10:05:00Z")
    (demo / "best.json").write_text(
        json.dumps({"adapter_id": "trial-01-r8-lr3.0e-03", "metric": "eval_loss", "value": 2.9})
    )
    state = {
        "prepare": {"status": "done", "seconds": 3.0},
        "tune": {"status": "done", "seconds": 200.0},
    }
    (demo / "pipeline.json").write_text(json.dumps(state))
    other = root / "solo"
    _adapter(other, "solo", 3.3, "2026-12-01T09:00:00Z")
    (root / "not-an-experiment").mkdir()
    return root


@pytest.fixture
def endpoint():
    """A stand-in endpoint whose /healthz names a default and a loaded adapter."""

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(
                {
                    "status": "ok",
                    "base_model": "tiny",
                    "default_adapter": "trial-01-r8-lr3.0e-03",
                    "loaded_adapters": ["trial-00-r4-lr1.0e-03"],
                }
            ).encode()
            self.send_response(200 if self.path == "/healthz" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def _cfg(storage, port, repo_root):
    return load_config(
        repo_root / "jobs/configs/tiny-cpu.yaml", [f"storage_path={storage}", f"serve.port={port}"]
    )


def test_lists_experiments_stages_adapters_and_best(storage, repo_root, get_free_port):
    runs = collect_runs(_cfg(storage, get_free_port(), repo_root))
    names = [e["experiment"] for e in runs["experiments"]]
    assert names == ["solo", "tiny-demo"]
    demo = runs["experiments"][1]
    assert {s for s, v in demo["stages"].items() if v["status"] == "done"} == {"prepare", "tune"}
    adapters = {a["adapter_id"]: a for a in demo["adapters"]}
    assert adapters["trial-01-r8-lr3.0e-03"]["best"] is True
    assert adapters["trial-00-r4-lr1.0e-03"]["best"] is False
    assert adapters["trial-01-r8-lr3.0e-03"]["metrics"]["eval_loss"] == 2.9
    assert adapters["trial-01-r8-lr3.0e-03"]["base_model"] == "tiny"
    # Nothing listens on the port: no endpoint, nothing serving.
    assert demo["endpoint"] is None and all(a["serving"] is None for a in demo["adapters"])


def test_marks_what_the_live_endpoint_serves(storage, repo_root, endpoint):
    runs = collect_runs(_cfg(storage, endpoint, repo_root))
    demo = next(e for e in runs["experiments"] if e["experiment"] == "tiny-demo")
    solo = next(e for e in runs["experiments"] if e["experiment"] == "solo")
    assert demo["endpoint"] == f"http://127.0.0.1:{endpoint}"
    serving = {a["adapter_id"]: a["serving"] for a in demo["adapters"]}
    assert serving == {"trial-01-r8-lr3.0e-03": "default", "trial-00-r4-lr1.0e-03": "loaded"}
    # Another experiment is not claimed by the configured experiment's endpoint.
    assert solo["endpoint"] is None
    text = format_runs(runs)
    assert "trial-01-r8-lr3.0e-03 (eval_loss 2.9)" in text and "default" in text
    assert "3.600 -> 2.900" in text


def test_cli_table_and_json(storage, repo_root, get_free_port, capsys):
    port = get_free_port()
    assert main(["runs", f"storage_path={storage}", f"serve.port={port}"]) == 0
    out = capsys.readouterr().out
    assert "tiny-demo" in out and "solo" in out and "prepare,tune" in out
    assert main(["runs", "--json", f"storage_path={storage}", f"serve.port={port}"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [e["experiment"] for e in data["experiments"]] == ["solo", "tiny-demo"]
    assert data["endpoints"] == {f"http://127.0.0.1:{port}": None}


def test_empty_storage_says_how_to_fill_it(tmp_path, repo_root, get_free_port, capsys):
    assert main(["runs", f"storage_path={tmp_path / 'none'}", f"serve.port={get_free_port()}"]) == 0
    assert "no experiments under" in capsys.readouterr().out


def test_half_written_run_is_listed_not_fatal(storage, repo_root, get_free_port):
    (storage / "tiny-demo" / "pipeline.json").write_text("{not json")
    runs = collect_runs(_cfg(storage, get_free_port(), repo_root))
    demo = next(e for e in runs["experiments"] if e["experiment"] == "tiny-demo")
    assert demo["stages"] == {} and len(demo["adapters"]) == 2
