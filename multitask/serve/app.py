"""The HTTP API of `multitask serve`: every task of one or more runs behind one FastAPI app, with concurrent
requests micro-batched across tasks and requests (batcher.py) into one model thread.

Endpoints (README, "Serving"): POST /v1/predict, POST /v1/analyze, GET /v1/tasks, GET /health, GET /metrics,
and the OpenAPI pages /docs and /openapi.json. Mistakes a client can make are answered 4xx with one line in
``{"detail": ...}``; anything else is a 500 with a short message, logged with its traceback.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Iterator, Union

from fastapi import Body, Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from multitask import __version__
from multitask.errors import ConfigError, DataError, MultitaskError
from multitask.serve.batcher import BatcherClosed, MicroBatcher, PredictFn, QueueFull
from multitask.serve.catalog import Catalog, Item, UnknownTask, load_catalog
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


# ---- request and response bodies (they make the OpenAPI page)
class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(description="A served task (GET /v1/tasks).", examples=["sst2"])
    inputs: list[Any] = Field(description="Inputs in the task's format (its input_schema in GET /v1/tasks): "
                                          "a text or {text, text_pair} for classification, a text or {tokens} for "
                                          "ner, {question, context} for qa.",
                              examples=[["a gripping, funny film", {"text": "dull", "id": "r2"}]])


ONE, MANY = "item", "items"  # tags of the two shapes of a predict body (pydantic puts them in error locations)
PredictBody = Annotated[
    Union[Annotated[PredictRequest, Tag(ONE)], Annotated[list[PredictRequest], Tag(MANY)]],
    # Validate against the shape the client sent only, so errors do not list the other shape's complaints.
    Discriminator(lambda value: MANY if isinstance(value, list) else ONE),
    Body(description="One {task, inputs} item, or a list of them (tasks may mix)."),
]


class TaskPredictions(BaseModel):
    task: str = Field(description="The task as the request named it.")
    predictions: list[dict[str, Any]] = Field(description="One prediction per input, in order.")


class PredictResponse(BaseModel):
    results: list[TaskPredictions] = Field(description="One entry per request item, in order.")


class AnalyzeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(examples=[["John Smith loved Paris."]])
    tasks: list[str] | None = Field(default=None, description="Tasks to run (default: every task that takes a "
                                                              "plain text, i.e. all but qa).")


class AnalyzeResponse(BaseModel):
    results: list[dict[str, dict[str, Any]]] = Field(description="Per text: {task: prediction}.")


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


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse, "description": text} for code, text in (
    (401, "Missing or wrong API key."), (404, "Unknown task."), (413, "Request body too large."),
    (422, "Malformed request or input, or over a limit."), (503, "Queue full (retry later) or shutting down."))}


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
    except UnknownTask as error:
        raise HTTPException(404, str(error)) from None
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
def create_app(catalog: Catalog, settings: ServeSettings | None = None, predict: PredictFn | None = None) -> FastAPI:
    """The server's app; ``predict`` replaces the catalog's model pass (tests inject a slow one)."""
    settings = settings or ServeSettings()
    limits = settings.limits
    endpoints: set[str] = set()  # filled once the routes exist
    batcher: MicroBatcher[Item] = MicroBatcher(predict or catalog.predict, settings.max_batch, settings.max_wait_ms,
                                               settings.max_queue)
    metrics = ServerMetrics(settings.max_batch, lambda: batcher.depth, lambda: batcher.in_flight)
    batcher.on_batch = metrics.observe_batch

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        yield
        # uvicorn has stopped accepting connections and waited for the open ones; finish whatever is queued.
        await batcher.close()

    app = FastAPI(title="multitask serve", version=__version__, lifespan=lifespan,
                  description="Every task of the served runs on one frozen encoder; concurrent requests are "
                              "micro-batched across tasks and requests.",
                  middleware=[Middleware(RequestMetrics, metrics=metrics, endpoints=endpoints),
                              Middleware(BodySizeLimit, max_bytes=limits.max_request_bytes)])
    app.state.batcher, app.state.metrics, app.state.catalog = batcher, metrics, catalog

    async def require_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        if not secrets.compare_digest(given, settings.api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})

    protected = [Depends(require_key)] if settings.api_key is not None else []

    def bind(name: str, inputs: list[Any], where: str) -> list[Item]:
        for index, raw in enumerate(inputs):
            limits.check_input(raw, f"{where}: inputs[{index}]")
        try:
            return catalog.parse(name, inputs)
        except UnknownTask:
            raise
        except DataError as error:
            raise DataError(in_request(str(error), where)) from None

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
            bound = [bind(r.task, r.inputs, where) for r, where in zip(requests, wheres)]
            outputs = await infer([item for items in bound for item in items])
        results, start = [], 0
        for request, items in zip(requests, bound):
            results.append({"task": request.task, "predictions": outputs[start: start + len(items)]})
            start += len(items)
        return {"results": results}

    @app.post("/v1/analyze", response_model=AnalyzeResponse, dependencies=protected, responses=ERRORS,
              summary="Run several tasks on each text")
    async def analyze_route(body: AnalyzeRequest) -> dict[str, Any]:
        with http_errors():
            names = list(dict.fromkeys(body.tasks)) if body.tasks is not None else [
                task.name for task in catalog.text_tasks()]
            for name in names:
                task = catalog.resolve(name)
                if not task.takes_text:
                    raise DataError(f"task {name!r} ({task.task.config.type}) needs a question and a context, not a "
                                    f"text: send it to /v1/predict")
            limits.check_count(len(body.texts) * len(names), f" ({len(body.texts)} texts x {len(names)} tasks)")
            outputs = await infer([item for name in names for item in bind(name, body.texts, f"task {name!r}")])
        count = len(body.texts)
        return {"results": [{name: outputs[t * count + i] for t, name in enumerate(names)} for i in range(count)]}

    @app.get("/v1/tasks", response_model=TasksResponse, dependencies=protected, responses=ERRORS,
             summary="The served runs and tasks: types, labels, input formats")
    async def tasks_route() -> dict[str, Any]:
        return catalog.describe()

    @app.get("/health", response_model=HealthResponse, summary="Liveness (no API key needed)")
    async def health_route() -> dict[str, Any]:
        return {"status": "ok", "runs": list(catalog.runs), "tasks": len(catalog.tasks), "queue_depth": batcher.depth,
                "in_flight": batcher.in_flight}

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
          log_level: str = "info", graceful_timeout: int | None = 30, **load_options: Any) -> None:
    """Load the runs (``load_options``: device, precision, batch_size, as :func:`load_run` takes them) and serve
    them until SIGINT/SIGTERM; shutting down finishes the requests in flight first."""
    import uvicorn

    settings = settings or ServeSettings()
    catalog = load_catalog(runs, **load_options)
    for name in catalog.runs:
        log.info("run %s: %s", name, ", ".join(t.name for t in catalog.tasks.values() if t.run_name == name))
    # log_config=None: uvicorn logs through the CLI's logging set-up, in the same format as the rest.
    config = uvicorn.Config(create_app(catalog, settings), host=host, port=port, log_config=None,
                            log_level=log_level, timeout_graceful_shutdown=graceful_timeout)
    uvicorn.Server(config).run()
