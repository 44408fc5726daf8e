"""Local clusters tinyqa starts: loopback-only command line, a private token, and a token
refusal reported as such (never read as "no cluster, start one"). No Ray cluster is started here;
tests/integration/test_local_cluster.py checks the real sockets."""

from __future__ import annotations

import stat

import pytest

from tinyqa import cluster
from tinyqa.config import build_config


def test_local_cluster_command_binds_every_address_to_loopback():
    cmd = cluster.local_cluster_command(2, port=6500, temp_dir="/tmp/x", client_port=10101)
    assert "--node-ip-address=127.0.0.1" in cmd and "--dashboard-host=127.0.0.1" in cmd
    assert "--port=6500" in cmd and "--ray-client-server-port=10101" in cmd
    assert not any("0.0.0.0" in part for part in cmd)


def test_a_missing_token_is_created_private(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster, "_TOKEN_FILE", tmp_path / ".ray" / "auth_token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    where = cluster.ensure_auth_token()
    token = tmp_path / ".ray" / "auth_token"
    assert where == str(token) and len(token.read_text()) == 64
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    first = token.read_text()
    token.chmod(0o644)  # e.g. written by Ray's own generator under a 022 umask
    cluster.ensure_auth_token()
    assert token.read_text() == first and stat.S_IMODE(token.stat().st_mode) == 0o600


def test_an_empty_token_path_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "none"))
    with pytest.raises(cluster.ClusterAuthError, match="holds no token"):
        cluster.ensure_auth_token()


def _refusal() -> ConnectionError:
    """What Ray 2.60's ray.init raises for a wrong or missing token (measured)."""
    try:
        try:
            raise RuntimeError(
                "Failed to connect to GCS. Last connection error: ... ray.exceptions."
                "AuthenticationError: RPC error: InvalidAuthToken: Authentication token is missing"
            )
        except RuntimeError as e:
            raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6500") from e
    except ConnectionError as e:
        return e


def test_token_refusals_are_told_apart_from_no_cluster():
    assert cluster._is_auth_error(_refusal())
    assert not cluster._is_auth_error(ConnectionError("Could not find any running Ray instance"))


@pytest.mark.parametrize("address", [None, "127.0.0.1:6500"])
def test_connect_reports_a_refusal_and_starts_no_second_cluster(address, monkeypatch):
    import ray

    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: (_ for _ in ()).throw(_refusal()))
    monkeypatch.setattr(cluster, "start_private", lambda *a, **k: started.append(a))
    monkeypatch.setattr(cluster, "_keep_loopback", lambda address: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(cluster.ClusterAuthError) as err:
        cluster.connect(build_config({"ray_address": address}))
    assert "refused the connection for token auth" in str(err.value)
    assert "RAY_AUTH_TOKEN_PATH" in str(err.value) and "\n" not in str(err.value)
    assert started == []


def test_connect_still_starts_a_cluster_when_none_runs(monkeypatch):
    import ray

    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def init(**kwargs):
        raise ConnectionError("Could not find any running Ray instance")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(cluster, "start_private", lambda *a, **k: started.append(a))
    monkeypatch.setattr(cluster, "_keep_loopback", lambda address: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster.connect(build_config({}))
    assert len(started) == 1
