"""Hostile requests against a real `genfarm serve` (tiny model, API keys on): schemathesis fuzzes what /openapi.json
describes, and hand-written cases send what no schema describes (bodies that are not UTF-8, lone surrogates, deep
nesting, huge numbers and bodies, wrong content types, unknown paths, every route without a key). No answer may be
a 5xx, every error is in OpenAI's shape, the description matches what the service takes, and the service is
healthy afterwards."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from genfarm.serve.deploy import free_ports

KEY = "fuzz-key"
MAX_MODEL_LEN = 1024  # room for the task prompts (a reply's instructions are 250 tokens of this model's); an accepted
# request with a huge max_tokens still ends soon
EXAMPLES = 12  # schemathesis cases per operation and phase
FUZZ_SECONDS = 90
SKIPPED = r"^/v1/(files|batches)"  # stateful routes (uploads, jobs): their own tests drive them
EXACT = {"POST /v1/chat/completions", "POST /v1/completions", "POST /v1/articles", "POST /v1/translations",
         "POST /v1/replies", "GET /v1/models", "GET /health", "GET /metrics"}  # operations whose description must
# take what they take (a task's own rules: its class's describe_request, see genfarm/serve/openapi.py)


@pytest.fixture(scope="module")
def service(tiny, tmp_path_factory):
    """`genfarm serve` with keys, tight limits and the default body limit; yields its base URL."""
    folder = tmp_path_factory.mktemp("fuzz")
    config = folder / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": tiny},
        "engine": {"max_model_len": MAX_MODEL_LEN, "max_num_seqs": 16, "kv_cache_gib": 0.25},
        "sampling": {"max_tokens": 64},  # room for a translation's segments
        "limits": {"max_concurrent": 4, "max_queued": 16, "request_timeout_s": 60},
        "api_keys": [KEY],
    }))
    port = free_ports(1)[0]
    log = folder / "serve.log"
    patient = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}
    with open(log, "w") as out:  # patient proxy checks: a busy machine must not fail the start
        proc = subprocess.Popen([sys.executable, "-m", "genfarm", "serve", config, "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **patient})
    deadline = time.monotonic() + 420
    while "Ctrl-C stops" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"genfarm serve did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    yield f"http://127.0.0.1:{port}"
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=180)
    finally:
        proc.kill()


def call(url: str, method: str, path: str, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **kwargs.pop("headers", {})}
    return httpx.request(method, url + path, headers=headers, timeout=120, **kwargs)


def post_json(url: str, path: str, raw: bytes, key: str | None = KEY) -> httpx.Response:
    return call(url, "POST", path, key, content=raw, headers={"Content-Type": "application/json"})


def openai_error(answer: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """The answer's error, checked to be `status` in OpenAI's shape (and `code`, `param` when given)."""
    assert answer.status_code == status, (answer.status_code, answer.text[:500])
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert code is None or error["code"] == code, error
    assert param is None or error["param"] == param, error
    return error


def chat(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "bees"}], "max_tokens": 2, **extra}


def test_schemathesis_finds_no_5xx_and_the_schema_is_exact(service, tmp_path):
    """Property-based fuzzing of every operation /openapi.json describes (bounded: a fixed seed, EXAMPLES cases per
    operation and phase, FUZZ_SECONDS in all): no 5xx, every answer as described (status, content type, body;
    errors in OpenAI's shape), and data the description calls valid is mostly served (what it cannot say, a
    prompt longer than the context, is the rest)."""
    report, har = tmp_path / "report.json", tmp_path / "requests.har"
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{service}/openapi.json", "--seed", "20240611",
         "--max-examples", str(EXAMPLES), "--max-time", str(FUZZ_SECONDS), "--phases", "examples,coverage,fuzzing",
         "--workers", "2", "--no-shrink", "--request-timeout", "60", "-H", f"Authorization: Bearer {KEY}",
         "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
         "response_schema_conformance,ignored_auth",
         "--exclude-path-regex", SKIPPED, "--suppress-health-check", "all", "--output-sanitize", "false",
         "--report", "json,har", "--report-json-path", str(report), "--report-har-path", str(har)],
        capture_output=True, text=True, timeout=FUZZ_SECONDS + 120, env={**os.environ, "NO_COLOR": "1"},
        cwd=tmp_path)  # its .schemathesis cache goes there
    (tmp_path / "schemathesis.txt").write_text(run.stdout + run.stderr)
    summary = json.loads(report.read_text())
    answers = [entry["response"] for entry in json.loads(har.read_text())["log"]["entries"]]
    rates = {op: {k: sum(phase[k] for phase in phases.values()) for k in ("accepted", "rejected")}
             for op, phases in summary["valid_rates"].items()}
    print(f"schemathesis: {summary['operations']['tested']} operations, {summary['test_cases']['generated']} cases, "
          f"{len(answers)} requests, {len(summary['failures'])} failures; positive cases accepted/rejected: {rates}; "
          f"warnings: {({k: v for k, v in summary['warnings'].items() if v})}")
    assert not [a["status"] for a in answers if a["status"] >= 500]
    for answer in answers:
        if answer["status"] >= 400:
            error = json.loads(answer["content"]["text"])["error"]
            assert set(error) == {"message", "type", "param", "code"}, error
    assert summary["failures"] == [] and summary["errors"] == [], (summary["failures"], run.stdout[-5000:])
    mismatched = set(summary["warnings"]["validation_mismatch"])
    assert not mismatched & EXACT, mismatched
    assert all(rates[op]["accepted"] >= max(1, rates[op]["rejected"]) for op in EXACT), rates
    assert summary["operations"]["tested"] >= len(EXACT) and summary["test_cases"]["generated"] >= 300, summary
    assert run.returncode == 0, run.stdout[-3000:]


def test_bodies_that_are_not_json_text(service, tiny):
    """Not UTF-8, nested past the parser, lone surrogates (in a value or a key, on every kind of route): 400s in
    OpenAI's shape, never FastAPI's {"detail": ...} or a 500. A surrogate pair is one character, and fine."""
    for raw in (b'{"model": "\xff\xfe\xfa", "messages": []}', "{\"model\": \"é\"}".encode("latin-1"),
                b"[" * 5000 + b"]" * 5000, b'{"model": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001):
        openai_error(post_json(service, "/v1/chat/completions", raw), 400, "invalid_json")
    openai_error(post_json(service, "/v1/completions", b'{"model": '), 400, "invalid_json")
    deep = json.dumps(chat(tiny, guided_json=json.loads('{"items": ' * 40 + "{}" + "}" * 40)))
    assert "32 levels" in openai_error(post_json(service, "/v1/chat/completions", deep.encode()), 400,
                                       "invalid_parameter", "guided_json")["message"]
    huge = json.dumps(chat(tiny, guided_json={"type": "object", "x": [-2**88]}))  # past what the engine can carry
    assert "64 bits" in openai_error(post_json(service, "/v1/chat/completions", huge.encode()), 400,
                                     "invalid_parameter", "guided_json")["message"]
    lone = '"\\ud800"'
    for path, body, param in [
        ("/v1/chat/completions", chat(tiny), "messages.0.content"),
        ("/v1/completions", {"model": tiny, "prompt": "bees"}, "prompt"),
        ("/v1/articles", {"topic": "bees"}, "topic"),
        ("/v1/translations", {"text": "bees", "target_language": "fr"}, "text"),
    ]:
        raw = json.dumps(body).replace('"bees"', lone)
        error = openai_error(post_json(service, path, raw.encode()), 400, "invalid_parameter", param)
        assert "surrogate" in error["message"]
    in_key = json.dumps(chat(tiny, guided_json={"x": 1})).replace('"x"', lone)
    openai_error(post_json(service, "/v1/chat/completions", in_key.encode()), 400, "invalid_parameter", "guided_json")
    pair = json.dumps(chat(tiny)).replace('"bees"', '"\\ud83d\\udc1d"')  # a bee: a valid pair
    assert post_json(service, "/v1/chat/completions", pair.encode()).status_code == 200


@pytest.mark.parametrize("field, value", [
    ("seed", 2**70), ("seed", -(2**70)), ("seed", 2**63), ("max_tokens", 2**70), ("max_tokens", 2**31),
    ("max_completion_tokens", 10**30), ("n", 2**70), ("temperature", 10**400), ("top_p", 0), ("temperature", "1"),
    ("n", True), ("max_tokens", 2.5),
])
def test_numbers_out_of_range_are_400_naming_the_parameter(service, tiny, field, value):
    raw = json.dumps(chat(tiny, **{field: value})).encode()
    openai_error(post_json(service, "/v1/chat/completions", raw), 400, "invalid_parameter", field)


def test_numbers_at_the_edges_of_their_range_work(service, tiny):
    for extra in ({"seed": 2**63 - 1, "temperature": 1.0}, {"seed": -(2**63), "temperature": 1.0},
                  {"max_tokens": 2**31 - 1}):
        answer = call(service, "POST", "/v1/chat/completions", json=chat(tiny, **extra))
        assert answer.status_code == 200, (extra, answer.text)
    long = call(service, "POST", "/v1/completions", json={"model": tiny, "prompt": "bees", "max_tokens": 2**31 - 1})
    assert long.status_code == 200 and long.json()["usage"]["total_tokens"] <= MAX_MODEL_LEN  # the context ends it
    nan = json.dumps(chat(tiny)).replace('"max_tokens": 2', '"temperature": NaN').encode()
    openai_error(post_json(service, "/v1/chat/completions", nan), 400, "invalid_parameter", "temperature")


def test_bodies_over_the_limit_are_413_before_parsing(service, tiny):
    """The default limits.max_body_bytes (4 MiB), declared or chunked; a prompt within it that cannot fit the model
    is refused by its length alone, before tokenizing megabytes."""
    huge = json.dumps({"model": tiny, "prompt": "bees " * 2_000_000}).encode()  # 10 MB
    openai_error(post_json(service, "/v1/completions", huge), 413, "request_too_large")
    chunks = (huge[i:i + 65536] for i in range(0, len(huge), 65536))  # no Content-Length: read up to the limit
    openai_error(call(service, "POST", "/v1/completions", content=chunks,
                      headers={"Content-Type": "application/json"}), 413, "request_too_large")
    openai_error(post_json(service, "/v1/completions", huge, key=None), 401, "invalid_api_key")  # the key first
    big = json.dumps({"model": tiny, "prompt": "bees " * 700_000}).encode()  # 3.5 MB
    error = openai_error(post_json(service, "/v1/completions", big), 400, "context_length_exceeded", "prompt")
    assert "characters" in error["message"], error  # refused by its length, not by counting tokens
    big = json.dumps(chat(tiny, messages=[{"role": "user", "content": "bees " * 700_000}])).encode()
    error = openai_error(post_json(service, "/v1/chat/completions", big), 400, "context_length_exceeded", "messages")
    assert "characters" in error["message"], error


def test_wrong_content_types(service, tiny):
    body = json.dumps(chat(tiny)).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "application/xml"):
        answer = call(service, "POST", "/v1/chat/completions", content=body, headers={"Content-Type": content_type})
        assert "Content-Type: application/json" in openai_error(answer, 400, "invalid_json")["message"]
    assert call(service, "POST", "/v1/chat/completions", json=[chat(tiny)]).status_code == 400
    openai_error(call(service, "POST", "/v1/chat/completions", content=body), 400, "invalid_json")  # no type


def test_unknown_paths_and_methods(service):
    openai_error(call(service, "GET", "/v1/nothing"), 404, "not_found")
    openai_error(call(service, "POST", "/v2/chat/completions", json={}), 404, "not_found")
    openai_error(call(service, "GET", "/v1/nothing", key=None), 401, "invalid_api_key")
    wrong = call(service, "PUT", "/v1/chat/completions", json={})
    openai_error(wrong, 405, "method_not_allowed")
    assert wrong.headers["Allow"] == "POST"
    openai_error(call(service, "GET", "/v1/completions"), 405, "method_not_allowed")


def test_every_route_with_and_without_a_key(service):
    """Every operation /openapi.json lists: 401 without a key (or with a wrong one) except the open ones; with the
    key, an empty body or a made-up id is a 4xx in OpenAI's shape, never a 5xx."""
    spec = call(service, "GET", "/openapi.json", key=None).json()
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    open_paths = {"/health", "/metrics"}
    seen = 0
    for path, operations in spec["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "no-such-id", path)
        for method, operation in operations.items():
            kwargs = {"json": {}} if "requestBody" in operation else {}
            for key in (None, "not-the-key"):
                answer = call(service, method.upper(), concrete, key=key, **kwargs)
                if path in open_paths:
                    assert answer.status_code == 200 and "security" not in operation, (method, path)
                else:
                    openai_error(answer, 401, "invalid_api_key")
                    assert operation["security"] == [{"apiKey": []}]
            answer = call(service, method.upper(), concrete, **kwargs)
            assert answer.status_code < 500, (method, path, answer.status_code, answer.text[:300])
            if answer.status_code >= 400:
                openai_error(answer, answer.status_code)
                assert re.match(SKIPPED, path) or str(answer.status_code) in operation["responses"], (method, path)
            seen += 1
    assert seen >= 10
    for path in ("/openapi.json", "/docs"):
        assert call(service, "GET", path, key=None).status_code == 200


def test_healthy_afterwards(service, tiny):
    assert call(service, "GET", "/health", key=None).json()["status"] == "ok"
    answer = call(service, "POST", "/v1/chat/completions", json=chat(tiny, max_tokens=4, temperature=0))
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4, answer.text
    metrics = call(service, "GET", "/metrics", key=None).text
    assert not re.search(r'genfarm_requests_total\{[^}]*status="5(?!03|04)\d\d"\}', metrics), "a 5xx was counted"


def test_described_patterns_are_what_the_tasks_take():
    """The non-blank pattern /openapi.json gives task fields, and the translate task's language pattern: every
    string they match is taken by the checks every batch row and the translate task make, and the examples they
    refuse are refused there too."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from genfarm.rows import RowError, text_field
    from genfarm.serve.patterns import NOT_BLANK, WHITESPACE
    from genfarm.tasks.translate import LANGUAGE as language
    from genfarm.translation import languages

    assert set(WHITESPACE) == {chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()}

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.from_regex(language), st.from_regex(NOT_BLANK))
    def taken(language: str, text: str):
        languages.to_code(language)
        text_field({"text": text}, "text", {})

    taken()
    for refused in ("xx", "de-", "en--US", "Klingon", "", " "):
        assert not re.search(language, refused)
        with pytest.raises((languages.UnknownLanguage, RowError)):
            languages.to_code(refused) if refused.strip() else text_field({"t": refused}, "t", {})
    assert not re.search(NOT_BLANK, " \u3000\n")
