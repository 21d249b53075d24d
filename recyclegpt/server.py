"""OpenAI-compatible HTTP server around an ``Engine``: completions, chat completions, models, health.

Clients written for the OpenAI API work unchanged (point their base URL at ``http://HOST:PORT/v1``).
Beyond the standard fields a request may carry ``strategy`` (standard / alternating / verified /
adaptive / lookup / speed), ``draft_len``, ``draft_width``, ``threshold``, ``early_exit_layer``, ``top_k`` and
``repetition_penalty``;
``usage`` adds the recycling counters (``tokens_per_full_call``, ``full_calls``, ``module_calls``, ``accepted_drafts``,
``rejected_drafts``).

Requests are decoded by a ``scheduler.Scheduler`` on one engine thread: with ``max_batch`` above 1,
requests that arrive while others decode join the running batch at its next cycle and leave it when
they end (continuous batching); with 1, one at a time in arrival order. A full waiting queue answers
503. Text passes from that thread to the event loop as it is decoded, and a client that disconnects
frees its row before the next cycle.

Footgun: as in the OpenAI API, ``temperature`` defaults to 1 (sampling); send 0 for greedy decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, Field, field_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from recyclegpt.generate import DecodeStats, Engine
from recyclegpt.sampling import SamplingConfig
from recyclegpt.scheduler import Job, QueueFull, Scheduler, stats_of
from recyclegpt.strategies import make_strategy

logger = logging.getLogger(__name__)

T = TypeVar("T")
_POLL_S = 0.25  # how often a waiting request checks that its client is still connected


# ---------------------------------------------------------------------------------------------------------------
# Requests


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with ``usage`` and no choices."""

    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields shared by completions and chat completions (OpenAI names, plus RecycleGPT's extensions)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(default_factory=list)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    strategy: str | None = None
    draft_len: int | None = Field(None, ge=1)
    draft_width: int | None = Field(None, ge=1)
    threshold: float | None = Field(None, ge=0, le=1)
    early_exit_layer: int | None = Field(None, ge=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or ())
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: a prompt, or a list of prompts decoded as one batch."""

    prompt: str | list[str]


class TextPart(BaseModel):
    """A text part of a message's content (the only kind a text model reads)."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def to_template(self) -> dict[str, str]:
        """The ``{"role", "content"}`` dict a chat template reads; ``developer`` is the newer ``system``."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or ())
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# ---------------------------------------------------------------------------------------------------------------
# Errors in the OpenAI shape


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        """The JSON body; ``kind`` goes into the OpenAI field ``type``."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The error as a JSON response with its status."""
        return JSONResponse(self.body(), status_code=self.status)


class _ClientGone(Exception):
    """The client disconnected while its request waited; nobody is left to answer."""


def _field_path(err: dict[str, Any], body: Any) -> str:
    """The dotted path of the field an error is about, as the client wrote it.

    Pydantic's location also names the union member that failed (``prompt.str``); walking the body
    keeps only the parts that are really there, plus the name of a missing field.
    """
    parts, node = [], body
    for part in err["loc"][1:]:  # loc[0] is "body"
        if (isinstance(node, dict) and part in node) or (isinstance(node, list) and isinstance(part, int)):
            parts.append(str(part))
            node = node[part]
            continue
        if err["type"] == "missing" and isinstance(node, dict):
            parts.append(str(part))
        break
    return ".".join(parts)


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's validation errors (malformed JSON, missing or mistyped fields) as one 400 error."""
    messages, params = [], []
    for err in exc.errors():
        if err["type"] == "json_invalid":
            messages.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
            continue
        params.append(_field_path(err, exc.body))
        messages.append(f"{params[-1] or 'body'}: {err['msg']}")
    return APIError(400, "; ".join(messages) or "invalid request", param=params[0] if params else None)


class _BearerAuth:
    """ASGI middleware: ``/v1/...`` requests need ``Authorization: Bearer KEY`` (checked before the body)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):
                msg = "missing or incorrect API key; send the header 'Authorization: Bearer KEY'"
                await APIError(401, msg, code="invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------------------------
# Rows through the scheduler


def _submit(scheduler: Scheduler, ids: Sequence[list[int]], opts: dict[str, Any]
            ) -> AsyncIterator[tuple[int, str | DecodeStats]]:
    """Queue one job per prompt; returns their output as it comes: ``(row, text chunk)``, then
    ``(row, DecodeStats)`` when that row ends. A row's error is raised; closing the iterator early (or
    cancelling the task that awaits it: a client gone) cancels every row of the request."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, tuple[str, Any]]] = asyncio.Queue()

    def poster(row: int) -> Callable[[tuple[str, Any]], None]:
        def post(item: tuple[str, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is closed: the server is shutting down
                loop.call_soon_threadsafe(queue.put_nowait, (row, item))
        return post

    jobs = [Job(p, opts["strategy"], opts["sampling"], opts["max_new_tokens"], opts["stop"], poster(row))
            for row, p in enumerate(ids)]
    try:
        scheduler.submit(jobs)
    except QueueFull as exc:
        raise APIError(503, str(exc), kind="server_error", code="server_busy") from None

    async def rows() -> AsyncIterator[tuple[int, str | DecodeStats]]:
        left = len(jobs)
        try:
            while left:
                row, (what, value) = await queue.get()
                if what == "error":
                    raise value
                left -= what == "done"
                yield row, value
        finally:
            for job in jobs:
                job.cancel()

    return rows()


async def _unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` (typically a queued engine call), cancelling it if the client goes away first."""
    task = asyncio.ensure_future(awaitable)
    while True:
        done, _ = await asyncio.wait({task}, timeout=_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise _ClientGone


# ---------------------------------------------------------------------------------------------------------------
# Responses


def _usage(stats: DecodeStats) -> dict[str, float]:
    """OpenAI ``usage`` plus the recycling counters."""
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.new_tokens,
        "total_tokens": stats.prompt_tokens + stats.new_tokens,
        "tokens_per_full_call": stats.tau,
        "full_calls": stats.full_calls,
        "module_calls": stats.module_calls,
        "accepted_drafts": stats.accepted,
        "rejected_drafts": stats.rejected,
    }


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _event_stream(
    first: tuple[int, str | DecodeStats],
    items: AsyncIterator[tuple[int, str | DecodeStats]],
    opening: Sequence[dict[str, Any]],
    chunk: Callable[[int, str | None, str | None], dict[str, Any]],
    header: dict[str, Any],
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events: ``opening`` chunks, one per text chunk, one per finished row, then ``[DONE]``.

    ``first`` is the first item, already taken from ``items``. ``chunk(row, text, finish_reason)``
    builds a chunk; the finish reason comes from the row's stats. Ending early (a client gone) closes
    ``items``, which frees the request's rows.
    """
    rows: list[DecodeStats] = []

    def event(row: int, value: str | DecodeStats) -> str:
        if isinstance(value, DecodeStats):
            rows.append(value)
            return _sse(chunk(row, None, value.finish_reasons[0]))
        return _sse(chunk(row, value, None))

    try:
        for obj in opening:
            yield _sse(obj)
        yield event(*first)
        async for row, value in items:
            yield event(row, value)
        if include_usage:
            yield _sse({**header, "choices": [], "usage": _usage(stats_of(rows))})
    except ValueError as exc:  # the stream has begun (a later prompt of a batch): report the error in-band
        yield _sse(APIError(400, str(exc)).body())
    except Exception as exc:
        logger.exception("stream failed")
        yield _sse(APIError(500, f"internal error: {exc}", kind="server_error").body())
    finally:
        await items.aclose()
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------------------
# The app


def create_app(
    engine: Engine,
    model_name: str,
    default_strategy: str = "standard",
    api_key: str | None = None,
    chat: bool = True,
    draft_len: int | None = None,
    threshold: float = 0.5,
    draft_width: int | None = None,
    exit_layer: int | None = None,
    max_batch: int | None = None,
    max_waiting: int = 64,
) -> FastAPI:
    """Build the OpenAI-compatible app serving ``engine`` under the model name ``model_name``.

    Args:
        engine: the engine that generates; only the scheduler's thread calls it.
        model_name: the ``model`` requests must name (others get 404).
        default_strategy: decoding strategy when a request names none.
        api_key: if set, ``/v1/...`` requests need ``Authorization: Bearer <api_key>`` (``/health`` stays open).
        chat: serve ``/v1/chat/completions`` (the tokenizer's chat template, or plain joined turns);
            False for base models without chat tuning, which then answer 400 there.
        draft_len: default drafts per full call for ``verified`` and ``lookup`` (None: the strategy's own).
        threshold: default module confidence for ``adaptive``.
        draft_width: default candidates for the first draft's slot for ``verified``, speculated for ``speed``
            (None: the strategy's own).
        exit_layer: default early exit of ``speed`` (None: its own).
        max_batch: the most prompts decoded together (continuous batching; 1: one at a time). Above 1
            needs the native backbone; None: 8 where the backbone can batch, else 1.
        max_waiting: the most prompts waiting for a place; more get 503.

    Raises:
        ValueError: the default strategy is unknown, its options are out of range, or it needs a
            module the engine lacks; ``max_batch`` above 1 on a backbone whose cache cannot batch rows
            of different lengths.
    """
    if make_strategy(default_strategy, draft_len, threshold, draft_width,
                     exit_layer=exit_layer).uses_module and engine.module is None:
        raise ValueError(f"strategy {default_strategy!r} needs a recyclable module; pass --module PATH")
    ragged = getattr(engine.backbone.new_cache(1, 1), "ragged", False)
    max_batch = (8 if ragged else 1) if max_batch is None else max_batch
    if max_batch > 1 and not ragged:
        raise ValueError(f"--max-batch above 1 needs the native backbone, not {type(engine.backbone).__name__}: "
                         "use --backend native (Llama-family models) or --max-batch 1")
    scheduler = Scheduler(engine, max_batch, max_waiting)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.close()

    app = FastAPI(title="RecycleGPT", description="OpenAI-compatible API with recycled decoding", lifespan=lifespan)
    app.state.scheduler = scheduler
    if api_key:
        app.add_middleware(_BearerAuth, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(ValueError)
    async def _rejected(request: Request, exc: ValueError) -> JSONResponse:
        # The engine's errors that a request can cause (prompt too long, empty...) derive from ValueError.
        return APIError(400, str(exc)).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind=kind).response()

    @app.exception_handler(_ClientGone)
    async def _gone(request: Request, exc: _ClientGone) -> Response:
        return Response(status_code=499)  # never read; nginx's "client closed request"

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error").response()

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "recyclegpt",
                "max_model_len": engine.backbone.config.max_seq_len}

    def options(req: _GenerationRequest, max_tokens: int) -> dict[str, Any]:
        """Validate a request against this server and turn it into ``Engine.generate`` keyword arguments."""
        if req.model != model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if req.n not in (None, 1):
            raise APIError(400, f"n={req.n} is not supported; this server returns one choice per prompt (n=1)",
                           param="n")
        name = req.strategy or default_strategy
        try:
            strategy = make_strategy(
                name, req.draft_len or draft_len, threshold if req.threshold is None else req.threshold,
                req.draft_width or draft_width,
                exit_layer=req.early_exit_layer or (exit_layer if name == "speed" else None),
            )
        except ValueError as exc:
            raise APIError(400, str(exc), param="strategy") from None
        if strategy.uses_module and engine.module is None:
            raise APIError(400, f"strategy {name!r} needs a recyclable module and this server has none; "
                           "restart it with --module PATH or use strategy 'standard'", param="strategy")
        sampling = SamplingConfig(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k or 0,
            top_p=1.0 if req.top_p is None else req.top_p,
            repetition_penalty=req.repetition_penalty or 1.0,
            seed=req.seed,
        )
        return {"strategy": strategy, "max_new_tokens": max_tokens, "sampling": sampling, "stop": req.stop}

    async def open_stream(
        request: Request, prompts: Sequence[str], opts: dict[str, Any]
    ) -> tuple[tuple[int, str | DecodeStats], AsyncIterator[tuple[int, str | DecodeStats]]]:
        """Queue the prompts and wait for the first item (a rejected request still gets its 4xx status);
        returns it and the rest."""
        items = _submit(scheduler, engine.prepare(prompts, opts["max_new_tokens"]), opts)
        try:
            return await _unless_disconnected(request, anext(items)), items
        except BaseException:
            await items.aclose()
            raise

    async def complete(request: Request, prompts: Sequence[str], opts: dict[str, Any]
                       ) -> tuple[list[str], list[DecodeStats]]:
        """Each prompt's whole text and counters (the rows cancelled if the client goes away first)."""
        items = _submit(scheduler, engine.prepare(prompts, opts["max_new_tokens"]), opts)
        texts, stats = [""] * len(prompts), [DecodeStats()] * len(prompts)

        async def collect() -> None:
            async for row, value in items:
                if isinstance(value, DecodeStats):
                    stats[row] = value
                else:
                    texts[row] += value

        try:
            await _unless_disconnected(request, collect())
        finally:
            await items.aclose()
        return texts, stats

    def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: answers while the server runs, even when the engine is busy."""
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The one model this server serves."""
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        """The model card, or 404 for another name."""
        if model != model_name:
            raise APIError(404, f"the model {model!r} does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        """Text completion; a list of prompts is decoded as one batch (streamed: one after another)."""
        max_tokens = req.max_tokens or 128
        opts = options(req, max_tokens)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        header = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                  "model": model_name}
        if req.stream:
            def chunk(row: int, text: str | None, finish: str | None) -> dict[str, Any]:
                return {**header, "choices": [{"index": row, "text": text or "", "logprobs": None,
                                               "finish_reason": finish}]}

            first, items = await open_stream(request, prompts, opts)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse_response(_event_stream(first, items, (), chunk, header, include_usage))
        texts, stats = await complete(request, prompts, opts)
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": s.finish_reasons[0]}
                   for i, (t, s) in enumerate(zip(texts, stats, strict=True))]
        return {**header, "choices": choices, "usage": _usage(stats_of(stats))}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Any:
        """Chat completion: the messages through the tokenizer's chat template, then one reply."""
        if not chat:
            raise APIError(400, f"{model_name!r} is a base model without chat tuning; use /v1/completions")
        max_tokens = req.max_completion_tokens or req.max_tokens or 128
        opts = options(req, max_tokens)
        try:
            prompt = engine.tokenizer.apply_chat([m.to_template() for m in req.messages])
        except TemplateError as exc:  # e.g. roles out of the order the template accepts
            raise APIError(400, f"the model's chat template rejected these messages: {exc}", param="messages") from None
        header = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                  "created": int(time.time()), "model": model_name}
        if req.stream:
            def chunk(row: int, text: str | None, finish: str | None) -> dict[str, Any]:
                delta = {} if text is None else {"content": text}
                return {**header, "choices": [{"index": row, "delta": delta, "logprobs": None,
                                               "finish_reason": finish}]}

            opening = [{**header, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]}]
            first, items = await open_stream(request, [prompt], opts)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse_response(_event_stream(first, items, opening, chunk, header, include_usage))
        texts, stats = await complete(request, [prompt], opts)
        choice = {"index": 0, "message": {"role": "assistant", "content": texts[0]}, "logprobs": None,
                  "finish_reason": stats[0].finish_reasons[0]}
        return {**header, "object": "chat.completion", "choices": [choice], "usage": _usage(stats[0])}

    return app
