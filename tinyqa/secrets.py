"""The API key of the HTTP endpoint: one lookup with one precedence, for the server and its clients.

Precedence (first non-empty wins):

1. an explicit value: ``--api-key`` on the command line, else ``serve.api_key`` in the config;
2. the environment variable ``$TINYQA_API_KEY``;
3. none: the endpoint is open, and clients send no ``Authorization`` header.

The Serve app (which key to require), ``tinyqa ask/chat --endpoint`` and the pipeline's query stage
(which key to send) all call :func:`resolve_api_key`, so a key set in one place works everywhere.
The key is never logged and never written into an artifact.
"""

from __future__ import annotations

import os

API_KEY_ENV = "TINYQA_API_KEY"


def resolve_api_key(configured: str | None, flag: str | None = None) -> str | None:
    """The endpoint's Bearer key: ``flag`` (a command-line value), else ``configured``
    (``serve.api_key``), else ``$TINYQA_API_KEY``, else None (no auth). Empty strings count as
    unset."""
    return flag or configured or os.environ.get(API_KEY_ENV) or None
