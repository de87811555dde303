"""`multitask serve` under hostile and careless clients (issue 29): bounded answers, poison inputs, work counted in
windows, disconnects, deadlines, shutdown, the watchdog, and keys checked before any work. Live servers run on
loopback; every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from multitask.cli import main
from multitask.errors import CheckpointError, ConfigError
from multitask.serve import Limits, ServeSettings, create_app, serve
from multitask.serve.batcher import MicroBatcher, QueueFull
from multitask.serve.guard import allowed_hosts, read_key
from multitask.serve.lifecycle import ServingServer
from multitask.serve.metrics import parse_samples
from tests.test_serve import Gate, assert_close, catalog, run, run_dir, wait_for  # noqa: F401 (fixtures)

GOOD = ["good movie", "bad acting", "great fun", "boring film", "i love this plot", "bad movie", "good fun"]


def settings(**overrides) -> ServeSettings:
    names = ("max_request_bytes", "max_inputs", "max_input_chars", "max_input_tokens")
    return ServeSettings(**{k: v for k, v in overrides.items() if k not in names},
                         limits=Limits(**{k: v for k, v in overrides.items() if k in names}))


class Passes:
    """The catalog's model pass, recording the texts of every pass (optionally failing on one)."""

    def __init__(self, catalog, poison: str | None = None) -> None:
        self.catalog, self.poison, self.seen, self.lock = catalog, poison, [], threading.Lock()

    def __call__(self, items):
        texts = [getattr(item.example, "text", None) for item in items]
        with self.lock:
            self.seen.append(texts)
        if self.poison in texts:
            raise RuntimeError("the tokenizer choked")
        return self.catalog.predict(items)


def post_raw(client, body, path="/v1/predict", **headers):
    """A body as bytes: json.dumps escapes a lone surrogate (httpx's own encoder would fail on it)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=content, headers={"content-type": "application/json", **headers})


@contextmanager
def serving(app, graceful_timeout: float = 20):
    """The app under a real uvicorn on loopback, with the signal hook `multitask serve` uses."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=graceful_timeout)
    server = ServingServer(config, app.state.drain.begin)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started)
    port = sock.getsockname()[1]
    try:
        yield server, thread, port
    finally:
        server.should_exit = True
        thread.join(20)


def raw_request(port: int, body: bytes, declared: int | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if declared is None else declared}\r\n\r\n")
    sock.sendall(head.encode() + body)
    return sock


# ---------------------------------------------------------------- bounded answers, poison inputs
def test_error_answers_are_bounded_and_one_line(catalog):
    with TestClient(create_app(catalog, settings())) as client:
        flood = post_raw(client, b"[" + b"1," * 15_000 + b"1]")  # the review's 30 KB body
        assert flood.status_code == 422 and len(flood.content) < 1000
        items = post_raw(client, [1] * 200)  # 200 invalid items, within --max-inputs
        assert items.status_code == 422 and len(items.content) < 4000
        assert len(items.json()["errors"]) == 10 and "(and 196 more)" in items.json()["detail"]
        keys = post_raw(client, {"task": "cls", "inputs": [], **{f"k{i}": 1 for i in range(20_000)}})
        assert keys.status_code == 422 and len(keys.content) < 1000
        assert "not UTF-8" in post_raw(client, b'{"task": "cls", "inputs": ["\xff\xfe"]}').json()["detail"]
        assert "nested too deeply" in post_raw(client, b"[" * 100_000).json()["detail"]
        for name in ("a\nb" * 5000, "\ud800"):  # echoed names stay one short line and encodable
            answer = post_raw(client, {"task": name, "inputs": ["x"]})
            assert answer.status_code == 404 and "\n" not in answer.json()["detail"]
            assert len(answer.json()["detail"]) < 600
        samples = parse_samples(client.get("/metrics").text)
    assert not any('status="5' in name for name in samples)


def test_poison_inputs_are_refused_up_front_and_a_failing_pass_is_bisected(catalog):
    def concurrently(client, bodies):
        with ThreadPoolExecutor(len(bodies)) as pool:
            return list(pool.map(lambda body: post_raw(client, body), bodies))

    passes = Passes(catalog)
    with TestClient(create_app(catalog, settings(max_batch=8, max_wait_ms=500), predict=passes)) as client:
        bodies = [{"task": "cls", "inputs": [text]} for text in GOOD]
        answers = concurrently(client, [*bodies[:3], {"task": "cls", "inputs": ["\ud800 fine film"]}, *bodies[3:]])
    assert [a.status_code for a in answers] == [200] * 3 + [422] + [200] * 4
    assert "UTF-8 cannot encode" in answers[3].json()["detail"]
    assert len(passes.seen) <= 2 and sum(map(len, passes.seen)) == 7  # never reached the model

    # An input that passes every check yet fails in the model: only its request fails, in 1 + 2 log2(8) passes.
    passes = Passes(catalog, poison="poison")
    with TestClient(create_app(catalog, settings(max_batch=8, max_wait_ms=2000), predict=passes)) as client:
        answers = concurrently(client, [*bodies[:3], {"task": "cls", "inputs": ["poison"]}, *bodies[3:]])
    assert [a.status_code for a in answers] == [200] * 3 + [500] + [200] * 4
    assert len(passes.seen[0]) == 8 and len(passes.seen) <= 7
    assert all(sum(text in seen for seen in passes.seen) <= 4 for text in GOOD)  # at most log2(8) extra passes


# ---------------------------------------------------------------- work in model terms
def test_limits_count_tokens_windows_and_depth(catalog, run):
    long_text = "john smith was born in paris " * 20  # ner max_length 16: many windows
    with TestClient(create_app(catalog, settings(max_input_tokens=64, max_input_chars=1000))) as client:
        def detail(status, body):
            answer = post_raw(client, body)
            assert answer.status_code == status, answer.text
            return answer.json()["detail"] if status != 200 else answer.json()

        refused = detail(422, {"task": "ner", "inputs": ["short one", long_text]})
        assert refused.startswith("task 'ner': inputs[1]: ") and "tokens per input (--max-input-tokens)" in refused
        assert "windows" in refused
        nested = {"tokens": ["a"]}
        for _ in range(20):
            nested = {"tokens": [nested]}
        assert "nested deeper than 16 levels" in detail(422, {"task": "ner", "inputs": [nested]})
        counted = detail(200, {"task": "ner", "inputs": [{"tokens": [12345, "paris"]}]})  # a number is a token too
        assert counted["results"][0]["predictions"][0]["tokens"] == ["12345", "paris"]
    with TestClient(create_app(catalog, settings(max_input_chars=8))) as client:
        assert post_raw(client, {"task": "ner", "inputs": [{"tokens": [123456, 7890]}]}).json()["detail"] == (
            "task 'ner': inputs[0]: 10 characters, over this server's limit of 8 per input")

    # Queue and batch accounting in windows: a long QA context is several windows of one pass.
    qa = [{"question": "where was john born ?", "context": "john smith was born in london . " * 6}]
    windows = len(run.engine.featurize("qa", run.parse_inputs("qa", qa)))
    assert windows > 1
    with TestClient(create_app(catalog, settings())) as client:
        answer = client.post("/v1/predict", json={"task": "qa", "inputs": qa})
        assert_close(answer.json()["results"][0]["predictions"], run.predict("qa", qa))
        samples = parse_samples(client.get("/metrics").text)
    assert samples["multitask_batch_size_sum"] == windows and samples["multitask_batch_size_count"] == 1


def test_requests_take_turns_and_a_large_one_is_admitted_beside_small_ones():
    passes = []
    gate = Gate(lambda items: (passes.append(list(items)), items)[1])

    async def scenario():
        batcher = MicroBatcher(gate, max_batch=8, max_wait_ms=0, max_queue=4)
        first = asyncio.create_task(batcher.submit(["first"]))
        await asyncio.sleep(0.05)  # in its pass: the rest queue
        small = [asyncio.create_task(batcher.submit([f"s{i}"])) for i in range(3)]
        await asyncio.sleep(0.01)
        large = asyncio.create_task(batcher.submit([f"L{i}" for i in range(10)], [4] * 10))  # 3 of 4 windows taken
        await asyncio.sleep(0.01)
        assert batcher.depth == 43
        with pytest.raises(QueueFull):
            await batcher.submit(["late"])
        gate.release.set()
        await asyncio.gather(first, *small, large)
        await batcher.close()

    asyncio.run(scenario())
    assert passes[1] == ["s0", "s1", "s2", "L0"]  # the small requests did not wait behind the large one
    assert all(len(p) <= 2 for p in passes[2:]) and len(passes) == 1 + 1 + 5


def test_retry_after_follows_queue_depth_and_measured_throughput():
    release = threading.Event()

    def predict(items):
        if items == ["hold"]:
            release.wait(10)
        time.sleep(0.05)
        return items

    async def scenario():
        batcher = MicroBatcher(predict, max_batch=1, max_wait_ms=0, max_queue=29)
        assert batcher.retry_after() == 1  # nothing measured yet
        await asyncio.gather(*(batcher.submit([i]) for i in range(4)))  # ~20 windows/s
        held = asyncio.create_task(batcher.submit(["hold"]))
        queued = asyncio.create_task(batcher.submit(list(range(29))))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull) as refused:
            await batcher.submit(["more"])
        advice = [batcher.retry_after() for _ in range(30)]
        release.set()
        await asyncio.gather(held, queued)
        await batcher.close()
        return refused.value.retry_after, advice

    first, advice = asyncio.run(scenario())
    # 30 windows at ~20 per second: 1.5 s, times a jitter of 1 to 1.5
    assert 2 <= first <= 4 and all(2 <= a <= 4 for a in advice) and len(set(advice)) > 1


# ---------------------------------------------------------------- disconnects, deadlines, parsing off the loop
def test_a_client_that_disconnects_never_reaches_the_model(catalog):
    seen = []
    gate = Gate(lambda items: (seen.extend(item.example.text for item in items), catalog.predict(items))[1])
    app = create_app(catalog, settings(max_batch=1, max_wait_ms=0), predict=gate)
    with serving(app) as (_, _, port), ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, f"http://127.0.0.1:{port}/v1/predict",
                            json={"task": "cls", "inputs": ["good movie"]}, timeout=20)
        assert gate.entered.wait(10)
        leaving = raw_request(port, json.dumps({"task": "cls", "inputs": ["leaver"]}).encode())
        wait_for(lambda: app.state.batcher.depth == 1)
        leaving.close()
        wait_for(lambda: app.state.batcher.depth == 0)  # left the queue before any pass
        gate.release.set()
        assert first.result(20).status_code == 200
        page = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert seen == ["good movie"]
    assert parse_samples(page)['multitask_requests_total{endpoint="/v1/predict",status="499"}'] == 1


def test_a_queue_deadline_answers_503_and_a_slow_body_408(catalog):
    gate = Gate(catalog.predict)
    app = create_app(catalog, settings(max_batch=1, max_wait_ms=0, max_queue_ms=200, body_timeout=0.5), predict=gate)
    with serving(app) as (_, _, port), ThreadPoolExecutor(2) as pool:
        url = f"http://127.0.0.1:{port}/v1/predict"
        first = pool.submit(httpx.post, url, json={"task": "cls", "inputs": ["good"]}, timeout=20)
        assert gate.entered.wait(10)
        started = time.monotonic()
        waited = httpx.post(url, json={"task": "cls", "inputs": ["queued"]}, timeout=20)
        assert waited.status_code == 503 and "waited" in waited.json()["detail"] and waited.headers["retry-after"]
        assert time.monotonic() - started < 2 and app.state.batcher.depth == 0
        gate.release.set()
        assert first.result(20).status_code == 200
        trickle = raw_request(port, b"{", declared=100)  # one byte of a 100-byte body, then nothing
        started = time.monotonic()
        assert trickle.recv(200).startswith(b"HTTP/1.1 408")
        assert time.monotonic() - started < 3
        trickle.close()


def test_parsing_runs_off_the_event_loop(catalog, monkeypatch):
    parse = catalog.parse
    monkeypatch.setattr(catalog, "parse", lambda *args: (time.sleep(1.5), parse(*args))[1])
    with TestClient(create_app(catalog, settings())) as client, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(client.post, "/v1/predict", json={"task": "cls", "inputs": ["good"]})
        time.sleep(0.2)
        started = time.monotonic()
        assert client.get("/health").status_code == 200
        assert time.monotonic() - started < 0.5 and not slow.done()
        assert slow.result(10).status_code == 200


# ---------------------------------------------------------------- shutdown and the watchdog
def test_shutdown_answers_503_within_the_graceful_timeout_and_exits_after_one_pass(catalog):
    entered = threading.Event()

    def slow_pass(items):
        entered.set()
        time.sleep(2.5)
        return catalog.predict(items)

    app = create_app(catalog, settings(max_batch=1, max_wait_ms=0, graceful_timeout=1), predict=slow_pass)
    with serving(app, graceful_timeout=1) as (server, thread, port), ThreadPoolExecutor(2) as pool:
        url = f"http://127.0.0.1:{port}/v1/predict"
        in_pass = pool.submit(httpx.post, url, json={"task": "cls", "inputs": ["good"]}, timeout=20)
        assert entered.wait(10)
        queued = pool.submit(httpx.post, url, json={"task": "cls", "inputs": ["bad"]}, timeout=20)
        wait_for(lambda: app.state.batcher.depth == 1)
        started = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)
        wait_for(lambda: app.state.drain.draining, timeout=1)

        async def health():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client:
                return await client.get("/health")

        assert asyncio.run(health()).status_code == 503  # not ready at once
        answers = [in_pass.result(10), queued.result(10)]
        answered = time.monotonic() - started
        thread.join(10)
        exited = time.monotonic() - started
    assert [a.status_code for a in answers] == [503, 503] and "graceful-timeout" in answers[0].json()["detail"]
    assert answered < 1.2 and not thread.is_alive() and exited < 1 + 2.5 + 1


def test_the_watchdog_turns_health_503_when_a_pass_hangs_or_the_worker_dies(catalog):
    gate = Gate(catalog.predict)
    with TestClient(create_app(catalog, settings(max_pass_seconds=0.2), predict=gate)) as client, \
            ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(client.post, "/v1/predict", json={"task": "cls", "inputs": ["good"]})
        assert gate.entered.wait(10)
        wait_for(lambda: client.get("/health").status_code == 503, timeout=3)
        assert "over --max-pass-seconds" in client.get("/health").json()["detail"]
        gate.release.set()
        assert stuck.result(10).status_code == 200 and client.get("/health").status_code == 200

    class WorkerDeath(BaseException):
        """Not an Exception: nothing in the collector catches it."""

    def dying(items):
        raise WorkerDeath("out of memory")

    with TestClient(create_app(catalog, settings(), predict=dying)) as client:
        for _ in range(2):  # the request in the pass, then every later one: 503 at once, never a hang
            answer = client.post("/v1/predict", json={"task": "cls", "inputs": ["good"]})
            assert answer.status_code == 503 and "model worker stopped" in answer.json()["detail"]
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"


# ---------------------------------------------------------------- keys, hosts, docs
def test_keys_are_checked_before_the_body_is_read_and_health_tells_outsiders_only_liveness(catalog):
    with TestClient(create_app(catalog, settings(api_key="s3cret", max_request_bytes=100))) as client:
        key = {"Authorization": "Bearer s3cret"}
        assert post_raw(client, b"{not json").status_code == 401
        assert post_raw(client, b"x" * 1000).status_code == 401  # not even a 413: nothing was read
        assert post_raw(client, b"{not json", **key).status_code == 422
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/health", headers=key).json()["runs"] == ["tiny"]
        assert client.post("/v1/admin/reload", headers=key).status_code == 403  # no --admin-key
    for bad in ("clé", "two words", ""):
        with pytest.raises(ConfigError):
            ServeSettings(api_key=bad)
    with pytest.raises(ConfigError, match="must be at least 0"):
        ServeSettings(graceful_timeout=-1)


def test_keys_come_from_a_file_or_the_environment_and_the_cli_wires_the_server(run_dir, tmp_path, monkeypatch,
                                                                               capsys, caplog):
    monkeypatch.delenv("MULTITASK_API_KEY", raising=False)
    with caplog.at_level(logging.WARNING, "multitask.serve"), pytest.raises(CheckpointError):
        serve([str(tmp_path / "missing")], host="0.0.0.0")
    assert "without an API key" in caplog.text
    key_file = tmp_path / "key"
    key_file.write_text("fr0m-file\n")
    assert read_key(None, str(key_file), "MULTITASK_API_KEY", "--api-key") == "fr0m-file"
    monkeypatch.setenv("MULTITASK_API_KEY", "fr0m-env")
    assert read_key(None, None, "MULTITASK_API_KEY", "--api-key") == "fr0m-env"
    with pytest.raises(ConfigError, match="not both"):
        read_key("a", str(key_file), "MULTITASK_API_KEY", "--api-key")
    assert allowed_hosts(None, "127.0.0.1") == ("localhost", "127.0.0.1", "::1", "127.0.0.1")
    assert allowed_hosts(None, "0.0.0.0") is None and allowed_hosts("*", "127.0.0.1") is None

    started = []
    monkeypatch.setattr(ServingServer, "run", lambda self: started.append(self.config))
    assert main(["serve", str(run_dir), "--device", "cpu", "--api-key-file", str(key_file), "--max-connections", "7",
                 "--graceful-timeout", "2.5"]) == 0
    config = started[0]
    assert config.limit_concurrency == 7 and config.timeout_graceful_shutdown == 2.5
    with TestClient(config.app, base_url="http://localhost:8080") as client:
        assert client.get("/v1/tasks").status_code == 401
        assert client.get("/v1/tasks", headers={"Authorization": "Bearer fr0m-file"}).status_code == 200
    with TestClient(config.app, base_url="http://rebound.example") as client:  # DNS rebinding onto loopback
        assert client.get("/health").status_code == 400
    assert main(["serve", str(run_dir), "--api-key", "clé"]) == 2
    assert main(["serve", str(run_dir), "--graceful-timeout", "-1"]) == 2
    assert "printable ASCII" in capsys.readouterr().err


def test_docs_are_off_by_default_and_the_schema_still_shows_the_bodies(catalog):
    with TestClient(create_app(catalog, settings())) as client:
        assert client.get("/docs").status_code == 404
        schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "PredictRequest" in json.dumps(body) and "PredictRequest" in schema["components"]["schemas"]
    assert "texts" in json.dumps(schema["paths"]["/v1/analyze"]["post"]["requestBody"])
    with TestClient(create_app(catalog, settings(docs=True))) as client:
        assert client.get("/docs").status_code == 200
