"""One API-key lookup for the server and its clients, and the key never in a config dict."""

from __future__ import annotations

import pytest

from tinyqa.config import build_config
from tinyqa.secrets import API_KEY_ENV, resolve_api_key


def test_precedence_flag_then_config_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert resolve_api_key(None) is None  # nothing anywhere: an open endpoint
    assert resolve_api_key("", flag="") is None  # empty strings are unset
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert resolve_api_key(None) == "from-env"
    assert resolve_api_key("from-config") == "from-config"
    assert resolve_api_key("from-config", flag="from-flag") == "from-flag"
    assert resolve_api_key(None, flag="from-flag") == "from-flag"


def test_config_dict_never_carries_the_key() -> None:
    cfg = build_config({"serve": {"api_key": "s3cret", "port": 8123}})
    assert cfg.serve.api_key == "s3cret"
    data = cfg.to_dict()
    assert "api_key" not in data["serve"] and data["serve"]["port"] == 8123
    assert "s3cret" not in repr(data)
    assert build_config(data).serve.api_key is None  # the dict still validates on the far side
