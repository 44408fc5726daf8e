"""One API-key lookup for the server and its clients, and the key never in a config dict."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import SecretStr

from tinyqa.config import build_config
from tinyqa.errors import ConfigError
from tinyqa.secrets import API_KEY_ENV, API_KEY_FILE_ENV, KeyDigest, resolve_api_key


def test_precedence_flag_then_config_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.delenv(API_KEY_FILE_ENV, raising=False)
    assert resolve_api_key(None) is None  # nothing anywhere: an open endpoint
    assert resolve_api_key("", flag="") is None  # empty strings are unset
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert resolve_api_key(None) == "from-env"
    assert resolve_api_key("from-config") == "from-config"
    assert resolve_api_key("from-config", flag="from-flag") == "from-flag"
    assert resolve_api_key(None, flag="from-flag") == "from-flag"


def test_config_dict_never_carries_the_key() -> None:
    cfg = build_config({"serve": {"api_key": "s3cret", "port": 8123}})
    assert cfg.serve.api_key.get_secret_value() == "s3cret"
    data = cfg.to_dict()
    assert "api_key" not in data["serve"] and data["serve"]["port"] == 8123
    assert "s3cret" not in repr(data)
    assert build_config(data).serve.api_key is None  # the dict still validates on the far side


def test_key_file_comes_after_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    key_file = tmp_path / "serve_api_key"
    key_file.write_text("from-file\n")  # a mounted secret usually ends with a newline
    monkeypatch.setenv(API_KEY_FILE_ENV, str(key_file))
    assert resolve_api_key(None) == "from-file"
    assert resolve_api_key(SecretStr("from-config")) == "from-config"
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert resolve_api_key(None) == "from-env"


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_a_named_key_file_must_hold_a_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str | None
) -> None:
    """Set but missing or empty is an error naming the file, never an open endpoint."""
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    key_file = tmp_path / "serve_api_key"
    if content is not None:
        key_file.write_text(content)
    monkeypatch.setenv(API_KEY_FILE_ENV, str(key_file))
    with pytest.raises(ConfigError, match=str(key_file)):
        resolve_api_key(None)


def test_the_key_is_a_secret_everywhere_a_config_shows(monkeypatch, caplog) -> None:
    cfg = build_config({"serve": {"api_key": "s3cret-value"}})
    assert isinstance(cfg.serve.api_key, SecretStr)
    assert "s3cret-value" not in repr(cfg) + str(cfg) + repr(cfg.serve) + str(cfg.model_dump())
    assert "s3cret-value" not in cfg.model_dump_json()
    logging.getLogger("tinyqa.test").warning("config %s / %r", cfg, cfg)
    assert "s3cret-value" not in caplog.text
    # A key YAML read as a number is refused without echoing it.
    with pytest.raises(ConfigError) as info:
        build_config({"serve": {"api_key": 123456789}})
    assert "123456789" not in str(info.value) and "quote" in str(info.value)


def test_digest_checks_the_key_without_holding_it() -> None:
    digest = KeyDigest.of("s3cret-value")
    assert digest.matches("s3cret-value")
    assert not digest.matches("s3cret-valu") and not digest.matches("")
    assert "s3cret-value" not in repr(digest) + str(digest.to_dict())
    again = KeyDigest.of("s3cret-value")
    assert again.salt != digest.salt and again.digest != digest.digest  # salted per deploy
    assert KeyDigest.from_dict(digest.to_dict()).matches("s3cret-value")
