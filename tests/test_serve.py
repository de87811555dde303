"""`multitask serve`: the micro-batcher alone, then the HTTP API over a tiny trained run (in-process and live)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from multitask.backbone import FINGERPRINT_VERSION
from multitask.cli import main
from multitask.config import load_config
from multitask.errors import CheckpointError, ConfigError
from multitask.experiment import ExperimentConfig
from multitask.serve import Limits, ServeSettings, create_app, load_catalog
from multitask.serve.batcher import BatcherClosed, MicroBatcher, QueueFull
from multitask.serve.metrics import CONTENT_TYPE, Counter, Histogram, Registry, parse_samples
from multitask.training.trainer import Trainer
from tests.fixtures import write_project

INPUTS = {
    "cls": ["good movie", {"text": "bad acting", "id": "r2"}, {"text": "great fun", "text_pair": "boring"}],
    "ner": ["john smith was born in paris", {"tokens": ["london", "is", "a", "city"]}],
    "qa": [{"question": "where was john born ?", "context": "john smith was born in london ."}],
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    config = write_project(root)
    run_dir = root / "run"
    experiment = load_config(ExperimentConfig, config, ["optimization.max_steps=4"])
    Trainer(experiment, run_dir, config_path=config, progress=False).train()
    return run_dir


@pytest.fixture(scope="module")
def catalog(run_dir):
    return load_catalog([str(run_dir)], device="cpu")


@pytest.fixture(scope="module")
def run(catalog):
    return catalog.runs["tiny"]


def settings(**overrides) -> ServeSettings:
    limits = {k: overrides.pop(k) for k in ("max_request_bytes", "max_inputs", "max_input_chars") if k in overrides}
    return ServeSettings(**overrides, limits=Limits(**limits))


def assert_close(got, expected, path="") -> None:
    """Equal, floats to 1e-5: a batch padded to another length moves the last digits."""
    if isinstance(expected, float):
        assert got == pytest.approx(expected, abs=1e-5), path
    elif isinstance(expected, dict):
        assert set(got) == set(expected), path
        for key in expected:
            assert_close(got[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), path
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_close(a, b, f"{path}[{i}]")
    else:
        assert got == expected, path


class Gate:
    """A model pass that waits until released, so a test controls what is in flight."""

    def __init__(self, predict) -> None:
        self.predict, self.entered, self.release = predict, threading.Event(), threading.Event()

    def __call__(self, items):
        self.entered.set()
        assert self.release.wait(20)
        return self.predict(items)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@contextmanager
def live_server(app):
    """The app under a real uvicorn on a free port, in a thread; stopped (gracefully) on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=20))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started)
    try:
        yield server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)


# ---------------------------------------------------------------- the batcher alone
async def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.002)


def test_batcher_keeps_order_fills_batches_across_requests_and_respects_max_batch():
    passes = []

    def predict(items):
        passes.append(list(items))
        return [item * 10 for item in items]

    async def scenario():
        batcher = MicroBatcher(predict, max_batch=4, max_wait_ms=200)
        results = await asyncio.gather(batcher.submit([1, 2, 3]), batcher.submit([4, 5]), batcher.submit(range(6, 11)))
        assert await batcher.submit([]) == []
        await batcher.close()
        return results

    assert asyncio.run(scenario()) == [[10, 20, 30], [40, 50], [60, 70, 80, 90, 100]]
    assert passes == [[1, 4, 6, 2], [5, 7, 3, 8], [9, 10]]  # requests take turns; never over max_batch


def test_batcher_fails_only_the_request_whose_input_fails():
    passes = []

    def predict(items):
        passes.append(list(items))
        if "bad" in items:
            raise ValueError("bad input")
        return [item.upper() for item in items]

    async def scenario():
        batcher = MicroBatcher(predict, max_batch=8, max_wait_ms=200)
        results = await asyncio.gather(batcher.submit(["a", "bad"]), batcher.submit(["c"]), return_exceptions=True)
        await batcher.close()
        return results

    failed, fine = asyncio.run(scenario())
    assert isinstance(failed, ValueError) and fine == ["C"]
    assert passes[0] == ["a", "c", "bad"]  # one pass first (requests take turns), then halves until "bad" is alone
    assert passes[1:] == [["a"], ["c", "bad"], ["c"], ["bad"]]


def test_batcher_refuses_when_full_skips_cancelled_inputs_and_drains_on_close():
    seen = []
    gate = Gate(lambda items: (seen.extend(items), [item.upper() for item in items])[1])

    async def scenario():
        batcher = MicroBatcher(gate, max_batch=1, max_wait_ms=0, max_queue=3)
        first = asyncio.create_task(batcher.submit(["a"]))
        await _until(lambda: batcher.in_flight == 1)
        second = asyncio.create_task(batcher.submit(["b", "c"]))
        leaving = asyncio.create_task(batcher.submit(["x"]))
        await _until(lambda: batcher.depth == 3)
        with pytest.raises(QueueFull):
            await batcher.submit(["d"])
        leaving.cancel()  # a client that went away
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0.01)
        with pytest.raises(BatcherClosed):
            await batcher.submit(["e"])
        gate.release.set()
        await closing
        return await first, await second

    assert asyncio.run(scenario()) == (["A"], ["B", "C"])
    assert seen == ["a", "b", "c"]


def test_metrics_text_format():
    registry = Registry()
    counter = registry.add(Counter("requests_total", "Requests.", ("endpoint", "status")))
    histogram = registry.add(Histogram("size", "Sizes.", (1, 4)))
    counter.inc(endpoint='/a"b', status="200")
    counter.inc(2, endpoint='/a"b', status="200")
    for value in (1, 3, 9):
        histogram.observe(value)
    assert registry.render() == "\n".join([
        "# HELP requests_total Requests.", "# TYPE requests_total counter",
        'requests_total{endpoint="/a\\"b",status="200"} 3',
        "# HELP size Sizes.", "# TYPE size histogram",
        'size_bucket{le="1"} 1', 'size_bucket{le="4"} 2', 'size_bucket{le="+Inf"} 3', "size_sum 13", "size_count 3",
    ]) + "\n"


# ---------------------------------------------------------------- the HTTP API
def test_mixed_task_requests_answer_exactly_what_run_predict_does(catalog, run):
    with TestClient(create_app(catalog, settings())) as client:
        body = [{"task": task, "inputs": inputs} for task, inputs in INPUTS.items()]
        body.append({"task": "tiny/cls", "inputs": ["great acting"]})  # one run: run/task is accepted too
        response = client.post("/v1/predict", json=body)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["task"] for r in results] == [*INPUTS, "tiny/cls"]
        for (task, inputs), result in zip(INPUTS.items(), results):
            assert_close(result["predictions"], run.predict(task, inputs))
        assert_close(results[3]["predictions"], run.predict("cls", ["great acting"]))

        single = client.post("/v1/predict", json={"task": "ner", "inputs": INPUTS["ner"]}).json()
        assert_close(single, {"results": [{"task": "ner", "predictions": run.predict("ner", INPUTS["ner"])}]})

        texts = ["john loved paris", "bad movie"]
        analyzed = client.post("/v1/analyze", json={"texts": texts}).json()["results"]
        assert_close(analyzed, run.analyze(texts))
        assert set(analyzed[0]) == {"cls", "ner"}  # qa needs a question and a context
        only_ner = client.post("/v1/analyze", json={"texts": texts, "tasks": ["ner"]}).json()["results"]
        assert_close(only_ner, run.analyze(texts, ["ner"]))


def test_tasks_health_metrics_and_openapi_pages(catalog, run):
    with TestClient(create_app(catalog, settings())) as client:
        tasks = client.get("/v1/tasks").json()
        assert tasks["runs"] == [{"name": "tiny", "encoder": run.experiment.encoder.name, "method": "prefix",
                                  "tasks": ["cls", "ner", "qa"]}]
        by_name = {task["name"]: task for task in tasks["tasks"]}
        assert by_name["cls"]["labels"] == ["0", "1"] and by_name["cls"]["type"] == "classification"
        assert "O" in by_name["ner"]["labels"] and by_name["qa"]["type"] == "qa"
        for name, task in by_name.items():
            assert (task["run"], task["task"]) == ("tiny", name)
            assert task["label_names"] == run.tasks[name].config.label_names
            assert task["input_schema"] == type(run.tasks[name]).input_schema

        assert client.get("/health").json() == {"status": "ok", "runs": ["tiny"], "tasks": 3, "queue_depth": 0,
                                                "in_flight": 0}
        client.post("/v1/predict", json={"task": "cls", "inputs": ["good", "bad"]})
        page = client.get("/metrics")
        assert page.headers["content-type"] == CONTENT_TYPE
        for line in ("# TYPE multitask_requests_total counter", "# TYPE multitask_request_duration_seconds histogram",
                     "# TYPE multitask_batch_size histogram", "# TYPE multitask_queue_depth gauge"):
            assert line in page.text
        samples = parse_samples(page.text)
        assert samples['multitask_requests_total{endpoint="/v1/predict",status="200"}'] == 1
        assert samples['multitask_request_duration_seconds_count{endpoint="/v1/predict"}'] == 1
        assert samples['multitask_inputs_total{task="cls"}'] == 2
        assert samples["multitask_batch_size_sum"] == 2 and samples["multitask_queue_depth"] == 0

        assert set(client.get("/openapi.json").json()["paths"]) == {
            "/v1/predict", "/v1/analyze", "/v1/tasks", "/health", "/metrics", "/v1/admin/runs",
            "/v1/admin/runs/{name}", "/v1/admin/reload"}
        assert client.get("/docs").status_code == 404  # off unless --docs (its scripts come from a CDN)


def test_client_mistakes_are_answered_4xx_naming_the_problem(catalog):
    limits = dict(max_request_bytes=4000, max_inputs=4, max_input_chars=50)
    with TestClient(create_app(catalog, settings(**limits))) as client:
        def error(status, body=None, path="/v1/predict", **kwargs):
            response = client.post(path, json=body, **kwargs)
            assert response.status_code == status, response.text
            return response.json()["detail"]

        assert "task 'nope' is not served; served tasks: cls, ner, qa" in error(404, {"task": "nope", "inputs": []})
        assert "'tiny/nope'" in error(404, [{"task": "cls", "inputs": ["a"]}, {"task": "tiny/nope", "inputs": ["a"]}])
        assert error(422, {"task": "cls", "inputs": ["fine", 3]}).startswith("task 'cls': inputs[1]: expected an object")
        assert error(422, [{"task": "cls", "inputs": []}, {"task": "qa", "inputs": ["no context"]}]).startswith(
            "[1] task 'qa': inputs[0]:")
        assert error(422, {"task": "cls"}) == "invalid request: body.inputs: Field required"
        assert error(422, {"task": "cls", "inputs": [], "extra": 1}).startswith("invalid request: body.extra")
        assert "JSON decode error" in error(422, content=b"{nope", headers={"content-type": "application/json"})
        assert error(422, {"task": "ner", "inputs": [{"tokens": ["x" * 30, "y" * 30]}]}) == (
            "task 'ner': inputs[0]: 60 characters, over this server's limit of 50 per input")
        assert error(422, [{"task": "cls", "inputs": ["a"] * 3}, {"task": "ner", "inputs": ["b"] * 2}]) == (
            "5 inputs in one request, over this server's limit of 4; split the request")
        assert error(422, {"texts": ["a", "b", "c"]}, "/v1/analyze").startswith("6 inputs (3 texts x 2 tasks)")
        assert "needs a question and a context" in error(422, {"texts": ["a"], "tasks": ["qa"]}, "/v1/analyze")
        assert "not served" in error(404, {"texts": ["a"], "tasks": ["nope"]}, "/v1/analyze")
        assert error(413, {"task": "cls", "inputs": ["x" * 40] * 100}) == (
            "request body over this server's limit of 4,000 bytes")
        samples = parse_samples(client.get("/metrics").text)
    assert not any('status="5' in name for name in samples)


def test_api_key_guards_the_api_and_metrics_but_not_health(catalog):
    with TestClient(create_app(catalog, settings(api_key="s3cret"))) as client:
        body = {"task": "cls", "inputs": ["good"]}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            response = client.post("/v1/predict", json=body, headers=headers)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert "API key" in response.json()["detail"]
        assert client.get("/metrics").status_code == 401 and client.get("/v1/tasks").status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/predict", json=body, headers=good).status_code == 200
        assert client.get("/metrics", headers=good).status_code == 200
        assert client.get("/health").status_code == 200


def test_a_full_queue_answers_503_and_the_queued_requests_still_finish(catalog, run):
    gate = Gate(catalog.predict)
    app = create_app(catalog, settings(max_batch=1, max_wait_ms=0, max_queue=1, max_inputs=1), predict=gate)
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        post = lambda text: client.post("/v1/predict", json={"task": "cls", "inputs": [text]})  # noqa: E731
        first = pool.submit(post, "good movie")
        assert gate.entered.wait(10)  # in the model pass
        second = pool.submit(post, "bad movie")
        wait_for(lambda: app.state.batcher.depth == 1)  # queued: the queue is full
        refused = post("great fun")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "queue is full" in refused.json()["detail"]
        gate.release.set()
        for future, text in ((first, "good movie"), (second, "bad movie")):
            assert future.result().status_code == 200
            assert_close(future.result().json()["results"][0]["predictions"], run.predict("cls", [text]))


def test_two_runs_share_one_encoder_under_namespaced_task_names(run_dir, run):
    two = load_catalog([f"a={run_dir}", f"b={run_dir}"], device="cpu")
    assert two.runs["a"].model.encoder is two.runs["b"].model.encoder
    assert list(two.tasks) == ["a/cls", "a/ner", "a/qa", "b/cls", "b/ner", "b/qa"]
    with TestClient(create_app(two, settings())) as client:
        body = [{"task": "b/qa", "inputs": INPUTS["qa"]}, {"task": "a/cls", "inputs": INPUTS["cls"]}]
        results = client.post("/v1/predict", json=body).json()["results"]
        assert_close(results[0]["predictions"], run.predict("qa", INPUTS["qa"]))
        assert_close(results[1]["predictions"], run.predict("cls", INPUTS["cls"]))
        missing = client.post("/v1/predict", json={"task": "cls", "inputs": ["x"]})
        assert missing.status_code == 404 and "(tasks are named run/task here: a/cls, b/cls)" in missing.json()["detail"]
        assert [r["name"] for r in client.get("/v1/tasks").json()["runs"]] == ["a", "b"]


def test_runs_that_cannot_share_an_encoder_are_refused_before_loading(run_dir, tmp_path, capsys):
    def variant(name: str, **changes) -> str:
        copy = tmp_path / name
        shutil.copytree(run_dir, copy)
        meta_path = copy / "checkpoint" / "meta.json"
        meta = json.loads(meta_path.read_text())
        for key, value in changes.items():
            if key == "fingerprint":
                meta["encoder"]["fingerprint"] = value
            else:
                meta[key] = value
        meta_path.write_text(json.dumps(meta))
        return f"{name}={copy}"

    with pytest.raises(ConfigError, match="must share one encoder"):
        load_catalog([str(run_dir), variant("other", fingerprint=FINGERPRINT_VERSION + "0" * 16)])
    with pytest.raises(ConfigError, match="method 'full_ft' changes the encoder"):
        load_catalog([str(run_dir), variant("full", method="full_ft")])
    with pytest.raises(ConfigError, match="two runs are named 'tiny'"):
        load_catalog([str(run_dir), str(run_dir)])
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_catalog([str(tmp_path)])
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert main(["serve", str(run_dir), "--max-inputs", "2000", "--max-queue", "100"]) == 2
    assert "--max-queue (100) must be at least --max-inputs (2000)" in capsys.readouterr().err


def test_live_server_batches_concurrent_requests_and_limits_streamed_bodies(catalog, run):
    app = create_app(catalog, settings(max_batch=32, max_wait_ms=50, max_request_bytes=2000))
    texts = [f"{word} movie number {i}" for i, word in enumerate(["good", "bad", "great", "boring"] * 4)]

    async def fire(url):
        async with httpx.AsyncClient(base_url=url, timeout=20) as client:
            responses = await asyncio.gather(*(client.post("/v1/predict", json={"task": "cls", "inputs": [text]})
                                               for text in texts))
            async def chunks():  # a streamed body: no Content-Length to refuse it by
                for _ in range(5):
                    yield b'{"task": "cls", "inputs": ["' + b"x" * 500

            streamed = await client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
            return responses, streamed, (await client.get("/metrics")).text

    with live_server(app) as (_, _, url):
        responses, streamed, page = asyncio.run(fire(url))
    for text, response in zip(texts, responses):
        assert response.status_code == 200
        assert_close(response.json()["results"][0]["predictions"], run.predict("cls", [text]))
    assert streamed.status_code == 413 and "over this server's limit of 2,000 bytes" in streamed.json()["detail"]
    samples = parse_samples(page)
    assert samples["multitask_batch_size_sum"] == 16
    assert samples["multitask_batch_size_count"] < 16  # some model pass held inputs of several requests


def test_graceful_shutdown_finishes_the_request_in_flight(catalog, run):
    gate = Gate(catalog.predict)
    app = create_app(catalog, settings(), predict=gate)
    with live_server(app) as (server, thread, url), ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx.post, f"{url}/v1/predict", json={"task": "ner", "inputs": INPUTS["ner"]},
                                timeout=20)
        assert gate.entered.wait(10)
        server.should_exit = True  # what SIGTERM does
        time.sleep(0.3)
        assert thread.is_alive() and not in_flight.done()
        gate.release.set()
        response = in_flight.result(timeout=20)
        thread.join(20)
        assert not thread.is_alive()
    assert response.status_code == 200
    assert_close(response.json()["results"][0]["predictions"], run.predict("ner", INPUTS["ner"]))
