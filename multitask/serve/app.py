"""The HTTP API of `multitask serve`: every task of one or more runs behind one FastAPI app, with concurrent
requests micro-batched across tasks and requests (batcher.py) into one model thread.

Endpoints (README, "Serving"): POST /v1/predict, POST /v1/analyze, GET /v1/tasks, GET /health, GET /metrics,
and the OpenAPI pages /docs and /openapi.json. Mistakes a client can make are answered 4xx with one line in
``{"detail": ...}``; anything else is a 500 with a short message, logged with its traceback.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Iterator, Union

from fastapi import Body, Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, Tag
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from multitask import __version__
from multitask.errors import ConfigError, DataError, MultitaskError
from multitask.serve.batcher import BatcherClosed, MicroBatcher, PredictFn, QueueFull
from multitask.serve.catalog import Catalog, Item, UnknownTask, load_fleet
from multitask.serve.fleet import Fleet, RunNameTaken, UnknownRun
from multitask.serve.limits import BodySizeLimit, Limits
from multitask.serve.metrics import CONTENT_TYPE, ServerMetrics

log = logging.getLogger("multitask.serve")


@dataclass(frozen=True)
class ServeSettings:
    max_batch: int = 32  # inputs per model pass
    max_wait_ms: float = 5.0  # how long the oldest waiting input waits for others to join its pass
    max_queue: int = 1024  # inputs waiting; beyond it requests are answered 503
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    admin_key: str | None = None  # enables /v1/admin/* (adding and removing runs live)
    scan_seconds: float = 1.0  # how often the model store (--store) is scanned for new, changed or removed runs

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms must be at least 0, got {self.max_wait_ms}")
        if self.max_queue < self.limits.max_inputs:
            raise ConfigError(f"--max-queue ({self.max_queue}) must be at least --max-inputs "
                              f"({self.limits.max_inputs}), or a request of --max-inputs inputs could never queue")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty")
        if self.admin_key is not None and not self.admin_key.strip():
            raise ConfigError("--admin-key is empty")
        if self.scan_seconds <= 0:
            raise ConfigError(f"--scan-seconds must be > 0, got {self.scan_seconds}")


# ---- request and response bodies (they make the OpenAPI page)
ALL_SCORES = "Classification: give every label's probability (scores), not only the chosen label's (score)."
PREDICTIONS = (
    "One prediction per input, in order; each what run.predict gives. Every score is a probability in [0, 1]. "
    "classification: {label, score: the label's softmax probability, scores: {label: probability} with all_scores}. "
    "ner: {tokens, tags, entities: [{type, start, end (token indices, end exclusive), text, char_start, char_end "
    "(into the input text; text inputs only, text == input[char_start:char_end]), score: the mean of the entity's "
    "words' tag probabilities}]}; a text is split into words as the task was trained (per character for Chinese). "
    "qa: {answer, start, end (characters in the context; -1 for no answer), score: the answer's probability under "
    "one softmax over all candidate spans of all windows (and no answer, where allowed), logit: the start + end "
    "logit sum}. multilabel: {labels, probabilities: each label's own sigmoid probability}."
)
class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(description="A served task (GET /v1/tasks).", examples=["sst2"])
    inputs: list[Any] = Field(description="Inputs in the task's format (its input_schema in GET /v1/tasks): "
                                          "a text or {text, text_pair} for classification, a text or {tokens} for "
                                          "ner, {question, context} for qa.",
                              examples=[["a gripping, funny film", {"text": "dull", "id": "r2"}]])
    all_scores: StrictBool = Field(default=False, description=ALL_SCORES)


ONE, MANY = "item", "items"  # tags of the two shapes of a predict body (pydantic puts them in error locations)
PredictBody = Annotated[
    Union[Annotated[PredictRequest, Tag(ONE)], Annotated[list[PredictRequest], Tag(MANY)]],
    # Validate against the shape the client sent only, so errors do not list the other shape's complaints.
    Discriminator(lambda value: MANY if isinstance(value, list) else ONE),
    Body(description="One {task, inputs} item, or a list of them (tasks may mix)."),
]


class TaskPredictions(BaseModel):
    task: str = Field(description="The task as the request named it.")
    predictions: list[dict[str, Any]] = Field(description=PREDICTIONS)


class PredictResponse(BaseModel):
    results: list[TaskPredictions] = Field(description="One entry per request item, in order.")


class AnalyzeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(examples=[["John Smith loved Paris."]])
    tasks: list[str] | None = Field(default=None, description="Tasks to run (default: every task that takes a "
                                                              "plain text, i.e. all but qa).")
    all_scores: StrictBool = Field(default=False, description=ALL_SCORES)


class AnalyzeResponse(BaseModel):
    results: list[dict[str, dict[str, Any]]] = Field(description="Per text: {task: prediction}, each as "
                                                                 "/v1/predict gives it.")


class TaskInfo(BaseModel):
    name: str = Field(description="The name to send in requests.")
    run: str
    task: str = Field(description="The task's name inside its run.")
    type: str
    labels: list[str]
    label_names: dict[str, str] | None
    input_schema: dict[str, Any] = Field(description="JSON Schema of one input.")


class RunInfo(BaseModel):
    name: str
    encoder: str
    method: str
    tasks: list[str]


class TasksResponse(BaseModel):
    runs: list[RunInfo]
    tasks: list[TaskInfo]


class HealthResponse(BaseModel):
    status: str = Field(examples=["ok"])
    runs: list[str]
    tasks: int
    queue_depth: int
    in_flight: int


class ErrorResponse(BaseModel):
    detail: str


class AddRunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="A trained run's folder, as the server sees it.", examples=["runs/demo-plus-wnut"])
    name: str | None = Field(default=None, description="The run's name here (default: its folder's name).")


class RunChange(BaseModel):
    run: str
    tasks: list[str] = Field(description="The run's tasks as now named.")


class ReloadResponse(BaseModel):
    added: list[str]
    replaced: list[str]
    removed: list[str]
    failed: list[str] = Field(description="Runs of the store that could not be loaded (the log says why).")


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse, "description": text} for code, text in (
    (401, "Missing or wrong API key."), (404, "Unknown task."), (413, "Request body too large."),
    (422, "Malformed request or input, or over a limit."), (503, "Queue full (retry later) or shutting down."))}
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse, "description": text} for code, text in (
    (401, "Missing or wrong admin key."), (403, "Admin endpoints are off (no --admin-key)."),
    (404, "Unknown run."), (409, "A run of that name is served already."),
    (422, "The run cannot be served (the detail says why)."))}


# Module-level: FastAPI resolves the dependency's (postponed) annotations in this module's namespace.
BEARER = HTTPBearer(auto_error=False, description="The server's --api-key.")


# ---- errors
@contextmanager
def http_errors() -> Iterator[None]:
    """Map the errors of parsing and predicting onto HTTP: a client's mistakes are 4xx, the rest 500."""
    try:
        yield
    except HTTPException:
        raise
    except (UnknownTask, UnknownRun) as error:
        raise HTTPException(404, str(error)) from None
    except RunNameTaken as error:
        raise HTTPException(409, str(error)) from None
    except MultitaskError as error:
        raise HTTPException(422, str(error)) from None
    except QueueFull as error:
        raise HTTPException(503, str(error), headers={"Retry-After": "1"}) from None
    except BatcherClosed as error:
        raise HTTPException(503, str(error)) from None
    except Exception as error:
        log.exception("request failed")
        raise HTTPException(500, f"internal error ({type(error).__name__}); the server log has the details") from None


_INPUT_LINE = re.compile(r"^input line (\d+): ")


def in_request(message: str, where: str) -> str:
    """The task parsers name an input by its line in a JSONL file; in a request it is ``inputs[i]``."""
    match = _INPUT_LINE.match(message)
    if match:
        message = f"inputs[{int(match[1]) - 1}]: {message[match.end():]}"
    return f"{where}: {message}"


def validation_message(errors: list[dict[str, Any]]) -> str:
    def where(loc: list[Any]) -> str:
        loc = [part for i, part in enumerate(loc) if not (i == 1 and loc[0] == "body" and part in (ONE, MANY))]
        return ".".join(str(part) for part in loc)

    def why(error: dict[str, Any]) -> str:
        cause = (error.get("ctx") or {}).get("error")
        return error.get("msg", "") + (f" ({cause})" if isinstance(cause, str) else "")

    parts = [f"{where(list(error.get('loc', ())))}: {why(error)}" for error in errors[:4]]
    more = f" (and {len(errors) - 4} more)" if len(errors) > 4 else ""
    return "invalid request: " + "; ".join(parts) + more


# ---- per-request metrics
class RequestMetrics:
    """Counts every response by endpoint and status and times it (pure ASGI, so 413s and 401s count too)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, endpoints: set[str]) -> None:
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            # Unknown paths share one label, so a scanner cannot grow the metrics without bound.
            endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
            self.metrics.requests.inc(endpoint=endpoint, status=str(status))
            self.metrics.latency.observe(time.perf_counter() - started, endpoint=endpoint)


# ---- the app
def predict_items(items: list[Item]) -> list[dict[str, Any]]:
    """The batcher's model pass: each item is answered by the catalog it was parsed against."""
    return items[0].catalog.predict(items) if items else []


def create_app(served: Catalog | Fleet, settings: ServeSettings | None = None,
               predict: PredictFn | None = None) -> FastAPI:
    """The server's app over a fixed catalog, or a fleet whose runs change while it serves (a model store, admin
    calls); ``predict`` replaces the model pass (tests inject a slow one)."""
    settings = settings or ServeSettings()
    limits = settings.limits
    fleet = served if isinstance(served, Fleet) else None
    current = (lambda: fleet.catalog) if fleet is not None else (lambda: served)
    endpoints: set[str] = set()  # filled once the routes exist
    batcher: MicroBatcher[Item] = MicroBatcher(predict or predict_items, settings.max_batch, settings.max_wait_ms,
                                               settings.max_queue)
    metrics = ServerMetrics(settings.max_batch, lambda: batcher.depth, lambda: batcher.in_flight)
    batcher.on_batch = metrics.observe_batch
    counters = fleet.counters if fleet is not None else None
    metrics.watch_fleet(lambda: len(current().tasks), lambda: len(current().runs),
                        lambda: counters.scans if counters else 0, lambda: counters.load_failures if counters else 0,
                        lambda: counters.changes if counters else 0)
    # Loading runs happens in a thread of its own: never on the event loop, never in the model's thread.
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="multitask-loader")

    async def in_loader(function, *args):
        return await asyncio.get_running_loop().run_in_executor(loader, function, *args)

    async def watch_store() -> None:
        while True:
            await asyncio.sleep(settings.scan_seconds)
            try:
                await in_loader(fleet.sync_store)
            except Exception:  # the store must never stop the server; the next scan tries again
                log.exception("scanning the model store failed")

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        watcher = asyncio.create_task(watch_store()) if fleet is not None and fleet.store is not None else None
        yield
        if watcher is not None:
            watcher.cancel()
        # uvicorn has stopped accepting connections and waited for the open ones; finish whatever is queued.
        await batcher.close()
        loader.shutdown(wait=True)

    app = FastAPI(title="multitask serve", version=__version__, lifespan=lifespan,
                  description="Every task of the served runs on one frozen encoder; concurrent requests are "
                              "micro-batched across tasks and requests.",
                  middleware=[Middleware(RequestMetrics, metrics=metrics, endpoints=endpoints),
                              Middleware(BodySizeLimit, max_bytes=limits.max_request_bytes)])
    app.state.batcher, app.state.metrics, app.state.fleet = batcher, metrics, fleet

    async def require_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        if not secrets.compare_digest(given, settings.api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})

    protected = [Depends(require_key)] if settings.api_key is not None else []

    async def require_admin_key(
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if settings.admin_key is None or fleet is None:
            raise HTTPException(403, "admin endpoints are off: start the server with --admin-key")
        given = credentials.credentials.encode() if credentials is not None else b""
        if not secrets.compare_digest(given, settings.admin_key.encode()):
            raise HTTPException(401, "missing or wrong admin key: send the header 'Authorization: Bearer <admin key>'",
                                headers={"WWW-Authenticate": "Bearer"})

    admin = [Depends(require_admin_key)]

    def bind(name: str, inputs: list[Any], where: str, all_scores: bool) -> list[Item]:
        for index, raw in enumerate(inputs):
            limits.check_input(raw, f"{where}: inputs[{index}]")
        try:
            items = current().parse(name, inputs)
        except UnknownTask:
            raise
        except DataError as error:
            raise DataError(in_request(str(error), where)) from None
        if all_scores:  # a flag on each example: the batcher mixes these items with other requests' in one pass
            for item in items:
                item.task.task.request_all_scores(item.example)
        return items

    async def infer(items: list[Item]) -> list[dict[str, Any]]:
        outputs = await batcher.submit(items)
        for item in items:
            metrics.inputs.inc(task=item.task.name)
        return outputs

    @app.post("/v1/predict", response_model=PredictResponse, dependencies=protected, responses=ERRORS,
              summary="Predict inputs of one or several tasks")
    async def predict_route(body: PredictBody) -> dict[str, Any]:
        requests = body if isinstance(body, list) else [body]
        with http_errors():
            limits.check_count(sum(len(r.inputs) for r in requests))
            wheres = [f"[{k}] task {r.task!r}" if isinstance(body, list) else f"task {r.task!r}"
                      for k, r in enumerate(requests)]
            bound = [bind(r.task, r.inputs, where, r.all_scores) for r, where in zip(requests, wheres)]
            outputs = await infer([item for items in bound for item in items])
        results, start = [], 0
        for request, items in zip(requests, bound):
            results.append({"task": request.task, "predictions": outputs[start: start + len(items)]})
            start += len(items)
        return {"results": results}

    @app.post("/v1/analyze", response_model=AnalyzeResponse, dependencies=protected, responses=ERRORS,
              summary="Run several tasks on each text")
    async def analyze_route(body: AnalyzeRequest) -> dict[str, Any]:
        catalog = current()
        with http_errors():
            names = list(dict.fromkeys(body.tasks)) if body.tasks is not None else [
                task.name for task in catalog.text_tasks()]
            for name in names:
                task = catalog.resolve(name)
                if not task.takes_text:
                    raise DataError(f"task {name!r} ({task.task.config.type}) needs a question and a context, not a "
                                    f"text: send it to /v1/predict")
            limits.check_count(len(body.texts) * len(names), f" ({len(body.texts)} texts x {len(names)} tasks)")
            outputs = await infer([item for name in names
                                   for item in bind(name, body.texts, f"task {name!r}", body.all_scores)])
        count = len(body.texts)
        return {"results": [{name: outputs[t * count + i] for t, name in enumerate(names)} for i in range(count)]}

    @app.get("/v1/tasks", response_model=TasksResponse, dependencies=protected, responses=ERRORS,
             summary="The served runs and tasks: types, labels, input formats")
    async def tasks_route() -> dict[str, Any]:
        return current().describe()

    @app.get("/health", response_model=HealthResponse, summary="Liveness (no API key needed)")
    async def health_route() -> dict[str, Any]:
        catalog = current()
        return {"status": "ok", "runs": list(catalog.runs), "tasks": len(catalog.tasks), "queue_depth": batcher.depth,
                "in_flight": batcher.in_flight}

    def run_change(name: str) -> dict[str, Any]:
        return {"run": name, "tasks": [t.name for t in current().tasks.values() if t.run_name == name]}

    @app.post("/v1/admin/runs", response_model=RunChange, dependencies=admin, responses=ADMIN_ERRORS,
              status_code=201, summary="Serve one more run (admin)")
    async def add_run_route(body: AddRunRequest) -> dict[str, Any]:
        name = body.name or Path(body.path).name
        with http_errors():
            await in_loader(fleet.add, name, Path(body.path), "admin")
        return run_change(name)

    @app.delete("/v1/admin/runs/{name}", response_model=RunChange, dependencies=admin, responses=ADMIN_ERRORS,
                summary="Stop serving a run (admin); requests in flight finish")
    async def remove_run_route(name: str) -> dict[str, Any]:
        removed = run_change(name)
        with http_errors():
            await in_loader(fleet.remove, name)
        return removed

    @app.post("/v1/admin/reload", response_model=ReloadResponse, dependencies=admin, responses=ADMIN_ERRORS,
              summary="Scan the model store now (admin)")
    async def reload_route() -> dict[str, Any]:
        with http_errors():
            if fleet.store is None:
                raise ConfigError("this server has no model store to reload (start it with --store DIR)")
            return await in_loader(fleet.sync_store)

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=protected,
             summary="Prometheus metrics (text format)")
    async def metrics_route() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        # The offending input is left out of the echo: it may be large (the detail names where it is).
        errors = [{k: v for k, v in e.items() if k != "input"} for e in jsonable_encoder(error.errors())]
        return JSONResponse({"detail": validation_message(errors), "errors": errors}, status_code=422)

    endpoints.update(route.path for route in app.routes)
    return app


def serve(runs: list[str], host: str = "127.0.0.1", port: int = 8080, settings: ServeSettings | None = None,
          log_level: str = "info", graceful_timeout: int | None = 30, store: Path | None = None,
          **load_options: Any) -> None:
    """Load the runs (``load_options``: device, precision, batch_size, as :func:`load_run` takes them) and those of
    ``store``, and serve them until SIGINT/SIGTERM; shutting down finishes the requests in flight first."""
    import uvicorn

    settings = settings or ServeSettings()
    fleet = load_fleet(runs, store, **load_options)
    log.info("serving %d tasks of %d runs%s", len(fleet.catalog.tasks), len(fleet.runs),
             f"; watching the store {store} every {settings.scan_seconds:g} s" if store is not None else "")
    # log_config=None: uvicorn logs through the CLI's logging set-up, in the same format as the rest.
    config = uvicorn.Config(create_app(fleet, settings), host=host, port=port, log_config=None,
                            log_level=log_level, timeout_graceful_shutdown=graceful_timeout)
    uvicorn.Server(config).run()
