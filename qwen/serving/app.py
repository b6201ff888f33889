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
import codecs
import contextlib
import dataclasses
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
from qwen.serving.constraints import Constraints, ConstraintsUnavailable
from qwen.serving.engine import (
    ContextLengthError,
    Engine,
    EngineStoppedError,
    QueueFullError,
    SamplingParams,
    TokenLogprob,
    Update,
)
from qwen.serving.function_call import (
    REACT_STOP,
    PromptError,
    ReactStream,
    arguments_schema,
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
MAX_LOGIT_BIAS = 1024  # most tokens one request may bias
# A token of the Qwen vocabulary is at most 128 bytes; an oversized text is found out by
# tokenizing a prefix of it (see count_tokens_capped), with this many tokens of slack
# for the cut (a prefix can take a few more tokens than the same span of the whole).
PREFIX_SLACK = 16
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_LOG_KEY = "qwen.request_log"
_ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    413: {"model": ErrorResponse, "description": "Request body over the server's limit"},
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


def default_max_body_bytes(max_model_len: int) -> int:
    """The default request-body limit: 64 bytes per token of context, at least 1 MiB.

    A prompt that fills the context takes about 4 bytes a token as English text, up to
    about 9 as JSON-escaped Chinese (``\\u4e2d``) and 7 as token ids; 64 leaves room
    for long conversations, tool definitions and several prompts in one completions
    request, while a body that could never fit is refused before it is read."""
    return max(1 << 20, 64 * int(max_model_len))


def count_tokens_capped(encode, text: str, cap: int) -> int:
    """``len(encode(text))``, except that a text with clearly more than ``cap`` tokens is
    found out from a prefix: prefixes of doubling length are tokenized, and the first
    one with more than ``cap + PREFIX_SLACK`` tokens ends the count (its count is
    returned). The work is bounded by the cap, not by the length of the text."""
    size = max(4096, 4 * cap)
    while True:
        if len(text) <= size:
            return len(encode(text))
        count = len(encode(text[:size]))
        if count > cap + PREFIX_SLACK:
            return count
        size *= 2


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
    max_body_bytes: int | None = None,
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
        max_body_bytes: Largest request body accepted (413 beyond; the body is never
            held beyond it). Default: :func:`default_max_body_bytes` of the engine's
            ``max_model_len``.
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

    if max_body_bytes is None:
        max_body_bytes = default_max_body_bytes(engine.max_model_len)
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
    app.add_middleware(_BodyLimit, limit=int(max_body_bytes))
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


class _BodyLimit:
    """Refuses request bodies over ``limit`` bytes with a 413 before the application sees
    them: at once from ``Content-Length``, else while the body arrives (it is read here,
    never more than ``limit`` bytes of it held, then handed on). Pure ASGI."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    def _refuse(self, scope, size: str) -> APIError:
        error = APIError(
            413,
            f"The request body ({size}) is over this server's limit of {self.limit} bytes "
            "(--max-body-bytes); shorten the prompt or the conversation.",
            code="request_too_large",
            headers={"Connection": "close"},
        )
        scope.setdefault(_LOG_KEY, {})["error"] = error.message
        return error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, f"{int(declared)} bytes").response()(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(scope, f"over {self.limit} bytes").response()(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
        chunks.clear()

        async def replay():
            return body.pop() if body else await receive()

        await self.app(scope, replay, send)


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
        self.constraints = Constraints(tok, self.vocab_size, [tok.im_end_id, tok.eod_id])
        self.token_bytes: dict[int, bytes] = {rank: token for token, rank in tok.mergeable_ranks.items()}
        self.token_bytes.update((rank, text.encode()) for text, rank in tok.special_tokens.items())

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
        self,
        body,
        max_tokens: int,
        stop: list[str],
        strip: bool,
        index: int,
        forced: list[int] | None,
        **extra: Any,
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
            logit_bias=self._logit_bias(body),
            **extra,
        )

    def _logit_bias(self, body) -> dict[int, float] | None:
        if not body.logit_bias:
            return None
        if len(body.logit_bias) > MAX_LOGIT_BIAS:
            raise _bad(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens", param="logit_bias")
        bias = {}
        for key, value in body.logit_bias.items():
            token = int(key) if key.strip().isdigit() else None
            if token is None or not 0 <= token < self.vocab_size:
                raise _bad(
                    f"logit_bias keys must be token ids (0..{self.vocab_size - 1}) written as strings, got {key!r}",
                    param="logit_bias",
                    code="invalid_value",
                )
            if not -100 <= value <= 100:
                raise _bad(
                    f"logit_bias values must be between -100 and 100, got {value!r} for token {key}",
                    param="logit_bias",
                    code="invalid_value",
                )
            bias[token] = float(value)
        return bias

    def _check_fits(self, texts: Sequence[str], param: str) -> None:
        """Refuse text that cannot fit the context before all of it is tokenized."""
        limit = self.engine.max_model_len
        text = "\n".join(t for t in texts if t)
        count = count_tokens_capped(self._encode_plain, text, limit)
        if count > limit:
            raise _bad(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"{'messages' if param == 'messages' else 'prompt'} resulted in at least {count - PREFIX_SLACK} "
                "tokens. Please reduce the length of the messages or prompt.",
                param=param,
                code="context_length_exceeded",
            )

    def _encode_plain(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, allowed_special=set(), disallowed_special=())

    def _grammar(self, make, param: str):
        """Compile a grammar (worker thread); errors become 400s naming ``param``."""
        try:
            return make()
        except ConstraintsUnavailable as error:
            raise _bad(f"{error} (needed by {param})", param=param, code="unsupported") from None
        except ValueError as error:
            raise _bad(str(error), param=param) from None

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
        if body.top_logprobs is not None and not body.logprobs:
            raise _bad("top_logprobs needs logprobs: true", param="top_logprobs")
        # Building and tokenizing a big prompt and compiling a grammar take a while: in a
        # worker thread, so that the other clients keep being served meanwhile.
        work = await asyncio.to_thread(self._prepare_chat, body)
        ids, functions, style = work.ids, work.functions, work.style
        stop = self._stop(body)
        if functions and REACT_STOP not in stop:
            stop.append(REACT_STOP)
        default_max = getattr(self.generation_config, "max_new_tokens", None)
        max_tokens = self._max_tokens(body, len(ids), default_max, "messages")
        forced = self._forced(body)
        top = (body.top_logprobs or 0) if body.logprobs else None
        info["prompt_tokens"] = len(ids)
        items = [
            (
                ids,
                self._params(body, max_tokens, stop, True, i, forced, logprobs=top, logits_processors=work.processors),
            )
            for i in range(body.n)
        ]
        pending = _Pending(self.engine)
        pending.submit(items, request_id)
        names = function_names(functions) if functions else None
        prefill = work.prompt.prefill
        if style and continues_final_answer(prefill):
            # continuing an assistant message that is a final answer: plain text, streamed
            style, names = None, None
        elif style and not functions:
            # tool_choice / function_call "none": the model may not call anything. A plain
            # reply streams as it comes; one continuing a ReAct turn of the history is
            # still parsed for its final answer, with no name accepted as a call.
            style, names = (style, {}) if in_react_turn(prefill) else (None, None)
        reply = _ChatReply(style, names, body.parallel_tool_calls is not False, top is not None)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._chat_events(pending, request_id, body.n, reply, len(ids), include_usage, info)
            return _sse(events, pending)
        return await self._chat_response(pending, request, request_id, body.n, reply, len(ids), info)

    def _prepare_chat(self, body: ChatCompletionRequest) -> _ChatWork:
        """The prompt, its ids, the functions and the constraints of a chat request
        (runs in a worker thread)."""
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
        texts = [prompt.system, prompt.query, prompt.prefill, *(text for turn in prompt.history for text in turn)]
        self._check_fits(texts, "messages")
        _, ids = make_context(
            self.tokenizer,
            prompt.query,
            history=prompt.history,
            system=prompt.system,
            max_window_size=None,
            chat_format="chatml",
        )
        if prompt.prefill:
            ids = ids + self._encode_plain(prompt.prefill)
        processors = []
        response_format = self._response_format(body)
        if response_format is not None:
            if functions:
                raise _bad(
                    "response_format json_object/json_schema cannot be combined with tools "
                    "(leave the tools out, or set tool_choice 'none')",
                    param="response_format",
                )
            processors.append(response_format)
        call = self._forced_call(body, functions, prompt.prefill)
        if call is not None:
            processors.append(call)
        return _ChatWork(prompt, ids, functions, style, processors)

    def _response_format(self, body: ChatCompletionRequest):
        spec = body.response_format
        kind = spec.get("type", "text") if spec else "text"
        if kind == "text":
            return None
        if kind == "json_object":
            return self._grammar(lambda: self.constraints.json_schema(None), "response_format")
        if kind == "json_schema":
            described = spec.get("json_schema")
            schema = described.get("schema") if isinstance(described, dict) else None
            if not isinstance(described, dict) or not isinstance(schema, dict | None):
                raise _bad(
                    "response_format.json_schema must be an object with a 'schema' (a JSON Schema object)",
                    param="response_format.json_schema",
                )
            return self._grammar(lambda: self.constraints.json_schema(schema or None), "response_format")
        raise _bad(
            f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
            param="response_format.type",
        )

    def _forced_call(self, body: ChatCompletionRequest, functions: list[dict], prefill: str):
        """With tool_choice "required" or a named function: a grammar making the model
        write a ReAct call of one of ``functions`` (already narrowed to the named one)."""
        choice = body.tool_choice if body.tools else body.function_call
        if not functions or not (choice == "required" or isinstance(choice, dict)):
            return None
        after_thought = prefill.rstrip().endswith("Thought:")
        if prefill and not after_thought:
            logger.info("a call cannot be forced while the model continues an assistant message; not forcing it")
            return None
        schemas = {d.get("name_for_model") or d["name"]: arguments_schema(d) for d in functions}
        param = "tool_choice" if body.tools else "function_call"
        return self._grammar(lambda: self.constraints.react_call(schemas, after_thought), param)

    def _message(self, text: str, reason: str, reply: _ChatReply) -> tuple[ResponseMessage, str]:
        if reply.style is None:
            return ResponseMessage(content=text), reason
        parsed = parse_react(text, reply.names)
        if not parsed.is_call:
            return ResponseMessage(content=parsed.content), reason
        if reply.style == "functions":
            call = ResponseFunctionCall(name=parsed.name, arguments=parsed.arguments)
            return ResponseMessage(content=parsed.content, function_call=call), "function_call"
        calls = parsed.calls if reply.parallel else parsed.calls[:1]
        tool_calls = [
            ResponseToolCall(id=_call_id(), function=ResponseFunctionCall(name=name, arguments=arguments))
            for name, arguments in calls
        ]
        return ResponseMessage(content=parsed.content, tool_calls=tool_calls), "tool_calls"

    async def _chat_response(self, pending, request, request_id, n, reply: _ChatReply, prompt_tokens, info):
        texts, reasons, tokens = _collect_init(n)
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        try:
            await _collect(pending, request, texts, reasons, tokens, logprobs)
        except _ClientGone:
            info["finish"] = "cancelled"
            return JSONResponse({"error": "client disconnected"}, status_code=499)
        choices = []
        for i in range(n):
            message, reason = self._message("".join(texts[i]), reasons[i], reply)
            scores = self._chat_logprobs(logprobs[i]) if reply.logprobs else None
            choices.append(ChatChoice(index=i, message=message, finish_reason=reason, logprobs=scores))
        usage = _usage(prompt_tokens, sum(tokens))
        info.update(completion_tokens=sum(tokens), finish=",".join(c.finish_reason for c in choices))
        return ChatCompletionResponse(id=request_id, model=self.name, choices=choices, usage=usage)

    async def _chat_events(self, pending, request_id, n, reply: _ChatReply, prompt_tokens, include_usage, info):
        created = int(time.time())
        style = reply.style
        streams = [ReactStream(reply.names) for _ in range(n)] if style else None
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
                scores = self._chat_logprobs(update.logprobs) if reply.logprobs and update.logprobs else None
                if content or scores:
                    delta = {"content": content} if content or not update.finished else {}
                    yield _json(chat_chunk(request_id, created, self.name, i, delta, logprobs=scores))
                if not update.finished:
                    continue
                reason = update.finish_reason
                if streams:
                    rest, parsed = streams[i].finish()
                    if rest:
                        yield _json(chat_chunk(request_id, created, self.name, i, {"content": rest}))
                    if parsed.is_call:
                        delta = _call_delta(parsed, style, reply.parallel)
                        yield _json(chat_chunk(request_id, created, self.name, i, delta))
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

    # ------------------------------------------------------------------ logprobs

    def _token_text(self, token: int) -> tuple[str, list[int]]:
        """A token as OpenAI shows it: its text, or ``bytes:\\xe4...`` where its bytes are
        not whole UTF-8 characters; and its bytes."""
        raw = self.token_bytes.get(token, b"")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text, list(raw)

    def _chat_logprobs(self, entries: Sequence[TokenLogprob]) -> dict:
        content = []
        for entry in entries:
            text, raw = self._token_text(entry.token_id)
            top = []
            for token, logprob in entry.top:
                top_text, top_raw = self._token_text(token)
                top.append({"token": top_text, "logprob": logprob, "bytes": top_raw})
            content.append({"token": text, "logprob": entry.logprob, "bytes": raw, "top_logprobs": top})
        return {"content": content}

    def _completion_logprobs(self, pairs: Sequence[tuple[int, TokenLogprob | None]], offsets: _Offsets) -> dict:
        """The legacy ``logprobs`` object: ``pairs`` are (token id, its logprob entry or
        None for a first prompt token); the chosen token is among the top ones."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, entry in pairs:
            text, _ = self._token_text(token)
            out["tokens"].append(text)
            out["text_offset"].append(offsets.next(self.token_bytes.get(token, b"")))
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top = {self._token_text(t)[0]: lp for t, lp in entry.top}
            top.setdefault(text, entry.logprob)
            out["token_logprobs"].append(entry.logprob)
            out["top_logprobs"].append(top)
        return out

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
                self._check_fits([item], "prompt")
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
        if body.best_of is not None and body.best_of != body.n:
            raise _bad("best_of is not supported by this server (leave it unset or equal to n)", param="best_of")
        prompts = await asyncio.to_thread(self._prompts, body)  # tokenizing: off the event loop
        stop = self._stop(body)
        forced = self._forced(body)
        want = body.logprobs  # logprobs=0: the chosen tokens' logprobs only
        echo_scores = want if body.echo and want is not None else None
        items = []
        for ids, _ in prompts:
            max_tokens = self._max_tokens(body, len(ids), COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt")
            params = [
                self._params(body, max_tokens, stop, False, i, forced, logprobs=want, prompt_logprobs=echo_scores)
                for i in range(body.n)
            ]
            items += [(ids, p) for p in params]
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        info["prompt_tokens"] = prompt_tokens
        pending = _Pending(self.engine)
        pending.submit(items, request_id)
        echoes = [text if body.echo else "" for _, text in prompts for _ in range(body.n)]
        prompt_ids = [ids for ids, _ in prompts for _ in range(body.n)]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._completion_events(
                pending, request_id, echoes, prompt_ids, want is not None, prompt_tokens, include_usage, info
            )
            return _sse(events, pending)
        texts, reasons, tokens = _collect_init(len(items))
        logprobs: list[list[TokenLogprob]] = [[] for _ in items]
        prompt_logprobs: list[list | None] = [None] * len(items)
        try:
            await _collect(pending, request, texts, reasons, tokens, logprobs, prompt_logprobs)
        except _ClientGone:
            info["finish"] = "cancelled"
            return JSONResponse({"error": "client disconnected"}, status_code=499)
        choices = []
        for i in range(len(items)):
            scores = None
            if want is not None:
                pairs = list(zip(prompt_ids[i], prompt_logprobs[i], strict=True)) if echoes[i] else []
                pairs += [(entry.token_id, entry) for entry in logprobs[i]]
                scores = self._completion_logprobs(pairs, _Offsets())
            text = echoes[i] + "".join(texts[i])
            choices.append(CompletionChoice(index=i, text=text, finish_reason=reasons[i], logprobs=scores))
        info.update(completion_tokens=sum(tokens), finish=",".join(reasons))
        return CompletionResponse(
            id=request_id, model=self.name, choices=choices, usage=_usage(prompt_tokens, sum(tokens))
        )

    async def _completion_events(
        self, pending, request_id, echoes, prompt_ids, with_logprobs, prompt_tokens, include_usage, info
    ):
        created = int(time.time())
        count = len(echoes)
        tokens = [0] * count
        reasons: list[str | None] = [None] * count
        offsets = [_Offsets() for _ in range(count)]
        info["finish"] = "cancelled"
        try:
            for i, echo in enumerate(echoes):
                if echo and not with_logprobs:  # with logprobs: sent with the prompt's, in the first update
                    yield _json(completion_chunk(request_id, created, self.name, i, echo))
            while any(r is None for r in reasons):
                i, update = await pending.next()
                tokens[i] = update.completion_tokens
                if update.error:
                    reasons[i] = "error"
                    yield _json(APIError(500, update.error, type="server_error").body())
                    continue
                if with_logprobs and update.prompt_logprobs is not None and echoes[i]:
                    pairs = list(zip(prompt_ids[i], update.prompt_logprobs, strict=True))
                    scores = self._completion_logprobs(pairs, offsets[i])
                    yield _json(completion_chunk(request_id, created, self.name, i, echoes[i], logprobs=scores))
                scores = None
                if with_logprobs and update.logprobs:
                    pairs = [(entry.token_id, entry) for entry in update.logprobs]
                    scores = self._completion_logprobs(pairs, offsets[i])
                if update.text or scores:
                    yield _json(completion_chunk(request_id, created, self.name, i, update.text, logprobs=scores))
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


@dataclasses.dataclass
class _ChatWork:
    prompt: Any
    ids: list[int]
    functions: list[dict]
    style: str | None
    processors: list


@dataclasses.dataclass
class _ChatReply:
    """How a chat request's text becomes its reply."""

    style: str | None  # "tools", "functions" or None (plain text)
    names: Any  # function_names() of the described functions; {} accepts none
    parallel: bool  # several tool calls in one reply allowed
    logprobs: bool


class _Offsets:
    """Character offsets of consecutive tokens in the text they decode to."""

    def __init__(self):
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.chars = 0

    def next(self, raw: bytes) -> int:
        at = self.chars
        self.chars += len(self.decoder.decode(raw))
        return at


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _collect_init(n: int):
    return [[] for _ in range(n)], [None] * n, [0] * n


async def _collect(pending: _Pending, request: Request, texts, reasons, tokens, logprobs=None, prompt_logprobs=None):
    """Wait for every choice to finish (non-streaming); errors become a 500."""
    while any(r is None for r in reasons):
        i, update = await pending.next(request)
        texts[i].append(update.text)
        tokens[i] = update.completion_tokens
        if logprobs is not None and update.logprobs:
            logprobs[i] += update.logprobs
        if prompt_logprobs is not None and update.prompt_logprobs is not None:
            prompt_logprobs[i] = update.prompt_logprobs
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


def _call_delta(reply, style: str, parallel: bool = True) -> dict:
    if style == "functions":
        return {"function_call": {"name": reply.name, "arguments": reply.arguments}}
    calls = reply.calls if parallel else reply.calls[:1]
    return {
        "tool_calls": [
            {"index": k, "id": _call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
            for k, (name, arguments) in enumerate(calls)
        ]
    }


def _json(payload: dict) -> str:
    return json.dumps(payload, ensure_ascii=False)


def _sse(events: AsyncIterator[str], pending: _Pending) -> EventSourceResponse:
    async def on_close(message) -> None:  # the client went away: free its batch slots now
        pending.cancel()

    return EventSourceResponse(events, ping=15, client_close_handler_callable=on_close)
