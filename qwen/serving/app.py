"""The OpenAI-compatible HTTP API (FastAPI) over a :class:`~qwen.serving.engine.Engine`.

``create_app(engine, ...)`` returns the FastAPI application; ``load_engine(...)`` loads
a checkpoint into an engine. ``openai_api.py`` at the repository root is the command
line around both. Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions``, ``GET /health`` (engine counters) and the OpenAPI docs at
``/docs``. Errors have OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen.qwen_generation_utils import call_off_main_thread, make_context
from qwen.serving.engine import (
    ContextLengthError,
    Engine,
    EngineStoppedError,
    QueueFullError,
    SamplingParams,
    Update,
)
from qwen.serving.function_call import (
    REACT_STOP,
    PromptError,
    ReactStream,
    build_chat_prompt,
    continues_final_answer,
    function_names,
    in_react_turn,
    parse_react,
    select_functions,
)
from qwen.serving.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    ResponseFunctionCall,
    ResponseMessage,
    ResponseToolCall,
    Usage,
    chat_chunk,
    completion_chunk,
    usage_chunk,
)

logger = logging.getLogger("qwen.serving")

MAX_STOP_STRINGS = 16
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_LOG_KEY = "qwen.request_log"
_ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    429: {"model": ErrorResponse, "description": "Queue full; see Retry-After"},
}


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# --------------------------------------------------------------------------- loading


def load_engine(
    checkpoint: str,
    *,
    cpu_only: bool = False,
    dtype: str = "auto",
    max_batch_size: int = 16,
    max_queue: int = 64,
    max_model_len: int | None = None,
    max_prefill_tokens: int = 4096,
    pack_weights: bool = True,
) -> Engine:
    """Load ``checkpoint`` (model and tokenizer) into an engine (not started).

    ``dtype="auto"`` is the library's choice on CUDA (the config's precision flag, else
    bf16/fp16) and, on CPU, the dtype the checkpoint is stored in (bf16 for the official
    ones; float32 when the checkpoint does not say): half the memory of float32 and, with
    the model's blocked float32 matmuls, faster for single requests and batches alike
    (see docs/openai_api.md).

    ``pack_weights``: on CPUs with native bf16/fp16 matmuls (AVX512-BF16, AMX), give the
    model a oneDNN-packed second copy of its half-precision weights for batched decoding
    steps (:func:`qwen.cpu_engine.pack_for_cpu_batches`): about 40% faster steps for
    twice the weights' memory. Ignored elsewhere and with ``max_batch_size`` 1.

    The model is loaded (and packed) in a helper thread, so that the calling thread keeps
    no OpenMP workers that would slow the engine's own thread down (see
    :func:`qwen.qwen_generation_utils.call_off_main_thread`).

    Raises :class:`qwen.demo_utils.CheckpointError`, with a one-line message naming the
    file and the fix, for a checkpoint that is missing, damaged or cannot be loaded.
    """
    from qwen.demo_utils import check_weights, loading_errors, resolve_checkpoint

    # A missing directory, an unreadable config.json or a cut-short weights file is named
    # here, before minutes of loading.
    checkpoint, is_local = resolve_checkpoint(checkpoint)
    if is_local:
        check_weights(checkpoint)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qwen  # noqa: F401  (registers the Qwen-1 classes)
    from qwen.loading import stored_dtype

    use_cuda = torch.cuda.is_available() and not cpu_only
    device = "cuda" if use_cuda else "cpu"
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype != "auto" and dtype not in dtypes:
        raise ValueError(f"dtype must be one of auto, {', '.join(dtypes)}; got {dtype!r}")
    with loading_errors(checkpoint, is_local):
        torch_dtype = dtypes.get(dtype) if dtype != "auto" else None if use_cuda else stored_dtype(checkpoint)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    kwargs: dict[str, Any] = {"device_map": device}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype

    def load():
        model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs).eval()
        if pack_weights and device == "cpu" and max_batch_size > 1:
            from qwen.cpu_engine import pack_for_cpu_batches

            added = pack_for_cpu_batches(model, max_batch_size)
            if added:
                logger.info(
                    "packed the weights for batched CPU decoding (+%.2f GB; --no-pack-weights to skip)", added / 1e9
                )
        return model

    # Off the main thread: the engine decodes in its own thread, which runs 10-20% slower
    # when the main thread has OpenMP workers of its own (see call_off_main_thread).
    with loading_errors(checkpoint, is_local):
        model = call_off_main_thread(load)
    return Engine(
        model,
        tokenizer,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        max_model_len=max_model_len,
        max_prefill_tokens=max_prefill_tokens,
    )


# --------------------------------------------------------------------------- app


def create_app(
    engine: Engine,
    *,
    served_model_name: str = "qwen",
    api_key: str | None = None,
    api_auth: str | None = None,
    enable_test_hooks: bool = False,
) -> FastAPI:
    """The FastAPI application serving ``engine`` (started and stopped with the app).

    Args:
        served_model_name: The model id in ``/v1/models`` and in every reply (requests
            may name any model).
        api_key: If set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
        api_auth: ``"user:password"``; if set, ``/v1/*`` accepts HTTP basic auth with it
            (either credential works when both are set).
        enable_test_hooks: Accept the request field ``forced_output`` (a string the
            model is made to generate), for end-to-end tests of function calling with
            random test checkpoints.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(
        title="Qwen OpenAI-compatible API",
        description="Chat and text completions from a first-generation Qwen model, with continuous batching.",
        lifespan=lifespan,
    )
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key is empty: pass None to serve without a key")
    if api_auth is not None and not all(api_auth.partition(":")[::2]):
        raise ValueError("api_auth must be 'user:password' with neither part empty")
    server = _Server(engine, served_model_name, enable_test_hooks)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        _log_info(request)["error"] = error.message
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        problem = _validation_problem(error)
        _log_info(request)["error"] = problem.message
        return problem.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        code = "not_found" if error.status_code == 404 else None
        return APIError(error.status_code, str(error.detail), param=None, code=code).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, error: Exception):
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error").response()

    @app.get("/health", response_model=Health, tags=["server"])
    async def health():
        """Liveness and engine counters: ``active`` (requests in the batch), ``waiting``..."""
        status = "ok" if engine.running else "stopped"
        return JSONResponse({"status": status, **engine.stats()}, status_code=200 if engine.running else 503)

    @app.get("/v1/models", response_model=ModelList, tags=["openai"])
    async def list_models():
        return ModelList(data=[server.card()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, tags=["openai"])
    async def get_model(model_id: str):
        if model_id != served_model_name:
            raise APIError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")
        return server.card()

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses=_ERROR_RESPONSES,
        tags=["openai"],
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """Chat completion (``stream=true``: server-sent events), with tools through ReAct."""
        return await server.chat(body, request)

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses=_ERROR_RESPONSES,
        tags=["openai"],
    )
    async def completions(body: CompletionRequest, request: Request):
        """Plain text completion of a prompt (string, list of strings, or token ids)."""
        return await server.complete(body, request)

    if api_key or api_auth:  # every /v1/* request, before its body is read: a 401 comes first
        app.add_middleware(_AuthGate, check=_auth_check(api_key, api_auth))
    app.add_middleware(_RequestLog)
    return app


# --------------------------------------------------------------------------- helpers


def _auth_check(api_key: str | None, api_auth: str | None):
    async def check(request: Request) -> None:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        scheme, credentials = scheme.lower(), credentials.strip()
        if api_key and scheme == "bearer" and hmac.compare_digest(credentials.encode(), api_key.encode()):
            return
        if api_auth and scheme == "basic":
            try:
                decoded = base64.b64decode(credentials, validate=True)
            except (binascii.Error, ValueError):
                decoded = b""
            if hmac.compare_digest(decoded, api_auth.encode()):
                return
        headers = {"WWW-Authenticate": "Basic" if api_auth and not api_key else "Bearer"}
        if not credentials:
            message = "Missing credentials: send 'Authorization: Bearer <API key>'" + (
                " or HTTP basic auth" if api_auth else ""
            )
        else:
            message = "Incorrect API key or credentials provided."
        raise APIError(401, message, param=None, code="invalid_api_key", headers=headers)

    return check


def _validation_problem(error: RequestValidationError) -> APIError:
    problems = error.errors()
    if not problems:
        return _bad("invalid request")
    first = problems[0]
    if first.get("type") == "json_invalid":
        return _bad(f"We could not parse the JSON body of your request: {first.get('msg')}", code="invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # Union members add their type names to the location; keep the field path.
    loc = [part for part in loc if not any(c in part for c in "[]") and part not in _TYPE_NAMES]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'." if param else "Missing request body."
    else:
        message = f"Invalid value for '{param}': {first.get('msg')}" if param else str(first.get("msg"))
    if len(problems) > 1:
        message += f" ({len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return _bad(message, param=param, code="invalid_value" if first.get("type") != "missing" else "missing")


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "function-after", "union"}


def _log_info(request: Request) -> dict:
    return request.scope.setdefault(_LOG_KEY, {})


class _RequestLog:
    """One log line per request: id, path, status, tokens, time (pure ASGI, so it also
    times streaming responses to their end)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        info = scope.setdefault(_LOG_KEY, {})
        status = [None]

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except Exception:
            status[0] = status[0] or 500
            raise
        finally:
            path = scope.get("path", "")
            level = logging.DEBUG if path in ("/health", "/docs", "/openapi.json") else logging.INFO
            fields = [f"id={info.get('id', '-')}", f"{scope.get('method')} {path}", f"status={status[0]}"]
            for key in ("prompt_tokens", "completion_tokens", "finish", "stream", "n", "error"):
                if key in info:
                    fields.append(f"{key}={info[key]}")
            fields.append(f"time={time.perf_counter() - start:.3f}s")
            logger.log(level, "request %s", " ".join(fields))


class _AuthGate:
    """Checks the credentials of ``/v1/*`` requests before anything reads their body (a
    route's own dependencies run after FastAPI has parsed it, so malformed JSON without
    credentials got a 400 rather than the 401). Pure ASGI, like :class:`_RequestLog`."""

    def __init__(self, app, check):
        self.app = app
        self.check = check

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path", "").startswith("/v1/"):
            try:
                await self.check(Request(scope))
            except APIError as error:
                scope.setdefault(_LOG_KEY, {})["error"] = error.message
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Pending:
    """The engine requests of one HTTP request and a queue of their updates."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Update]] = asyncio.Queue()
        self.handles = []
        self.checked = time.monotonic()

    def submit(self, items: Sequence[tuple[list[int], SamplingParams]], request_id: str) -> None:
        def callback_for(index: int):
            def callback(update: Update) -> None:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, update))

            return callback

        requests = [(ids, params, callback_for(i), f"{request_id}/{i}") for i, (ids, params) in enumerate(items)]
        try:
            self.handles = self.engine.submit_many(requests)
        except QueueFullError as error:
            raise APIError(
                429, str(error), type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"}
            ) from None
        except EngineStoppedError as error:
            raise APIError(503, str(error), type="server_error", code="engine_stopped") from None
        except ContextLengthError as error:
            raise _bad(str(error), param="messages", code="context_length_exceeded") from None
        except ValueError as error:
            raise _bad(str(error)) from None

    async def next(self, request: Request | None = None, poll: float = 0.5) -> tuple[int, Update]:
        """The next update; with ``request``, a client that went away (checked every
        ``poll`` seconds) cancels everything and raises ``_ClientGone``."""
        if request is None:
            return await self.queue.get()
        while True:
            now = time.monotonic()
            if now - self.checked >= poll:
                self.checked = now
                if await request.is_disconnected():
                    self.cancel()
                    raise _ClientGone()
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=poll)
            except TimeoutError:
                pass

    def cancel(self) -> None:
        for handle in self.handles:
            self.engine.cancel(handle)


class _ClientGone(Exception):
    pass


class _Server:
    def __init__(self, engine: Engine, name: str, test_hooks: bool):
        self.engine = engine
        self.name = name
        self.test_hooks = test_hooks
        self.tokenizer = engine.tokenizer
        self.generation_config = engine.model.generation_config
        tok = self.tokenizer
        self.stop_token_ids = list(dict.fromkeys([tok.im_end_id, tok.im_start_id, tok.eod_id]))
        self.vocab_size = int(engine.model.config.vocab_size)

    def card(self) -> ModelCard:
        return ModelCard(id=self.name, max_model_len=self.engine.max_model_len)

    # ------------------------------------------------------------------ parameters

    def _defaults(self) -> dict[str, Any]:
        config = self.generation_config
        do_sample = getattr(config, "do_sample", True)
        return {
            "temperature": float(getattr(config, "temperature", 1.0) or 1.0) if do_sample else 0.0,
            "top_p": float(getattr(config, "top_p", 1.0) or 1.0),
            "top_k": int(getattr(config, "top_k", 0) or 0),
            "repetition_penalty": float(getattr(config, "repetition_penalty", 1.0) or 1.0),
        }

    def _params(
        self, body, max_tokens: int, stop: list[str], strip: bool, index: int, forced: list[int] | None
    ) -> SamplingParams:
        defaults = self._defaults()
        top_k = body.top_k if body.top_k is not None else defaults["top_k"]
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature if body.temperature is not None else defaults["temperature"],
            top_p=body.top_p if body.top_p is not None else defaults["top_p"],
            top_k=max(int(top_k), 0),
            repetition_penalty=(
                body.repetition_penalty if body.repetition_penalty is not None else defaults["repetition_penalty"]
            ),
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            seed=None if body.seed is None else body.seed + index,
            stop=stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=body.ignore_eos,
            strip=strip,
            forced_token_ids=forced,
        )

    def _stop(self, body) -> list[str]:
        stop = body.stop
        if stop is None:
            return []
        stop = [stop] if isinstance(stop, str) else list(stop)
        if len(stop) > MAX_STOP_STRINGS:
            raise _bad(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop")
        return [s for s in stop if s]

    def _forced(self, body) -> list[int] | None:
        forced = (body.model_extra or {}).get("forced_output")
        if forced is None:
            return None
        if not self.test_hooks:
            raise _bad(
                "forced_output is a testing aid; start the server with --enable-test-hooks to use it",
                param="forced_output",
            )
        if not isinstance(forced, str):
            raise _bad("forced_output must be a string", param="forced_output")
        return list(self.tokenizer.encode(forced, allowed_special=set(), disallowed_special=()))

    def _max_tokens(self, body, prompt_tokens: int, default: int | None, param: str) -> int:
        limit = self.engine.max_model_len
        requested = body.max_tokens
        # Only where the request model declares (and so validates) them: on
        # /v1/completions these names are unknown extra fields, ignored like any other.
        declared = type(body).model_fields
        if "max_completion_tokens" in declared and body.max_completion_tokens is not None:
            requested = body.max_completion_tokens
        legacy = body.max_length if "max_length" in declared else None
        if requested is None and legacy is not None:
            if legacy <= prompt_tokens:
                raise _bad(
                    f"max_length={legacy} leaves no room for a completion after the {prompt_tokens}-token prompt",
                    param="max_length",
                    code="context_length_exceeded",
                )
            requested = legacy - prompt_tokens
        if requested is None:
            room = limit - prompt_tokens
            if room < 1:
                raise _bad(
                    f"This model's maximum context length is {limit} tokens. However, your messages resulted in "
                    f"{prompt_tokens} tokens. Please reduce the length of the messages.",
                    param=param,
                    code="context_length_exceeded",
                )
            return min(default, room) if default else room
        try:
            self.engine.check_length(prompt_tokens, requested)
        except ContextLengthError as error:
            raise _bad(str(error), param=param, code="context_length_exceeded") from None
        return requested

    # ------------------------------------------------------------------ chat

    async def chat(self, body: ChatCompletionRequest, request: Request):
        info = _log_info(request)
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        info.update(id=request_id, stream=body.stream, n=body.n)
        self._warn_ignored(body, request_id)
        if getattr(self.generation_config, "chat_format", "chatml") != "chatml":
            raise _bad(
                "this checkpoint is a base (non-chat) model: use /v1/completions for plain text completion",
                param="messages",
                code="not_a_chat_model",
            )
        if body.logprobs:
            raise _bad("logprobs are not supported by this server", param="logprobs")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise _bad("only response_format type 'text' is supported", param="response_format")
        try:
            functions, style = select_functions(
                [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
                body.tool_choice,
                [f.model_dump(exclude_none=True) for f in body.functions] if body.functions else None,
                body.function_call,
            )
            prompt = build_chat_prompt([m.model_dump(exclude_none=True) for m in body.messages], functions)
        except PromptError as error:
            raise _bad(str(error), param=error.param) from None
        _, ids = make_context(
            self.tokenizer,
            prompt.query,
            history=prompt.history,
            system=prompt.system,
            max_window_size=None,
            chat_format="chatml",
        )
        if prompt.prefill:
            ids = ids + list(self.tokenizer.encode(prompt.prefill, allowed_special=set(), disallowed_special=()))
        stop = self._stop(body)
        if functions and REACT_STOP not in stop:
            stop.append(REACT_STOP)
        default_max = getattr(self.generation_config, "max_new_tokens", None)
        max_tokens = self._max_tokens(body, len(ids), default_max, "messages")
        forced = self._forced(body)
        info["prompt_tokens"] = len(ids)
        pending = _Pending(self.engine)
        pending.submit(
            [(ids, self._params(body, max_tokens, stop, True, i, forced)) for i in range(body.n)], request_id
        )
        names = function_names(functions) if functions else None
        if style and continues_final_answer(prompt.prefill):
            # continuing an assistant message that is a final answer: plain text, streamed
            style, names = None, None
        elif style and not functions:
            # tool_choice / function_call "none": the model may not call anything. A plain
            # reply streams as it comes; one continuing a ReAct turn of the history is
            # still parsed for its final answer, with no name accepted as a call.
            style, names = (style, {}) if in_react_turn(prompt.prefill) else (None, None)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._chat_events(pending, request_id, body.n, style, names, len(ids), include_usage, info)
            return _sse(events, pending)
        return await self._chat_response(pending, request, request_id, body.n, style, names, len(ids), info)

    def _message(self, text: str, reason: str, style: str | None, names) -> tuple[ResponseMessage, str]:
        if style is None:
            return ResponseMessage(content=text), reason
        reply = parse_react(text, names)
        if not reply.is_call:
            return ResponseMessage(content=reply.content), reason
        call = ResponseFunctionCall(name=reply.name, arguments=reply.arguments)
        if style == "functions":
            return ResponseMessage(content=reply.content, function_call=call), "function_call"
        tool_call = ResponseToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=call)
        return ResponseMessage(content=reply.content, tool_calls=[tool_call]), "tool_calls"

    async def _chat_response(self, pending, request, request_id, n, style, names, prompt_tokens, info):
        texts, reasons, tokens = _collect_init(n)
        try:
            await _collect(pending, request, texts, reasons, tokens)
        except _ClientGone:
            info["finish"] = "cancelled"
            return JSONResponse({"error": "client disconnected"}, status_code=499)
        choices = []
        for i in range(n):
            message, reason = self._message("".join(texts[i]), reasons[i], style, names)
            choices.append(ChatChoice(index=i, message=message, finish_reason=reason))
        usage = _usage(prompt_tokens, sum(tokens))
        info.update(completion_tokens=sum(tokens), finish=",".join(c.finish_reason for c in choices))
        return ChatCompletionResponse(id=request_id, model=self.name, choices=choices, usage=usage)

    async def _chat_events(self, pending, request_id, n, style, names, prompt_tokens, include_usage, info):
        created = int(time.time())
        streams = [ReactStream(names) for _ in range(n)] if style else None
        tokens = [0] * n
        reasons: list[str | None] = [None] * n
        info["finish"] = "cancelled"
        try:
            for i in range(n):
                yield _json(chat_chunk(request_id, created, self.name, i, {"role": "assistant", "content": ""}))
            while any(r is None for r in reasons):
                i, update = await pending.next()
                tokens[i] = update.completion_tokens
                if update.error:
                    reasons[i] = "error"
                    yield _json(APIError(500, update.error, type="server_error").body())
                    continue
                content = streams[i].feed(update.text) if streams else update.text
                if content:
                    yield _json(chat_chunk(request_id, created, self.name, i, {"content": content}))
                if not update.finished:
                    continue
                reason = update.finish_reason
                if streams:
                    rest, reply = streams[i].finish()
                    if rest:
                        yield _json(chat_chunk(request_id, created, self.name, i, {"content": rest}))
                    if reply.is_call:
                        yield _json(chat_chunk(request_id, created, self.name, i, _call_delta(reply, style)))
                        reason = "function_call" if style == "functions" else "tool_calls"
                reasons[i] = reason
                yield _json(chat_chunk(request_id, created, self.name, i, {}, finish_reason=reason))
            if include_usage:
                usage = _usage(prompt_tokens, sum(tokens))
                yield _json(usage_chunk(request_id, created, self.name, "chat.completion.chunk", usage))
            yield "[DONE]"
            info["finish"] = ",".join(str(r) for r in reasons)
        finally:
            pending.cancel()
            info["completion_tokens"] = sum(tokens)

    # ------------------------------------------------------------------ completions

    def _prompts(self, body: CompletionRequest) -> list[tuple[list[int], str]]:
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise _bad("prompt must not be empty", param="prompt")
        out = []
        for k, item in enumerate(prompt):
            if isinstance(item, str):
                ids = list(self.tokenizer.encode(item))
                text = item
            elif isinstance(item, int):  # a single prompt given as token ids
                return [self._token_prompt(prompt, "prompt")]
            else:
                out.append(self._token_prompt(item, f"prompt.{k}"))
                continue
            if not ids:
                raise _bad("prompt must not be empty", param="prompt" if len(prompt) == 1 else f"prompt.{k}")
            out.append((ids, text))
        return out

    def _token_prompt(self, ids: list[int], param: str) -> tuple[list[int], str]:
        if not ids:
            raise _bad("prompt must not be empty", param=param)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise _bad(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})", param=param)
        return list(ids), self.tokenizer.decode(ids, errors="replace")

    async def complete(self, body: CompletionRequest, request: Request):
        info = _log_info(request)
        request_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        info.update(id=request_id, stream=body.stream, n=body.n)
        self._warn_ignored(body, request_id)
        if body.suffix:  # an empty suffix asks for nothing
            raise _bad("suffix is not supported by this server", param="suffix")
        if body.logprobs is not None:  # logprobs=0 still asks for the chosen tokens' logprobs
            raise _bad("logprobs are not supported by this server", param="logprobs")
        if body.best_of is not None and body.best_of != body.n:
            raise _bad("best_of is not supported by this server (leave it unset or equal to n)", param="best_of")
        prompts = self._prompts(body)
        stop = self._stop(body)
        forced = self._forced(body)
        items = []
        for ids, _ in prompts:
            max_tokens = self._max_tokens(body, len(ids), COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt")
            items += [(ids, self._params(body, max_tokens, stop, False, i, forced)) for i in range(body.n)]
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        info["prompt_tokens"] = prompt_tokens
        pending = _Pending(self.engine)
        pending.submit(items, request_id)
        echoes = [text if body.echo else "" for _, text in prompts for _ in range(body.n)]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._completion_events(pending, request_id, echoes, prompt_tokens, include_usage, info)
            return _sse(events, pending)
        texts, reasons, tokens = _collect_init(len(items))
        try:
            await _collect(pending, request, texts, reasons, tokens)
        except _ClientGone:
            info["finish"] = "cancelled"
            return JSONResponse({"error": "client disconnected"}, status_code=499)
        choices = [
            CompletionChoice(index=i, text=echoes[i] + "".join(texts[i]), finish_reason=reasons[i])
            for i in range(len(items))
        ]
        info.update(completion_tokens=sum(tokens), finish=",".join(reasons))
        return CompletionResponse(
            id=request_id, model=self.name, choices=choices, usage=_usage(prompt_tokens, sum(tokens))
        )

    async def _completion_events(self, pending, request_id, echoes, prompt_tokens, include_usage, info):
        created = int(time.time())
        count = len(echoes)
        tokens = [0] * count
        reasons: list[str | None] = [None] * count
        info["finish"] = "cancelled"
        try:
            for i, echo in enumerate(echoes):
                if echo:
                    yield _json(completion_chunk(request_id, created, self.name, i, echo))
            while any(r is None for r in reasons):
                i, update = await pending.next()
                tokens[i] = update.completion_tokens
                if update.error:
                    reasons[i] = "error"
                    yield _json(APIError(500, update.error, type="server_error").body())
                    continue
                if update.text:
                    yield _json(completion_chunk(request_id, created, self.name, i, update.text))
                if update.finished:
                    reasons[i] = update.finish_reason
                    yield _json(completion_chunk(request_id, created, self.name, i, "", update.finish_reason))
            if include_usage:
                usage = _usage(prompt_tokens, sum(tokens))
                yield _json(usage_chunk(request_id, created, self.name, "text_completion", usage))
            yield "[DONE]"
            info["finish"] = ",".join(str(r) for r in reasons)
        finally:
            pending.cancel()
            info["completion_tokens"] = sum(tokens)

    def _warn_ignored(self, body, request_id: str) -> None:
        extra = set(body.model_extra or {}) - {"forced_output"}
        if extra:
            logger.info("request %s: ignoring unsupported fields %s", request_id, ", ".join(sorted(extra)))


def _collect_init(n: int):
    return [[] for _ in range(n)], [None] * n, [0] * n


async def _collect(pending: _Pending, request: Request, texts, reasons, tokens) -> None:
    """Wait for every choice to finish (non-streaming); errors become a 500."""
    while any(r is None for r in reasons):
        i, update = await pending.next(request)
        texts[i].append(update.text)
        tokens[i] = update.completion_tokens
        if update.finished:
            if update.error:
                pending.cancel()
                raise APIError(500, update.error, type="server_error", code="generation_failed")
            reasons[i] = update.finish_reason


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _call_delta(reply, style: str) -> dict:
    call = {"name": reply.name, "arguments": reply.arguments}
    if style == "functions":
        return {"function_call": call}
    return {"tool_calls": [{"index": 0, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call}]}


def _json(payload: dict) -> str:
    return json.dumps(payload, ensure_ascii=False)


def _sse(events: AsyncIterator[str], pending: _Pending) -> EventSourceResponse:
    async def on_close(message) -> None:  # the client went away: free its batch slots now
        pending.cancel()

    return EventSourceResponse(events, ping=15, client_close_handler_callable=on_close)
