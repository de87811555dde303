"""One model pass for any mix of served runs, a model store followed live, admin calls, and two replicas on one
store: predictions equal each run's own, whatever else shares the pass."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from multitask.config import load_config
from multitask.experiment import ExperimentConfig
from multitask.run import load_run
from multitask.serve import Fleet, create_app, load_catalog, load_fleet
from multitask.training.trainer import Trainer
from tests.fixtures import write_project
from tests.test_serve import Gate, assert_close, settings, wait_for

SHORT = {"cls": ["good movie", "bad acting", "great fun film"], "ner": ["john smith was born in paris", "london is"]}
# Runs that differ in what one batch must reconcile: prefix lengths, layers, attention, modes.
VARIANTS = {
    "plain": [],
    "deep": ["prefix.prefix.length=6", "prefix.prefix.layers={top: 1}", "prefix.attention=separate"],
    "hybrid": ["prefix.mode=hybrid", "prefix.shared_length=2", "prefix.attention=joint"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fleet")
    config = write_project(root)
    made = {}
    for name, overrides in VARIANTS.items():
        experiment = load_config(ExperimentConfig, config, ["optimization.max_steps=3", f"name={name}", *overrides])
        Trainer(experiment, root / "runs" / name, config_path=config, progress=False).train()
        made[name] = root / "runs" / name
    return made


@pytest.fixture(scope="module")
def own(runs):
    """Each run loaded on its own: what its tasks must predict whatever else is served beside them."""
    return {name: load_run(path, device="cpu") for name, path in runs.items()}


def test_any_mix_of_runs_takes_one_encoder_pass(runs, own):
    catalog = load_catalog([f"{name}={path}" for name, path in runs.items()], device="cpu", batch_size=32)
    passes = []
    catalog.engine.model.encoder.register_forward_hook(lambda *args: passes.append(1))
    items = [item for name in runs for task, texts in SHORT.items()
             for item in catalog.parse(f"{name}/{task}", texts)]
    results = catalog.predict(items)
    assert len(passes) == 1  # 15 inputs of 6 tasks of 3 runs, one forward
    offset = 0
    for name in runs:
        for task, texts in SHORT.items():
            assert_close(results[offset: offset + len(texts)], own[name].predict(task, texts))
            offset += len(texts)


def test_concurrent_mixed_traffic_over_several_runs_predicts_what_each_run_does(runs, own):
    fleet = load_fleet([f"{name}={path}" for name, path in runs.items()], device="cpu")
    qa = [{"question": "where was john born ?", "context": "john smith was born in london ."}]
    cases = [(name, task, texts) for name in runs for task, texts in {**SHORT, "qa": qa}.items()]
    with TestClient(create_app(fleet, settings(max_wait_ms=20))) as client, ThreadPoolExecutor(8) as pool:
        def ask(case):
            name, task, texts = case
            return case, client.post("/v1/predict", json={"task": f"{name}/{task}", "inputs": texts})

        for (name, task, texts), response in pool.map(ask, cases * 3):
            assert response.status_code == 200, response.text
            assert_close(response.json()["results"][0]["predictions"], own[name].predict(task, texts))


def copy_run(source: Path, store: Path, name: str) -> Path:
    """Copy a run into the store the way a user should: into a hidden folder first, then renamed into place."""
    staging = store / f".{name}.incoming"
    shutil.copytree(source, staging)
    staging.rename(store / name)
    return store / name


def test_a_store_is_followed_added_replaced_removed_and_broken_runs_are_skipped(runs, own, tmp_path, caplog):
    store = tmp_path / "store"
    store.mkdir()
    copy_run(runs["plain"], store, "alpha")
    fleet = load_fleet([], store, device="cpu")
    assert list(fleet.catalog.tasks) == ["alpha/cls", "alpha/ner", "alpha/qa"]
    copy_run(runs["deep"], store, "beta")
    (store / "half").mkdir()  # a run being written: no checkpoint yet
    broken = copy_run(runs["hybrid"], store, "broken")
    weights = broken / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7] + b"garbage")
    changes = fleet.sync_store()
    assert changes == {"added": ["beta"], "replaced": [], "removed": [], "failed": ["broken"]}
    assert "store run broken skipped" in caplog.text and fleet.counters.load_failures == 1
    assert fleet.sync_store()["failed"] == [] and fleet.counters.load_failures == 1  # logged once per version
    assert_close(fleet.catalog.predict(fleet.catalog.parse("beta/ner", SHORT["ner"])), own["deep"].predict("ner", SHORT["ner"]))
    shutil.rmtree(store / "alpha")
    shutil.move(str(copy_run(runs["hybrid"], store, ".alpha-new")), str(store / "alpha"))  # replaced by another run
    changes = fleet.sync_store()
    assert changes["replaced"] == ["alpha"] and changes["removed"] == []
    assert_close(fleet.catalog.predict(fleet.catalog.parse("alpha/cls", SHORT["cls"])),
                 own["hybrid"].predict("cls", SHORT["cls"]))
    shutil.rmtree(store / "beta")
    assert fleet.sync_store()["removed"] == ["beta"]
    assert sorted({t.run_name for t in fleet.catalog.tasks.values()}) == ["alpha"]


def test_admin_calls_add_and_remove_runs_and_requests_in_flight_finish(runs, own, tmp_path):
    fleet = load_fleet([f"plain={runs['plain']}"], device="cpu")
    gate = Gate(lambda items: items[0].catalog.predict(items))
    app = create_app(fleet, settings(admin_key="adm1n", api_key="user"), predict=gate)
    user, admin = {"Authorization": "Bearer user"}, {"Authorization": "Bearer adm1n"}
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        added = client.post("/v1/admin/runs", json={"path": str(runs["deep"]), "name": "deep"}, headers=admin)
        assert added.status_code == 201 and added.json()["tasks"] == ["deep/cls", "deep/ner", "deep/qa"]
        assert client.post("/v1/admin/runs", json={"path": str(runs["deep"]), "name": "deep"},
                           headers=admin).status_code == 409
        assert client.post("/v1/admin/runs", json={"path": str(runs["deep"])}, headers=user).status_code == 401
        assert client.post("/v1/admin/reload", headers=admin).status_code == 422  # no store
        in_flight = pool.submit(client.post, "/v1/predict", json={"task": "deep/cls", "inputs": SHORT["cls"]},
                                headers=user)
        assert gate.entered.wait(10)
        assert client.delete("/v1/admin/runs/deep", headers=admin).status_code == 200
        gate.release.set()
        assert in_flight.result().status_code == 200  # parsed before the removal: answered by that catalog
        assert_close(in_flight.result().json()["results"][0]["predictions"], own["deep"].predict("cls", SHORT["cls"]))
        gone = client.post("/v1/predict", json={"task": "deep/cls", "inputs": ["x"]}, headers=user)
        assert gone.status_code == 404
        assert client.delete("/v1/admin/runs/deep", headers=admin).status_code == 404
        metrics = client.get("/metrics", headers=user).text
        assert "multitask_run_changes_total 2" in metrics and "multitask_served_tasks 3" in metrics
    without_key = create_app(load_fleet([str(runs["plain"])], device="cpu"), settings())
    with TestClient(without_key) as client:
        assert client.post("/v1/admin/reload").status_code == 403


def test_a_live_server_serves_a_run_that_appears_in_its_store(runs, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    copy_run(runs["plain"], store, "alpha")
    app = create_app(load_fleet([], store, device="cpu"), settings(scan_seconds=0.05))
    with TestClient(app) as client:
        copy_run(runs["deep"], store, "beta")
        wait_for(lambda: any(t["name"] == "beta/cls" for t in client.get("/v1/tasks").json()["tasks"]), timeout=20)
        assert client.post("/v1/predict", json={"task": "beta/cls", "inputs": ["good"]}).status_code == 200
        assert "multitask_store_scans_total" in client.get("/metrics").text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_replicas_on_one_store_both_serve_a_run_added_there(runs, tmp_path):
    """Two server processes on loopback watch one store: what is added there is served by both (a load balancer in
    front of such replicas is all a deployment adds)."""
    store = tmp_path / "store"
    store.mkdir()
    copy_run(runs["plain"], store, "alpha")
    ports = [_free_port(), _free_port()]
    servers = [subprocess.Popen([sys.executable, "-m", "multitask", "serve", "--store", str(store), "--port", str(port),
                                 "--scan-seconds", "0.2", "--device", "cpu", "--log-level", "warning"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for port in ports]
    try:
        def tasks(port):
            try:
                return [t["name"] for t in httpx.get(f"http://127.0.0.1:{port}/v1/tasks", timeout=2).json()["tasks"]]
            except httpx.HTTPError:
                return []

        for port in ports:
            wait_for(lambda port=port: "alpha/cls" in tasks(port), timeout=90)
        copy_run(runs["deep"], store, "beta")
        for port in ports:
            wait_for(lambda port=port: "beta/ner" in tasks(port), timeout=30)
            answer = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"task": "beta/ner", "inputs": ["london"]},
                                timeout=10)
            assert answer.status_code == 200 and json.loads(answer.text)["results"][0]["task"] == "beta/ner"
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=30)
