"""The API key of the HTTP endpoint: one lookup with one precedence, for the server and its clients.

Precedence (first non-empty wins):

1. an explicit value: ``--api-key`` on the command line, else ``serve.api_key`` in the config;
2. the environment variable ``$TINYQA_API_KEY``;
3. the file named by ``$TINYQA_API_KEY_FILE`` (a mounted secret; one trailing newline is dropped);
4. none: the endpoint is open, and clients send no ``Authorization`` header.

The Serve app (which key to require), ``tinyqa ask/chat --endpoint`` and the pipeline's query stage
(which key to send) all call :func:`resolve_api_key`, so a key set in one place works everywhere.

The key is never logged and never written into an artifact: ``serve.api_key`` is a pydantic
``SecretStr`` (masked in reprs, left out of ``TinyQAConfig.to_dict()`` and so of every manifest and
deployment argument). The Serve ingress is given only a :class:`KeyDigest` — a random salt and the
HMAC-SHA256 of the key under it — and checks each request's Bearer token against it in constant
time. The digest cannot be turned back into the key (short of guessing it: use a long random key,
e.g. ``python -c "import secrets; print(secrets.token_urlsafe(32))"``), and a new deploy gets a
new salt.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from tinyqa.errors import ConfigError

API_KEY_ENV = "TINYQA_API_KEY"
API_KEY_FILE_ENV = "TINYQA_API_KEY_FILE"


def _plain(value: SecretStr | str | None) -> str | None:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    return value or None


def _from_file(path: str) -> str:
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"${API_KEY_FILE_ENV} names {p}, which cannot be read ({type(e).__name__}); "
            f"mount the key file there or unset {API_KEY_FILE_ENV}"
        ) from e
    key = text.removesuffix("\n").removesuffix("\r")
    if not key.strip():
        raise ConfigError(
            f"${API_KEY_FILE_ENV} names {p}, which is empty; write the key into it or unset "
            f"{API_KEY_FILE_ENV} (an open endpoint needs neither variable)"
        )
    return key


def resolve_api_key(configured: SecretStr | str | None, flag: str | None = None) -> str | None:
    """The endpoint's Bearer key: ``flag`` (a command-line value), else ``configured``
    (``serve.api_key``), else ``$TINYQA_API_KEY``, else the contents of ``$TINYQA_API_KEY_FILE``,
    else None (no auth). Empty strings count as unset. Raises :class:`ConfigError` when
    ``$TINYQA_API_KEY_FILE`` is set but names an unreadable or empty file (never an open
    endpoint by accident)."""
    key = _plain(flag) or _plain(configured) or os.environ.get(API_KEY_ENV) or None
    if key is None and (path := os.environ.get(API_KEY_FILE_ENV)):
        key = _from_file(path)
    return key


@dataclass(frozen=True)
class KeyDigest:
    """What the server keeps of the key: a random salt and HMAC-SHA256(salt, key), in hex."""

    salt: str
    digest: str

    @classmethod
    def of(cls, key: str) -> KeyDigest:
        salt = secrets.token_bytes(16)
        return cls(salt.hex(), _mac(salt, key).hex())

    def matches(self, token: str) -> bool:
        """Whether ``token`` is the key (constant time in the token's content)."""
        return hmac.compare_digest(
            _mac(bytes.fromhex(self.salt), token), bytes.fromhex(self.digest)
        )

    def to_dict(self) -> dict[str, str]:
        return {"salt": self.salt, "digest": self.digest}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KeyDigest:
        return cls(str(data["salt"]), str(data["digest"]))


def _mac(salt: bytes, key: str) -> bytes:
    return hmac.new(salt, key.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
