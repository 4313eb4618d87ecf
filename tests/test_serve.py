"""The online service for real: `genfarm serve` in its own process (local Ray, Ray Serve, vLLM's async engine on the
tiny model) answering the openai SDK and plain HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import yaml

from genfarm.serve.deploy import free_ports

KEY = "test-key-1"
LIMITS = {"max_concurrent": 2, "max_queued": 2, "request_timeout_s": 60}
LONG = 1500  # tokens: a few seconds of generation for the tiny model, so requests overlap


def genfarm(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genfarm", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


class Service:
    def __init__(self, proc: subprocess.Popen, url: str, address: str, model: str, log):
        self.proc, self.url, self.address, self.model, self.log = proc, url, address, model, log

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=120)

    def post(self, path: str, key: str | None = KEY, headers: dict | None = None, **kwargs) -> httpx.Response:
        headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
        return httpx.post(f"{self.url}{path}", headers=headers, timeout=120, **kwargs)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    def wait_for_metric(self, name: str, check, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.metrics().get(name, 0.0)
            if check(value):
                return value
            time.sleep(0.5)
        raise AssertionError(f"{name} = {value} after {timeout}s")


@pytest.fixture(scope="module")
def service(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    config = folder / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": tiny},
        "engine": {"max_model_len": 2048, "max_num_seqs": 8, "kv_cache_gib": 0.25},
        "sampling": {"max_tokens": 8},
        "limits": LIMITS,
        "api_keys": [KEY],
        "tasks": {"translate": {"source_language": "English"}},
    }))
    port = free_ports(1)[0]
    log = open(folder / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "genfarm", "serve", config, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while "Ctrl-C stops" not in (text := (folder / "serve.log").read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"genfarm serve did not come up:\n{text[-3000:]}")
        time.sleep(1)
    address = re.search(r"--address (http://\S+)", text).group(1)
    yield Service(proc, f"http://127.0.0.1:{port}", address, tiny, folder / "serve.log")
    proc.send_signal(signal.SIGTERM)  # what an operator's `kill` does: replicas and engines stop, then Ray
    try:
        assert proc.wait(timeout=180) == 0, (folder / "serve.log").read_text()[-3000:]
    finally:
        proc.kill()


def test_chat_completion_with_openai_sdk(service):
    client = service.client()
    answers = [client.chat.completions.create(model=service.model, messages=[{"role": "user", "content": "bees"}],
                                              max_tokens=12, temperature=0) for _ in range(2)]
    first = answers[0]
    assert first.object == "chat.completion" and first.choices[0].message.role == "assistant"
    assert first.choices[0].finish_reason == "length"  # the random model never stops on its own this early
    assert first.usage.completion_tokens == 12 and first.usage.prompt_tokens > 0
    assert first.usage.total_tokens == first.usage.prompt_tokens + 12
    assert answers[1].choices[0].message.content == first.choices[0].message.content  # greedy is deterministic
    # OpenAI's newer name for the system message, and the model retrieved by its id (another id: 404)
    developer = client.chat.completions.create(model=service.model, max_tokens=12, temperature=0, messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "bees"}])
    system = client.chat.completions.create(model=service.model, max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "bees"}])
    assert developer.choices[0].message.content == system.choices[0].message.content
    assert client.models.retrieve(service.model).id == service.model
    with pytest.raises(openai.NotFoundError) as unknown:
        client.models.retrieve("no-such-model")
    assert unknown.value.code == "model_not_found"


def test_completion_with_n_seed_and_stop(service):
    client = service.client()
    kwargs = dict(model=service.model, prompt="history of water", max_tokens=10, temperature=1.0, n=3, seed=7)
    one, two = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in one.choices] == [0, 1, 2]
    assert [c.text for c in one.choices] == [c.text for c in two.choices]  # the same seed, the same samples
    assert one.usage.completion_tokens == 30
    longer = client.completions.create(model=service.model, prompt="music", max_tokens=40, temperature=0)
    stop = longer.choices[0].text[10:14]  # a piece of what the model will say, as a stop string
    stopped = client.completions.create(model=service.model, prompt="music", max_tokens=40, temperature=0,
                                        stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text


def test_streaming_matches_the_whole_answer(service):
    client = service.client()
    messages = [{"role": "user", "content": "science"}]
    whole = client.chat.completions.create(model=service.model, messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=service.model, messages=messages, max_tokens=16,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices]) > 1  # really streamed, not one block
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-2].choices[0].finish_reason == "length"
    pieces = list(client.completions.create(model=service.model, prompt="music", max_tokens=6, temperature=0,
                                            stream=True))
    assert sum(1 for p in pieces if p.choices[0].text) >= 2 and pieces[-1].choices[0].finish_reason == "length"


def test_api_keys_are_required_except_for_health_and_metrics(service):
    for key in (None, "wrong-key"):
        with pytest.raises(openai.AuthenticationError) as caught:
            service.client(key).models.list()
        assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    assert service.client().models.list().data[0].id == service.model
    bad = service.post("/v1/chat/completions", key=None, content=b"{not json")
    assert bad.status_code == 401  # the key is checked before anything else
    odd = httpx.get(f"{service.url}/v1/models", headers={"Authorization": "Bearer \u00e9t\u00e9".encode("latin-1")})
    assert odd.status_code == 401 and odd.json()["error"]["code"] == "invalid_api_key"  # not a 500
    assert httpx.get(f"{service.url}/v2/anything").status_code == 401  # every path but the open ones needs a key
    assert httpx.get(f"{service.url}/openapi.json").status_code == 200
    assert httpx.get(f"{service.url}/health").json()["status"] == "ok"
    assert httpx.get(f"{service.url}/metrics").status_code == 200


@pytest.mark.parametrize("body, param, code", [
    ({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}, "model", "model_not_found"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model", "invalid_parameter"),
    ({"model": "M", "messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature",
     "invalid_parameter"),
    ({"model": "M", "messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs",
     "invalid_parameter"),
    ({"model": "M", "messages": [{"role": "user", "content": "x"}], "n": 2, "temperature": 0}, None,
     "invalid_parameter"),
    ({"model": "M", "messages": [{"role": "user", "content": "bees " * 3000}]}, "messages",
     "context_length_exceeded"),
])
def test_bad_requests_get_openai_style_400(service, body, param, code):
    body = {**body, "model": service.model} if body.get("model") == "M" else body
    answer = service.post("/v1/chat/completions", json=body)
    assert answer.status_code == (404 if code == "model_not_found" else 400), answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == code and error["param"] == param
    assert error["message"]


def test_malformed_json_is_400(service):
    answer = service.post("/v1/chat/completions", content=b'{"model": ', headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json"


def test_article_and_translation_endpoints_reuse_the_tasks(service):
    article = service.post("/v1/articles", json={"topic": "bees", "max_tokens": 20, "temperature": 0})
    assert article.status_code == 200, article.text
    body = article.json()
    assert body["topic"] == "bees" and body["usage"]["completion_tokens"] == 20 and "title" in body
    assert service.post("/v1/articles", json={"topic": ""}).status_code == 400
    missing = service.post("/v1/translations", json={"text": "hello"})  # no target language anywhere
    assert missing.status_code == 400 and "target_language" in missing.json()["error"]["message"]
    done = service.post("/v1/translations", json={"text": "hello", "target_language": "fr", "max_tokens": 8})
    assert done.status_code == 200, done.text
    assert (done.json()["source_language"], done.json()["target_language"]) == ("en", "fr")  # BCP 47 codes
    assert done.json()["segments"] == 1


def test_long_translation_is_segmented_like_batch_documents(service):
    code = "```python\nprint('keep me exactly')\n```"
    paragraphs = [f"Paragraph {i}: the history of water and music, see https://example.org/p{i} for more. " * 6
                  for i in range(6)]
    text = "# Title\n\n" + "\n\n".join(paragraphs[:3]) + f"\n\n{code}\n\n" + "\n\n".join(paragraphs[3:])
    done = service.post("/v1/translations", json={"text": text, "target_language": "de", "max_tokens": 64,
                                                  "temperature": 0})
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["segments"] >= 7 and body["target_language"] == "de"  # the title and each paragraph at least
    assert code in body["text"]  # never sent to the model, copied back as it was
    assert all(f"https://example.org/p{i}" in body["text"] for i in range(6))
    assert body["text"].count("\n\n") == text.count("\n\n") and body["text"].startswith("# ")
    bad = service.post("/v1/translations", json={"text": "hello", "target_language": "Klingonish"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "target_language"


def test_replica_answers_on_its_own_port_too(service):
    """Serve's throughput mode gives the replica its own HTTP port: the same API, keys and all, minus the proxy."""
    direct = httpx.get(f"{service.url}/health").json()["direct_url"]
    assert direct and direct != service.url
    assert httpx.get(f"{direct}/v1/models").status_code == 401
    answer = openai.OpenAI(base_url=f"{direct}/v1", api_key=KEY, max_retries=0).completions.create(
        model=service.model, prompt="bees", max_tokens=4, temperature=0)
    assert answer.usage.completion_tokens == 4


def test_haproxy_takes_the_port_and_the_engine_is_not_niced(service):
    """No Python proxy relays the tokens: HAProxy listens on the service's port. The engine runs at nice 0, not
    Ray's default 15, so other processes on the machine do not preempt it (docs/performance.md)."""
    import psutil

    port = int(service.url.rsplit(":", 1)[1])
    [listener] = {c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
    assert psutil.Process(listener).name() == "haproxy"
    state = json.loads(genfarm("serve", "status", "--address", service.address, "--json").stdout)
    replica = psutil.Process(state["replicas"][0]["pid"])
    engine = replica.children(recursive=True)
    assert engine and all(p.nice() == 0 for p in [replica, *engine])


def test_openapi_describes_every_route(service):
    paths = httpx.get(f"{service.url}/openapi.json").json()["paths"]
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/articles", "/v1/translations",
            "/health", "/metrics"} <= set(paths)


async def _long_request(url: str, model: str) -> int:
    async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as client:
        answer = await client.post(f"{url}/v1/completions", json={
            "model": model, "prompt": "bees", "max_tokens": LONG, "temperature": 0})
        if answer.status_code == 429:  # genfarm's limiter: the replica is full
            assert int(answer.headers["Retry-After"]) >= 1
            assert answer.json()["error"]["type"] == "rate_limit_error"
        return answer.status_code


def test_overload_is_turned_away_not_queued_forever(service):
    async def burst():
        return await asyncio.gather(*(_long_request(service.url, service.model) for _ in range(10)))

    before = service.metrics().get('genfarm_requests_total{route="completions",status="429"}', 0.0)
    statuses = asyncio.run(asyncio.wait_for(burst(), timeout=240))
    assert set(statuses) <= {200, 429, 503}, statuses  # Serve's own queue may answer 503 in a burst
    assert 1 <= statuses.count(200) <= LIMITS["max_concurrent"] + LIMITS["max_queued"], statuses
    assert statuses.count(429) >= 1, statuses
    rejected = 'genfarm_requests_total{route="completions",status="429"}'
    service.wait_for_metric(rejected, lambda v: v >= before + statuses.count(429))
    time.sleep(2)  # a double count would show up by now
    assert service.metrics()[rejected] == before + statuses.count(429)


def test_client_disconnect_frees_the_engine_slot(service):
    before = service.metrics().get('genfarm_client_disconnects_total{route="chat"}', 0.0)
    with httpx.stream("POST", f"{service.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": service.model, "messages": [{"role": "user", "content": "bees"}],
                            "max_tokens": LONG, "temperature": 0, "stream": True}, timeout=60) as answer:
        lines = answer.iter_lines()
        assert next(lines).startswith("data: ")
    # Closed after the first token, long before its 1,500 are done (the tiny model writes them in a second or two, so
    # the test leaves at once rather than looking at the engine first): Serve cancels the handler, the engine aborts
    # the request, and it is counted as a disconnect, not a 200.
    service.wait_for_metric('genfarm_client_disconnects_total{route="chat"}', lambda v: v == before + 1)
    service.wait_for_metric("genfarm_engine_requests", lambda v: v == 0, timeout=20)
    assert service.metrics()["genfarm_running_requests"] == 0


def test_metrics_count_what_happened(service):
    key = 'genfarm_requests_total{route="chat",status="200"}'
    before = service.metrics()
    client = service.client()
    for _ in range(2):
        client.chat.completions.create(model=service.model, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=5, temperature=0)
    service.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    after = service.wait_for_metric(key, lambda v: v >= before.get(key, 0) + 2)
    assert after == before.get(key, 0) + 2
    now = service.metrics()
    tokens = 'genfarm_completion_tokens_total{route="chat"}'
    assert now[tokens] - before.get(tokens, 0) == 10
    errors = 'genfarm_errors_total{route="chat",type="model_not_found"}'
    assert now[errors] - before.get(errors, 0) == 1
    ttft = 'genfarm_time_to_first_token_seconds_count{route="chat"}'
    assert now[ttft] - before.get(ttft, 0) == 2
    assert "genfarm_queue_depth" in now


def test_status_scale_and_bad_cli_input(service):
    status = genfarm("serve", "status", "--address", service.address, "--json")
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["status"] == "RUNNING" and [r["state"] for r in state["replicas"]] == ["RUNNING"]
    scaled = genfarm("serve", "scale", "--replicas", 2, "--address", service.address)
    assert scaled.returncode == 0, scaled.stderr
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        state = json.loads(genfarm("serve", "status", "--address", service.address, "--json").stdout)
        if [r["state"] for r in state["replicas"]] == ["RUNNING", "RUNNING"]:
            break
        time.sleep(2)
    else:
        pytest.fail(f"no second replica: {state}")
    assert state["target"] == {"num_replicas": 2}
    replicas = {httpx.get(f"{service.url}/health", timeout=30).json()["replica"] for _ in range(24)}
    assert replicas == {r["replica_id"] for r in state["replicas"]}  # both answer behind the one port
    assert genfarm("serve", "scale", "--replicas", 1, "--address", service.address).returncode == 0
    while time.monotonic() < deadline + 240:
        state = json.loads(genfarm("serve", "status", "--address", service.address, "--json").stdout)
        if [r["state"] for r in state["replicas"]] == ["RUNNING"]:
            break
        time.sleep(2)
    assert state["target"] == {"num_replicas": 1} and len(state["replicas"]) == 1, state
    for args, field in [
        (("serve", "scale", "--address", service.address), "serve scale"),
        (("serve", "scale", "--replicas", 2, "--min", 1, "--address", service.address), "serve scale"),
        (("serve", "status", "--name", "other", "--address", service.address), "serve app 'other'"),
        (("serve", "status", "--address", "http://127.0.0.1:9"), "--address"),
        (("serve", "missing.yaml"), "missing.yaml"),
        (("serve", "--set", "replicas.count=0"), "replicas.count"),
        (("serve", "--port", service.url.rsplit(":", 1)[1]), "--port"),
    ]:
        result = genfarm(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and field in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_engine_processes_die_with_a_killed_replica(service):
    """Ray kills a replica's process hard when its node or raylet goes: vLLM's engine processes must not outlive it
    (they would hold gigabytes and spin on CPU). Last of the service tests: Serve replaces the replica meanwhile."""
    import psutil

    state = json.loads(genfarm("serve", "status", "--address", service.address, "--json").stdout)
    replica = psutil.Process(state["replicas"][0]["pid"])
    engine = [p for p in replica.children(recursive=True) if "reaper" not in " ".join(p.cmdline())]
    assert engine, "the replica runs vLLM's engine in child processes"
    replica.kill()
    gone, alive = psutil.wait_procs(engine, timeout=20)
    assert not alive, [p.cmdline() for p in alive]
    deadline = time.monotonic() + 240  # Serve starts a new replica with a new engine
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{service.url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    assert service.client().models.list().data[0].id == service.model


def test_serve_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "serve.yaml"
    bad.write_text("replicas: {min: 3, max: 1}\n")
    result = genfarm("serve", bad)
    assert result.returncode == 2 and "replicas" in result.stderr and "larger" in result.stderr
    bad.write_text("limit: {max_queued: 1}\n")
    second = genfarm("serve", bad)
    assert second.returncode == 2 and "did you mean 'limits'" in second.stderr
    bad.write_text("api_keys: [' padded ']\n")
    third = genfarm("serve", bad)
    assert third.returncode == 2 and "api_keys" in third.stderr
    for run in (result, second, third):
        assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr, run.stderr


def test_api_keys_from_the_environment(monkeypatch):
    from genfarm.serve.config import ServeSpec, api_keys, digest

    monkeypatch.setenv("GENFARM_API_KEYS", " a , b,")
    assert api_keys(ServeSpec(api_keys=["c"])) == {digest(k) for k in "abc"}  # only digests travel
    assert api_keys(ServeSpec(api_keys=[digest("d")])) == {digest(k) for k in "abd"}  # digests may be configured
    monkeypatch.delenv("GENFARM_API_KEYS")
    assert api_keys(ServeSpec()) == frozenset()


def test_serve_options_bound_every_queue(monkeypatch):
    import ray

    from genfarm.serve.config import ServeSpec
    from genfarm.serve.deploy import app_config, server_options

    spec = ServeSpec.model_validate({"limits": {"max_concurrent": 4, "max_queued": 6},
                                     "replicas": {"min": 1, "max": 3, "target_ongoing_requests": 5}})
    options = server_options(spec)
    assert 10 < options["max_ongoing_requests"] < options["max_queued_requests"] < 100
    config = app_config(spec)
    assert config["deployments"] == [{"name": "GenfarmServer", "autoscaling_config": {
        "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 5}}]
    assert "replicas" not in config["args"]  # scaling must not change args (that would restart every replica)
    gpu = ServeSpec.model_validate({"engine": {"device": "gpu", "tensor_parallel_size": 2}})
    assert server_options(gpu)["ray_actor_options"]["num_gpus"] == 2
    # device auto on a cluster with GPUs: Serve lets through as many requests as the GPU replica's limiter admits
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8, "GPU": 2})
    auto = ServeSpec.model_validate({"engine": {"device": "auto"}})
    assert server_options(auto)["max_ongoing_requests"] == server_options(
        ServeSpec.model_validate({"engine": {"device": "gpu"}}))["max_ongoing_requests"]
    cpu = ServeSpec.model_validate({"engine": {"device": "cpu"}})
    assert server_options(auto)["max_ongoing_requests"] > server_options(cpu)["max_ongoing_requests"]


if os.environ.get("GENFARM_SKIP_SERVE"):  # pragma: no cover - a switch for quick local runs
    pytestmark = pytest.mark.skip("GENFARM_SKIP_SERVE is set")


VERDICT = {"type": "object", "required": ["sentiment", "urgent"], "additionalProperties": False,
           "properties": {"sentiment": {"enum": ["positive", "negative"]}, "urgent": {"type": "boolean"}}}


def test_structured_outputs_online(service):
    from typing import Literal

    import jsonschema
    import pydantic

    class Verdict(pydantic.BaseModel):
        sentiment: Literal["positive", "negative"]
        urgent: bool

    messages = [{"role": "user", "content": "Is this review positive? bees"}]
    parsed = service.client().chat.completions.parse(model=service.model, messages=messages, response_format=Verdict,
                                                     max_tokens=120, temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, Verdict)  # the openai SDK's parse, unchanged
    raw = service.post("/v1/chat/completions", json={
        "model": service.model, "messages": messages, "max_tokens": 120, "temperature": 0.8,
        "response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": VERDICT, "strict": True}}})
    assert raw.status_code == 200, raw.text
    jsonschema.validate(json.loads(raw.json()["choices"][0]["message"]["content"]), VERDICT)
    for body in ({"structured_outputs": {"choice": ["spam", "ham"]}}, {"guided_choice": ["spam", "ham"]}):
        chosen = service.post("/v1/completions", json={"model": service.model, "prompt": "mail", "max_tokens": 4,
                                                       **body})
        assert chosen.status_code == 200 and chosen.json()["choices"][0]["text"] in ("spam", "ham"), chosen.text
    bad = service.post("/v1/chat/completions", json={
        "model": service.model, "messages": messages,
        "response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": {"type": "objekt"}}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format", bad.text
    both = service.post("/v1/chat/completions", json={"model": service.model, "messages": messages,
                                                      "response_format": {"type": "json_object"},
                                                      "guided_choice": ["a", "b"]})
    assert both.status_code == 400 and both.json()["error"]["param"] == "guided_choice"
