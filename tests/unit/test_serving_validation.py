"""The Serve endpoint's HTTP contract without a cluster: parsing, limits, auth, adapter lookup,
response shapes, build_app arguments and the shipped serving/config.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from serving.api import (
    ApiError,
    AskRequest,
    ChatCompletionRequest,
    ModelCatalog,
    ask_generation,
    chat_chunk,
    chat_generation,
    chat_response,
    check_api_key,
    max_body_bytes,
    parse_body,
    read_body,
    served_device,
    sse,
)
from tinyqa.config import ServeSettings
from tinyqa.errors import ConfigError, PromptTooLong, UnknownAdapter
from tinyqa.secrets import KeyDigest

REPO = Path(__file__).resolve().parents[2]
JSON = "application/json"
LIMITS = ServeSettings(
    max_question_chars=50, max_new_tokens=8, max_new_tokens_cap=16, max_messages=3
)


def _parse(body, model=AskRequest, content_type=JSON):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_body(raw, content_type, model)


def _status(fn, *args) -> tuple[int, str]:
    with pytest.raises(ApiError) as info:
        fn(*args)
    return info.value.status, info.value.code


# ----- parsing -----
@pytest.mark.parametrize(
    ("raw", "content_type", "code"),
    [
        (b'{"question": ', JSON, "invalid_json"),
        (b"", JSON, "invalid_json"),
        (b'{"question": NaN}', JSON, "invalid_json"),
        (b'["a question"]', JSON, "invalid_json"),
        (b'{"question": "q"}', "text/plain", "invalid_content_type"),
        (b'{"question": "q"}', None, "invalid_content_type"),
        (b"question=q", "application/x-www-form-urlencoded", "invalid_content_type"),
        (b"\xff\xfe", JSON, "invalid_json"),
    ],
)
def test_malformed_bodies_are_400(raw, content_type, code):
    assert _status(_parse, raw, AskRequest, content_type) == (400, code)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "missing_field"),
        ({"question": ""}, "invalid_field"),
        ({"question": "   "}, "invalid_field"),
        ({"question": 42}, "invalid_field"),
        ({"question": "q", "max_new_tokens": "5"}, "invalid_field"),
        ({"question": "q", "max_new_tokens": 0}, "invalid_field"),
        ({"question": "q", "max_new_tokens": -3}, "invalid_field"),
        ({"question": "q", "max_new_tokens": 2.5}, "invalid_field"),
        ({"question": "q", "max_new_tokens": True}, "invalid_field"),
        ({"question": "q", "temperature": -0.1}, "invalid_field"),
        ({"question": "q", "temperature": 2.5}, "invalid_field"),
        ({"question": "q", "top_p": 0}, "invalid_field"),
        ({"question": "q", "top_p": 1.5}, "invalid_field"),
        ({"question": "q", "adapter": 7}, "invalid_field"),
        ({"question": "q", "promt": "typo"}, "unknown_field"),
    ],
)
def test_invalid_ask_fields_are_400(body, code):
    assert _status(_parse, body) == (400, code)


def test_error_message_names_the_field_and_value():
    with pytest.raises(ApiError) as info:
        _parse({"question": "q", "max_new_tokens": "5", "extra": 1})
    assert "'max_new_tokens'" in info.value.message and "'5'" in info.value.message
    assert "unknown field 'extra'" in info.value.message
    assert info.value.body() == {
        "error": {
            "message": info.value.message,
            "type": "invalid_request_error",
            "code": "invalid_field",
        }
    }


def test_valid_ask_applies_defaults():
    req = _parse({"question": "What is os.path?", "temperature": 1})  # an int is a valid float
    gen = ask_generation(req, LIMITS)
    assert gen.messages == [{"role": "user", "content": "What is os.path?"}]
    assert (gen.max_new_tokens, gen.temperature, gen.top_p, gen.seed) == (8, 1.0, 1.0, None)
    assert _parse({"question": "q"}, content_type="application/json; charset=utf-8").question == "q"


def test_ask_limits():
    too_long = _parse({"question": "x" * 51})
    assert _status(ask_generation, too_long, LIMITS) == (413, "prompt_too_long")
    over_cap = _parse({"question": "q", "max_new_tokens": 17})
    assert _status(ask_generation, over_cap, LIMITS) == (400, "invalid_field")
    assert (
        ask_generation(_parse({"question": "q", "max_new_tokens": 16}), LIMITS).max_new_tokens == 16
    )


# ----- chat -----
def _chat(**fields):
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], **fields}
    return _parse(body, ChatCompletionRequest)


def test_chat_multi_turn_and_text_parts():
    req = _chat(
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is "},
                    {"type": "text", "text": "json?"},
                ],
            },
            {"role": "assistant", "content": "A module."},
        ],
        max_tokens=4,
    )
    gen = chat_generation(req, LIMITS)
    assert [m["role"] for m in gen.messages] == ["system", "user", "assistant"]
    assert gen.messages[1]["content"] == "What is json?"
    assert gen.max_new_tokens == 4
    assert chat_generation(_chat(max_tokens=4, max_completion_tokens=6), LIMITS).max_new_tokens == 6


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"messages": []}, (400, "invalid_field")),
        ({"messages": [{"role": "tool", "content": "x"}]}, (400, "invalid_field")),
        ({"messages": [{"role": "user"}]}, (400, "missing_field")),
        ({"messages": [{"role": "user", "content": "  "}]}, (400, "invalid_field")),
        (
            {"messages": [{"role": "system", "content": "only a system prompt"}]},
            (400, "invalid_field"),
        ),
        ({"messages": [{"role": "user", "content": "x" * 51}]}, (413, "prompt_too_long")),
        ({"messages": [{"role": "user", "content": "q"}] * 4}, (413, "too_many_messages")),
        ({"max_tokens": 17}, (400, "invalid_field")),
        ({"max_tokens": 0}, (400, "invalid_field")),
        ({"temperature": -1}, (400, "invalid_field")),
        ({"n": 2}, (400, "invalid_field")),
        ({"stream": "yes"}, (400, "invalid_field")),
        ({"functions": []}, (400, "unknown_field")),
    ],
)
def test_invalid_chat_requests(fields, expected):
    def run():
        chat_generation(_chat(**fields), LIMITS)

    assert _status(run) == expected


def test_body_limit_covers_the_largest_valid_request():
    s = ServeSettings()
    biggest = {
        "messages": [{"role": "user", "content": "é" * s.max_question_chars}] * s.max_messages
    }
    assert len(json.dumps(biggest, ensure_ascii=False).encode()) < max_body_bytes(s)


# ----- auth -----
def test_api_key():
    digest = KeyDigest.of("s3cret")
    check_api_key(None, None)  # no key configured: open
    check_api_key("Bearer anything", None)
    check_api_key("Bearer s3cret", digest)
    check_api_key("bearer s3cret", digest)
    bad = (None, "", "Bearer", "Basic s3cret", "Bearer wrong", "Bearer s3cret2", "s3cret")
    for header in (*bad, "Bearer \udcff", "Bearer sécret"):
        with pytest.raises(ApiError) as info:
            check_api_key(header, digest)
        assert info.value.status == 401
        assert info.value.headers == {"WWW-Authenticate": "Bearer"}


# ----- adapter lookup -----
def _fake_adapter(root: Path, adapter_id: str, base: str = "tiny") -> None:
    (root / adapter_id).mkdir(parents=True)
    (root / adapter_id / "tinyqa.json").write_text(json.dumps({"base_model": base}))
    (root / adapter_id / "adapter_config.json").write_text("{}")
    (root / adapter_id / "adapter_model.safetensors").write_bytes(b"")


@pytest.fixture
def catalog(tmp_path):
    root = tmp_path / "adapters"
    _fake_adapter(root, "alpha")
    _fake_adapter(root, "beta.v2")
    _fake_adapter(root, "other", base="TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    _fake_adapter(tmp_path, "secret")  # outside the root: reachable only by a path
    (root / "broken").mkdir()
    (root / "broken" / "tinyqa.json").write_text(json.dumps({"base_model": "tiny"}))
    return ModelCatalog("tiny", root, "alpha")


def test_model_selection(catalog):
    assert catalog.select(None) == "alpha"  # the default adapter
    assert catalog.select("beta.v2") == "beta.v2"
    assert catalog.select("tiny") is None  # the base id = the base model
    assert ModelCatalog("tiny", catalog.adapter_root, None).select(None) is None


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("nope", 404),
        ("other", 404),  # exists, but trained on another base
        ("broken", 404),  # a folder without weights
        ("../secret", 400),
        ("/etc", 400),
        ("a/b", 400),
        ("", 400),
        ("x" * 200, 400),
        (".hidden", 400),
        ("alpha ", 400),
    ],
)
def test_bad_model_names(catalog, name, status):
    assert _status(catalog.select, name)[0] == status


def test_model_list_is_openai_shaped(catalog):
    listing = catalog.model_list()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["tiny", "alpha", "beta.v2"]
    assert all(m["object"] == "model" for m in listing["data"])
    assert [m["default"] for m in listing["data"]] == [False, True, False]


def test_model_side_errors_map_to_statuses():
    assert ApiError.from_model_error(PromptTooLong("long")).status == 413
    assert ApiError.from_model_error(UnknownAdapter("gone")).status == 404
    err = ApiError.from_model_error(PromptTooLong("long"))
    assert ApiError.from_dict(err.to_dict()).body() == err.body()


# ----- responses -----
def test_chat_response_and_chunks():
    result = {
        "text": "An answer.",
        "finish_reason": "stop",
        "prompt_tokens": 7,
        "completion_tokens": 3,
    }
    body = chat_response(result, "alpha")
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "An answer."}
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    chunk = chat_chunk("id", 1, "alpha", {"content": "An"})
    assert chunk["choices"][0]["delta"] == {"content": "An"} and "usage" not in chunk
    assert chat_chunk("id", 1, "alpha", None, usage_={"total_tokens": 1})["choices"] == []
    assert sse("[DONE]") == "data: [DONE]\n\n"
    assert json.loads(sse(chunk).removeprefix("data: ")) == chunk


# ----- build_app arguments and the shipped Serve config -----
def test_app_args():
    from serving.app import AppArgs

    args = AppArgs.model_validate(
        {"config": "jobs/configs/tiny-cpu.yaml", "overrides": ["serve.port=8123"]}
    )
    assert args.config_path().resolve() == (REPO / "jobs/configs/tiny-cpu.yaml").resolve()
    assert args.load().serve.port == 8123
    settings = AppArgs(settings={"experiment": "x"}, overrides=["serve.max_replicas=3"]).load()
    assert (settings.experiment, settings.serve.max_replicas) == ("x", 3)
    with pytest.raises(ValueError, match="not both"):
        AppArgs(config="a.yaml", settings={})
    with pytest.raises(ConfigError, match="unknown key"):
        AppArgs(settings={"serve": {"prot": 1}}).load()


def test_deployment_options_follow_the_config():
    from serving.app import deployment_options
    from tinyqa.config import build_config

    cfg = build_config(
        {
            "serve": {
                "min_replicas": 1,
                "max_replicas": 3,
                "num_cpus": 0.5,
                "num_gpus": 1,
                "max_queued_requests": 5,
                "upscale_delay_s": 1.0,
                "look_back_period_s": 4.0,
                "metrics_interval_s": 0.5,
            }
        }
    )
    model, ingress = deployment_options(cfg)
    auto = model["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["upscale_delay_s"]) == (1, 3, 1.0)
    assert (auto["look_back_period_s"], auto["metrics_interval_s"]) == (4.0, 0.5)
    assert model["max_queued_requests"] == 5
    assert model["ray_actor_options"]["num_cpus"] == 0.5
    assert model["ray_actor_options"]["num_gpus"] == 1
    # The ingress admits everything the model side can run or queue, so 503s come from there.
    assert ingress["max_ongoing_requests"] >= 3 * cfg.serve.max_ongoing_requests + 5


def test_serve_config_file_builds(tmp_path, monkeypatch):
    """serving/config.yaml is a valid Serve config and its args build the application."""
    from ray.serve.schema import ServeDeploySchema

    from serving.app import AppArgs, build_app

    config = yaml.safe_load((REPO / "serving/config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "serving.app:build_app"
    monkeypatch.chdir(tmp_path)  # the config path resolves against the repo root too
    args = dict(app.args)
    args["overrides"] = [*args.get("overrides", []), f"storage_path={tmp_path}"]
    built = build_app(AppArgs.model_validate(args))
    assert type(built).__name__ == "Application"
    assert build_app(args) is not None  # a plain dict works as well
    with pytest.raises(ConfigError):
        build_app({"config": "jobs/configs/tiny-cpu.yaml", "bogus": 1})


@pytest.mark.parametrize(
    ("config", "gpus"),
    [("jobs/configs/tiny-cpu.yaml", 0), ("jobs/configs/tinyllama-qlora.yaml", 1)],
)
def test_shipped_configs_build_an_app(config, gpus, tmp_path):
    """Every shipped tinyqa config builds the Serve app (nothing is loaded until replicas start)."""
    from serving.app import build_app, deployment_options
    from tinyqa.config import load_config

    overrides = [f"storage_path={tmp_path}"]
    assert build_app({"config": config, "overrides": overrides}) is not None
    model, _ = deployment_options(load_config(REPO / config, overrides))
    assert model["ray_actor_options"]["num_gpus"] == gpus


def test_application_binds_one_config_dict_and_only_a_key_digest(tmp_path, monkeypatch):
    """deploy() hands the config object over; it becomes one dict, without the key; the ingress
    gets a salted digest of the key (resolved once, on the driver), never the key."""
    from serving.app import application, resolved
    from tinyqa.config import build_config, load_config

    monkeypatch.setenv("TINYQA_API_KEY", "from-env")
    cfg = resolved(
        load_config(
            REPO / "jobs/configs/tiny-cpu.yaml",
            [f"storage_path={tmp_path}", "serve.api_key=from-config", "serve.port=8124"],
        )
    )
    ingress = application(cfg)._bound_deployment
    model_app, config, plan, api_key = ingress.init_args
    model = model_app._bound_deployment
    digest = KeyDigest.from_dict(api_key)
    assert digest.matches("from-config")  # serve.api_key wins over $TINYQA_API_KEY
    assert not digest.matches("from-env")
    from ray import cloudpickle

    # What Serve ships to the controller and keeps (arguments, options) holds no key.
    assert b"from-config" not in cloudpickle.dumps(application(cfg))
    assert config == cfg.to_dict() and "api_key" not in config["serve"]
    assert model.init_args == (config, plan)  # both deployments get the same dict
    assert build_config(config).serve.port == 8124  # and it validates on the far side
    assert plan["default_adapter"] is None  # nothing trained under tmp_path: the base model


# ----- hostile input (issue 12) -----
@pytest.mark.parametrize(
    "raw",
    [
        b'{"question": "\xff\xfe"}',  # not UTF-8
        b'{"question": "why \\ud800?"}',  # a lone surrogate escape: not text
        b'{"question": "q", "\\udfff": 1}',  # ... in a key
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the parser's recursion
        b'{"question": "q", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"question": "q", "seed": ' + b"9" * 5000 + b"}",  # past Python's int-digits limit
    ],
)
def test_hostile_bodies_are_400_invalid_json(raw):
    with pytest.raises(ApiError) as info:
        _parse(raw)
    assert (info.value.status, info.value.code) == (400, "invalid_json")


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 2**70])
def test_seed_outside_torch_range_is_400(seed):
    with pytest.raises(ApiError) as info:
        _parse({"question": "q", "seed": seed})
    assert info.value.status == 400 and "seed" in info.value.message
    with pytest.raises(ApiError):
        _parse(
            {"messages": [{"role": "user", "content": "q"}], "seed": seed}, ChatCompletionRequest
        )
    for ok in (0, 2**64 - 1, -(2**63)):
        assert _parse({"question": "q", "seed": ok}).seed == ok


def test_tiny_temperatures_are_greedy():
    for t, expected in ((1e-40, 0.0), (5e-324, 0.0), (0.009, 0.0), (0.01, 0.01), (0.7, 0.7)):
        assert ask_generation(_parse({"question": "q", "temperature": t}), LIMITS).temperature == (
            expected
        )
    chat = _parse(
        {"messages": [{"role": "user", "content": "q"}], "temperature": 1e-40},
        ChatCompletionRequest,
    )
    assert chat_generation(chat, LIMITS).temperature == 0.0


def test_error_bodies_survive_surrogates_in_what_they_quote():
    body = ApiError(400, "unknown field '\udfff'", "unknown_field").body()
    encoded = json.dumps(body, ensure_ascii=False).encode("utf-8")  # what Starlette does
    assert b"\\udfff" in encoded


async def _chunks(parts):
    for p in parts:
        yield p


def test_read_body_stops_at_the_limit_without_a_length():
    import asyncio

    pulled = []

    async def endless():
        while True:
            pulled.append(1)
            yield b"x" * 1000

    with pytest.raises(ApiError) as info:
        asyncio.run(read_body(endless(), None, 10_500))
    assert (info.value.status, info.value.code) == (413, "body_too_large")
    assert len(pulled) == 11  # read only up to the limit, never the whole stream
    with pytest.raises(ApiError):  # a declared length over the limit: refused before reading
        asyncio.run(read_body(_chunks([]), "10501", 10_500))
    assert asyncio.run(read_body(_chunks([b"ab", b"c"]), None, 3)) == b"abc"
    assert asyncio.run(read_body(_chunks([b"ab"]), "bogus", 3)) == b"ab"


def test_openapi_schema_describes_the_request_bodies():
    from serving.ingress import fastapi_app

    schema = fastapi_app.openapi()
    paths = schema["paths"]
    assert set(paths) == {"/healthz", "/v1/models", "/v1/ask", "/v1/chat/completions"}
    ask = paths["/v1/ask"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    props = schema["components"]["schemas"][ask["$ref"].rsplit("/", 1)[1]]["properties"]
    assert props["question"]["type"] == "string"
    seed = next(s for s in props["seed"]["anyOf"] if s.get("type") == "integer")
    assert (seed["minimum"], seed["maximum"]) == (-(2**63), 2**64 - 1)
    chat = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["additionalProperties"] is False and "messages" in chat["required"]
    assert "ChatMessage" in schema["components"]["schemas"]  # nested models resolve


def test_served_device_follows_the_gpu_request():
    assert served_device(ServeSettings()) == ("cpu", "none")
    assert served_device(ServeSettings(num_gpus=1)) == ("cuda", "nf4")
    assert served_device(ServeSettings(num_gpus=1, quantization="bf16")) == ("cuda", "bf16")
