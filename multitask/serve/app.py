"""The HTTP API of `multitask serve`: every task of one or more runs behind one FastAPI app, with concurrent
requests micro-batched across tasks and requests (batcher.py) into one model thread.

Endpoints (docs/serving.md): POST /v1/predict, POST /v1/analyze, GET /v1/tasks, GET /health, GET /metrics,
/openapi.json and, with --docs, /docs. Mistakes a client can make are answered 4xx with one line in
``{"detail": ...}``; anything else is a 500 with a short message, logged with its traceback.

Nothing a client sends may cost the server more than the limits allow: the key and Host are checked before the
body is read (guard.py); the body is decoded, validated and featurized in parsing threads, never on the event loop
(where one large body would stall every request and /health); inputs are counted in the model's windows
(windows.py) and refused over --max-input-tokens; a request whose client has gone leaves the queue before its pass.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Awaitable, Callable, Iterator, Union

from fastapi import Body, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, Tag, TypeAdapter, ValidationError
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from multitask import __version__
from multitask.errors import ConfigError, DataError, MultitaskError
from multitask.serve.batcher import BatcherClosed, MicroBatcher, Overloaded, PredictFn
from multitask.serve.catalog import Catalog, Item, UnknownTask, load_fleet
from multitask.serve.fleet import Fleet, RunNameTaken, UnknownRun
from multitask.serve.guard import CALLER, Guard, check_key, is_loopback
from multitask.serve.lifecycle import Drain, ServingServer
from multitask.serve.limits import BodySizeLimit, LimitExceeded, Limits
from multitask.serve.metrics import CONTENT_TYPE, ServerMetrics
from multitask.serve.windows import WindowCounter

log = logging.getLogger("multitask.serve")


@dataclass(frozen=True)
class ServeSettings:
    max_batch: int = 32  # windows (model inputs: a long QA context is several) per model pass
    max_wait_ms: float = 5.0  # how long the oldest waiting input waits for others to join its pass
    max_queue: int = 1024  # windows waiting; once reached, requests are answered 503
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    admin_key: str | None = None  # enables /v1/admin/* (adding and removing runs live)
    scan_seconds: float = 1.0  # how often the model store (--store) is scanned for new, changed or removed runs
    max_queue_ms: float = 30_000.0  # a request waiting longer for its model pass is answered 503; 0: no limit
    max_pass_seconds: float = 120.0  # a pass running longer turns /health to 503 (the watchdog); 0: never
    graceful_timeout: float = 30.0  # seconds in-flight work gets to finish on SIGTERM; what cannot is answered 503
    body_timeout: float = 30.0  # seconds a request's body may take to arrive (408 after)
    max_connections: int = 512  # uvicorn's limit_concurrency: connections and requests at once, 503 beyond
    allowed_hosts: tuple[str, ...] | None = None  # Host header names served (None: any); guard.allowed_hosts
    docs: bool = False  # /docs (Swagger UI, whose scripts come from a CDN: blank offline)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms must be at least 0, got {self.max_wait_ms}")
        if self.max_queue < self.limits.max_inputs:
            raise ConfigError(f"--max-queue ({self.max_queue}) must be at least --max-inputs "
                              f"({self.limits.max_inputs}), so that the queue holds at least one full request")
        check_key(self.api_key, "--api-key")
        check_key(self.admin_key, "--admin-key")
        if self.scan_seconds <= 0:
            raise ConfigError(f"--scan-seconds must be > 0, got {self.scan_seconds}")
        for name in ("max_queue_ms", "max_pass_seconds", "graceful_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(self, name)}")
        if self.body_timeout <= 0:
            raise ConfigError(f"--body-timeout must be > 0, got {self.body_timeout}")
        if self.max_connections < 1:
            raise ConfigError(f"--max-connections must be at least 1, got {self.max_connections}")


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
    status: str = Field(examples=["ok"], description="ok; or, answered 503, draining (shutting down) or unhealthy.")
    # The rest only for a caller with the key (or when the server has none): to others, liveness is all it says.
    runs: list[str] | None = None
    tasks: int | None = None
    queue_depth: int | None = Field(default=None, description="Windows waiting for a model pass.")
    in_flight: int | None = Field(default=None, description="Windows in the model pass now running.")
    detail: str | None = Field(default=None, description="Why the server is unhealthy.")


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
    (400, "Host not served (--allowed-hosts)."), (401, "Missing or wrong API key."), (404, "Unknown task."),
    (408, "The body took longer than --body-timeout."), (413, "Request body too large."),
    (422, "Malformed request or input, or over a limit."),
    (503, "Queue full or waited past --max-queue-ms (retry after Retry-After seconds), or shutting down."))}
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse, "description": text} for code, text in (
    (401, "Missing or wrong admin key."), (403, "Admin endpoints are off (no --admin-key)."),
    (404, "Unknown run."), (409, "A run of that name is served already."),
    (422, "The run cannot be served (the detail says why)."))}


# For the OpenAPI page only: guard.Guard checks the keys before a route is reached.
BEARER = HTTPBearer(auto_error=False, description="The server's --api-key.")
ADMIN_BEARER = HTTPBearer(auto_error=False, scheme_name="AdminKey", description="The server's --admin-key.")
PREDICT_BODY, ANALYZE_BODY = TypeAdapter(PredictBody), TypeAdapter(AnalyzeRequest)
SCHEMA_REF = "#/components/schemas/{model}"
MAX_ERRORS = 10  # validation errors listed in a 422; the rest are counted
MAX_ITEM_KEYS = 8  # keys of one request object (it has 3 or 4): more are refused before validating them one by one
PARSE_THREADS = 4  # bodies decoded, validated and featurized at once, off the event loop


# ---- errors
@contextmanager
def http_errors() -> Iterator[None]:
    """Map the errors of parsing and predicting onto HTTP: a client's mistakes are 4xx, the rest 500."""
    try:
        yield
    except (HTTPException, RequestValidationError):
        raise
    except (UnknownTask, UnknownRun) as error:
        raise HTTPException(404, one_line(str(error))) from None
    except RunNameTaken as error:
        raise HTTPException(409, one_line(str(error))) from None
    except MultitaskError as error:
        raise HTTPException(422, one_line(str(error))) from None
    except Overloaded as error:
        raise HTTPException(503, str(error), headers={"Retry-After": str(error.retry_after)}) from None
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


def one_line(text: str, limit: int = 500) -> str:
    """``text`` fit for a one-line JSON answer: at most ``limit`` characters, control characters and lone surrogates
    (which a client can send as JSON escapes, and which UTF-8 cannot encode) escaped."""
    cut = text[:limit]
    if not cut.isprintable():
        cut = "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in cut)
    return cut + ("..." if len(text) > limit else "")


class InvalidBody(DataError):
    """A body that is not a JSON document (answered 422)."""


class BodyErrors(RequestValidationError):
    """A body's validation errors: the first MAX_ERRORS, and how many there were in all."""

    def __init__(self, errors: list[dict[str, Any]], total: int) -> None:
        super().__init__(errors)
        self.total = total


def compact_error(error: dict[str, Any]) -> dict[str, Any]:
    """One validation error as a 422 lists it: where, why (one line) and its type; never the input, which may be
    large."""
    loc = [part if isinstance(part, int) else one_line(str(part), 100) for part in error.get("loc", ())]
    loc = [part for i, part in enumerate(loc) if not (i == 1 and loc[0] == "body" and part in (ONE, MANY))]
    cause = (error.get("ctx") or {}).get("error")
    msg = error.get("msg", "") + (f" ({cause})" if isinstance(cause, str) else "")
    return {"loc": loc, "msg": one_line(msg, 200), "type": str(error.get("type", ""))}


def validation_message(errors: list[dict[str, Any]], total: int) -> str:
    """The first few errors (as :func:`compact_error` gives them) in one line."""
    parts = [f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in errors[:4]]
    more = f" (and {total - len(parts)} more)" if total > len(parts) else ""
    return "invalid request: " + "; ".join(parts) + more


def decode_json(body: bytes) -> Any:
    """The body as JSON; one that is not (malformed, not UTF-8, nested past the parser's depth) is InvalidBody."""
    try:
        return json.loads(body)
    except json.JSONDecodeError as error:
        raise InvalidBody(f"invalid request: body: JSON decode error ({error.msg} at line {error.lineno} column "
                          f"{error.colno})") from None
    except UnicodeDecodeError as error:
        raise InvalidBody(f"invalid request: body: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except RecursionError:
        raise InvalidBody("invalid request: body: nested too deeply") from None


def validated(model: type[BaseModel], values: list[Any], where: Callable[[int], tuple]) -> list[Any]:
    """Each value as ``model``; BodyErrors (at most MAX_ERRORS listed) when any is invalid. A value with more keys
    than any request object has is refused at once: each extra key would be one more error to build."""
    parsed, errors, total = [], [], 0
    for index, value in enumerate(values):
        if isinstance(value, dict) and len(value) > MAX_ITEM_KEYS:
            raise InvalidBody(f"invalid request: {'.'.join(map(str, where(index)))}: {len(value):,} keys; expected "
                              f"{', '.join(model.model_fields)}")
        try:
            parsed.append(model.model_validate(value))
        except ValidationError as error:
            total += error.error_count()
            room = MAX_ERRORS - len(errors)
            if room > 0:
                found = error.errors(include_url=False, include_input=False)[:room]
                errors += [compact_error({**e, "loc": (*where(index), *e["loc"])}) for e in found]
    if errors:
        raise BodyErrors(errors, total)
    return parsed


def request_body(adapter: TypeAdapter) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that reads its body itself (the models it refers to: :func:`body_models`)."""
    schema = {k: v for k, v in adapter.json_schema(ref_template=SCHEMA_REF).items() if k != "$defs"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def body_models(*adapters: TypeAdapter) -> dict[str, Any]:
    return {name: model for adapter in adapters
            for name, model in adapter.json_schema(ref_template=SCHEMA_REF).get("$defs", {}).items()}


async def disconnected(receive: Receive) -> None:
    """Returns when the client has gone (call it once the body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_gone(request: Request, work: Awaitable[Any]) -> Any:
    """``work``'s answer; or, when the client goes away first, ``work`` cancelled (its inputs leave the queue before
    any pass) and a 499 (nginx's "client closed request") that only the metrics see."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(disconnected(request.receive))
    gone.add_done_callback(lambda watch: watch.cancelled() or watch.exception())  # never "exception not retrieved"
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request itself is cancelled (a shutdown past its deadline)
        task.cancel()
        raise
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})
    return JSONResponse({"detail": "the client closed the connection"}, status_code=499)


async def read_body(request: Request) -> bytes | None:
    """The whole body, or None when the client left while sending it."""
    try:
        return await request.body()
    except ClientDisconnect:
        return None


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
                                               settings.max_queue, max_queue_ms=settings.max_queue_ms,
                                               max_pass_seconds=settings.max_pass_seconds)
    drain = Drain(batcher, settings.graceful_timeout)
    metrics = ServerMetrics(settings.max_batch, lambda: batcher.depth, lambda: batcher.in_flight)
    batcher.on_batch = metrics.observe_batch
    counters = fleet.counters if fleet is not None else None
    metrics.watch_fleet(lambda: len(current().tasks), lambda: len(current().runs),
                        lambda: counters.scans if counters else 0, lambda: counters.load_failures if counters else 0,
                        lambda: counters.changes if counters else 0)
    # Loading runs happens in a thread of its own: never on the event loop, never in the model's thread.
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="multitask-loader")
    # So does parsing request bodies, in a few threads (each with its own tokenizer copy: windows.py).
    parser = ThreadPoolExecutor(max_workers=PARSE_THREADS, thread_name_prefix="multitask-parse")
    counter = WindowCounter()

    async def in_loader(function, *args):
        return await asyncio.get_running_loop().run_in_executor(loader, function, *args)

    async def in_parser(function, *args):
        return await asyncio.get_running_loop().run_in_executor(parser, function, *args)

    async def watch_store() -> None:
        while True:
            await asyncio.sleep(settings.scan_seconds)
            try:
                await in_loader(fleet.sync_store)
            except Exception:  # the store must never stop the server; the next scan tries again
                log.exception("scanning the model store failed")

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        drain.loop = asyncio.get_running_loop()
        batcher.start()
        watcher = asyncio.create_task(watch_store()) if fleet is not None and fleet.store is not None else None
        yield
        if watcher is not None:
            watcher.cancel()
        # uvicorn has stopped accepting connections and waited for the open ones (or the drain answered them);
        # finish whatever is queued, and the pass that may still run.
        await batcher.close()
        parser.shutdown(wait=True)
        loader.shutdown(wait=True)

    app = FastAPI(title="multitask serve", version=__version__, lifespan=lifespan,
                  description="Every task of the served runs on one frozen encoder; concurrent requests are "
                              "micro-batched across tasks and requests.",
                  docs_url="/docs" if settings.docs else None, redoc_url=None,
                  middleware=[Middleware(RequestMetrics, metrics=metrics, endpoints=endpoints),
                              Middleware(Guard, api_key=settings.api_key,
                                         admin_key=settings.admin_key if fleet is not None else None,
                                         allowed_hosts=settings.allowed_hosts, body_timeout=settings.body_timeout),
                              Middleware(BodySizeLimit, max_bytes=limits.max_request_bytes)])
    app.state.batcher, app.state.metrics, app.state.fleet, app.state.drain = batcher, metrics, fleet, drain
    protected = [Depends(BEARER)] if settings.api_key is not None else []
    admin = [Depends(ADMIN_BEARER)]

    # ---- parsing: in the parsing threads
    def bind(name: str, inputs: list[Any], where: str, all_scores: bool) -> tuple[list[Item], list[int]]:
        """Items of one task's inputs and their windows, every limit checked."""
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
        if not items:
            return [], []
        windows = counter.featurize(items[0].task.task, items[0].task.run.tokenizer, [item.example for item in items])
        for index, features in enumerate(windows):
            limits.check_tokens(sum(len(f) for f in features), len(features), f"{where}: inputs[{index}]")
        return [replace(item, features=tuple(features)) for item, features in zip(items, windows)], \
            [len(features) for features in windows]

    def parse_predict(body: bytes) -> tuple[list[PredictRequest], list[tuple[list[Item], list[int]]]]:
        value = decode_json(body)
        many = isinstance(value, list)
        values = value if many else [value]
        if len(values) > limits.max_inputs:
            raise LimitExceeded(f"{len(values):,} request items, over this server's limit of {limits.max_inputs:,} "
                                f"inputs per request; split the request")
        limits.check_count(sum(len(v["inputs"]) for v in values
                               if isinstance(v, dict) and isinstance(v.get("inputs"), list)))
        requests = validated(PredictRequest, values, (lambda k: ("body", k)) if many else (lambda k: ("body",)))
        wheres = [f"[{k}] task {r.task!r}" if many else f"task {r.task!r}" for k, r in enumerate(requests)]
        return requests, [bind(r.task, r.inputs, one_line(where, 200), r.all_scores)
                          for r, where in zip(requests, wheres)]

    def parse_analyze(body: bytes) -> tuple[list[str], int, list[Item], list[int]]:
        value = decode_json(body)
        for key in ("texts", "tasks"):  # before validating: a long list of wrong types is one error per entry
            if isinstance(value, dict) and isinstance(value.get(key), list):
                limits.check_count(len(value[key]), f" ({key})")
        request = validated(AnalyzeRequest, [value], lambda k: ("body",))[0]
        catalog = current()
        names = list(dict.fromkeys(request.tasks)) if request.tasks is not None else [
            task.name for task in catalog.text_tasks()]
        for name in names:
            task = catalog.resolve(name)
            if not task.takes_text:
                raise DataError(f"task {name!r} ({task.task.config.type}) needs a question and a context, not a "
                                f"text: send it to /v1/predict")
        limits.check_count(len(request.texts) * len(names), f" ({len(request.texts)} texts x {len(names)} tasks)")
        items, windows = [], []
        for name in names:
            task_items, task_windows = bind(name, request.texts, f"task {name!r}", request.all_scores)
            items += task_items
            windows += task_windows
        return names, len(request.texts), items, windows

    # ---- answering: on the event loop
    async def infer(items: list[Item], windows: list[int]) -> list[dict[str, Any]]:
        outputs = await batcher.submit(items, windows)
        for item in items:
            metrics.inputs.inc(task=item.task.name)
        return outputs

    async def predict_answer(body: bytes) -> dict[str, Any]:
        with http_errors():
            requests, bound = await in_parser(parse_predict, body)
            outputs = await infer([i for items, _ in bound for i in items], [w for _, ws in bound for w in ws])
        results, start = [], 0
        for request, (items, _) in zip(requests, bound):
            results.append({"task": request.task, "predictions": outputs[start: start + len(items)]})
            start += len(items)
        return {"results": results}

    async def analyze_answer(body: bytes) -> dict[str, Any]:
        with http_errors():
            names, count, items, windows = await in_parser(parse_analyze, body)
            outputs = await infer(items, windows)
        return {"results": [{name: outputs[t * count + i] for t, name in enumerate(names)} for i in range(count)]}

    async def answer(request: Request, respond: Callable[[bytes], Awaitable[Any]]) -> Any:
        body = await read_body(request)
        if body is None:
            return JSONResponse({"detail": "the client closed the connection"}, status_code=499)
        return await unless_gone(request, respond(body))

    # The bodies are read and parsed by the routes themselves (off the event loop); the OpenAPI page still shows them.
    @app.post("/v1/predict", response_model=PredictResponse, dependencies=protected, responses=ERRORS,
              summary="Predict inputs of one or several tasks", openapi_extra=request_body(PREDICT_BODY))
    async def predict_route(request: Request) -> Any:
        return await answer(request, predict_answer)

    @app.post("/v1/analyze", response_model=AnalyzeResponse, dependencies=protected, responses=ERRORS,
              summary="Run several tasks on each text", openapi_extra=request_body(ANALYZE_BODY))
    async def analyze_route(request: Request) -> Any:
        return await answer(request, analyze_answer)

    @app.get("/v1/tasks", response_model=TasksResponse, dependencies=protected, responses=ERRORS,
             summary="The served runs and tasks: types, labels, input formats")
    async def tasks_route() -> dict[str, Any]:
        return current().describe()

    @app.get("/health", response_model=HealthResponse, response_model_exclude_none=True,
             responses={503: {"model": HealthResponse, "description": "Shutting down, or the model worker stopped or "
                                                                     "is stuck (--max-pass-seconds)."}},
             summary="Readiness (no API key needed; details only with it)")
    async def health_route(request: Request) -> Any:
        insider = request.scope.get(CALLER) is not None
        problem = "shutting down" if drain.draining else batcher.problem()
        if problem is not None:
            status = "draining" if drain.draining else "unhealthy"
            return JSONResponse({"status": status, **({"detail": problem} if insider else {})}, status_code=503)
        if not insider:
            return {"status": "ok"}
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
        # At most MAX_ERRORS, each one line and without the offending input (which may be large).
        found = error.errors()
        errors = found if isinstance(error, BodyErrors) else [compact_error(e) for e in found[:MAX_ERRORS]]
        total = error.total if isinstance(error, BodyErrors) else len(found)
        return JSONResponse({"detail": validation_message(errors, total), "errors": errors}, status_code=422)

    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            components = build_openapi().setdefault("components", {}).setdefault("schemas", {})
            for name, model in body_models(PREDICT_BODY, ANALYZE_BODY).items():
                components.setdefault(name, model)
        return app.openapi_schema

    app.openapi = openapi
    endpoints.update(route.path for route in app.routes)
    return app


def serve(runs: list[str], host: str = "127.0.0.1", port: int = 8080, settings: ServeSettings | None = None,
          log_level: str = "info", graceful_timeout: float | None = None, store: Path | None = None,
          **load_options: Any) -> None:
    """Load the runs (``load_options``: device, precision, batch_size, as :func:`load_run` takes them) and those of
    ``store``, and serve them until SIGINT/SIGTERM; shutting down finishes the requests in flight first, within
    ``graceful_timeout`` seconds (default: the settings')."""
    import uvicorn

    settings = settings or ServeSettings()
    if graceful_timeout is not None:
        settings = replace(settings, graceful_timeout=graceful_timeout)
    if settings.api_key is None and not is_loopback(host):
        log.warning("serving on %s without an API key: anyone who reaches this address can use the server "
                    "(--api-key-file, or MULTITASK_API_KEY; and put a reverse proxy in front: docs/serving.md)", host)
    fleet = load_fleet(runs, store, **load_options)
    log.info("serving %d tasks of %d runs%s", len(fleet.catalog.tasks), len(fleet.runs),
             f"; watching the store {store} every {settings.scan_seconds:g} s" if store is not None else "")
    app = create_app(fleet, settings)
    # log_config=None: uvicorn logs through the CLI's logging set-up, in the same format as the rest.
    config = uvicorn.Config(app, host=host, port=port, log_config=None, log_level=log_level,
                            timeout_graceful_shutdown=settings.graceful_timeout,
                            limit_concurrency=settings.max_connections)
    ServingServer(config, app.state.drain.begin).run()
