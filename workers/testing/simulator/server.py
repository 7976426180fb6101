"""The HTTP app: OpenAI's endpoints on aiohttp, with limits, faults and latency.

A completion request goes through, in order: API key -> body size and JSON -> request fields ->
model -> context limit -> the reply is made (so that a bad schema is a 400 that costs nothing)
-> rate-limit admission (a 429 costs nothing) -> fault draw -> latency -> response.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from docqueue.workers.testing.simulator.batch_api import add_routes as add_batch_api_routes
from docqueue.workers.testing.simulator.config import SimulatorConfig
from docqueue.workers.testing.simulator.faults import Fault, FaultInjector
from docqueue.workers.testing.simulator.generate import build_reply, mark_cached
from docqueue.workers.testing.simulator.limits import (
    NS_PER_S,
    Decision,
    RateLimiter,
    retry_after_headers,
)
from docqueue.workers.testing.simulator.prefix_cache import MIN_TOKENS, PrefixCache
from docqueue.workers.testing.simulator.protocol import ApiError, CompletionRequest, Endpoint, parse
from docqueue.workers.testing.simulator.stats import Stats
from docqueue.workers.testing.simulator.tokens import encoding
from docqueue.workers.testing.simulator.words import vocabulary

logger = logging.getLogger("docq.simulator")

JSON = "application/json"
# A body over the limit is still read (and dropped) up to this size, so that the client gets
# the 413 instead of a reset connection; past it the connection is closed.
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
# Bodies larger than this are decoded and token-counted in a worker thread.
BIG_BODY_BYTES = 256 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class SimulatorState:
    config: SimulatorConfig
    limiter: RateLimiter
    faults: FaultInjector
    stats: Stats = field(default_factory=Stats)
    requests: list[dict[str, Any]] = field(default_factory=list)  # with --record-requests
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    started_s: int = field(default_factory=lambda: int(time.time()))
    jitter: random.Random = field(default_factory=random.Random)
    decoding: int = 0  # requests being decoded now (the server model: --slots, --saturation)
    slots: asyncio.Semaphore | None = None
    prefix_cache: PrefixCache = field(default_factory=PrefixCache)


STATE = web.AppKey("simulator_state", SimulatorState)


def build_app(config: SimulatorConfig) -> web.Application:
    """The aiohttp application for `config` (not yet listening)."""
    app = web.Application(middlewares=[_json_errors], client_max_size=config.max_body_bytes)
    limiter = RateLimiter(config.rpm, config.tpm, period_ns=round(config.period_s * NS_PER_S))
    state = SimulatorState(config, limiter, FaultInjector(config))
    state.jitter = random.Random(None if config.seed is None else config.seed + 1)
    if config.slots is not None:
        state.slots = asyncio.Semaphore(config.slots)
    state.prefix_cache = PrefixCache(config.prefix_cache_blocks)
    app[STATE] = state
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _text)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model}", _model)
    app.router.add_get("/stats", _stats)
    app.router.add_post("/stats/reset", _stats_reset)
    app.router.add_get("/requests", _requests)
    app.router.add_post("/limits", _change_limits)
    add_batch_api_routes(app, config, _check_key)
    app.on_response_prepare.append(_limit_headers)
    return app


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "chat")


async def _text(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "text")


async def _complete(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    state = request.app[STATE]
    state.stats.begin()
    started_s, status = time.time(), "cancelled"
    try:
        response = await _answer(request, endpoint, state)
        status = str(response.status)
        return response
    except ApiError as exc:
        state.stats.answered(exc.status)
        status = str(exc.status)
        return error_response(exc)
    except asyncio.CancelledError:
        state.stats.cancelled += 1  # the client went away mid-request
        raise
    finally:
        state.stats.end()
        if state.config.record_requests:
            state.requests.append({"start": started_s, "end": time.time(), "status": status,
                                   "prompt": request.get(PROMPT_KEY)})


async def _answer(request: web.Request, endpoint: Endpoint, state: SimulatorState) -> web.Response:
    config = state.config
    _check_key(request, config.api_key)
    raw = await _read_body(request, config.max_body_bytes)
    if len(raw) > BIG_BODY_BYTES:  # counting a huge prompt's tokens must not stall the loop
        req = await asyncio.to_thread(lambda: parse(_decode(raw), endpoint))
    else:
        req = parse(_decode(raw), endpoint)
    if config.record_requests:
        request[PROMPT_KEY] = _prompt_text(_decode(raw))
    _check_model(req.model, config)
    _check_context(req, config.context_limit)
    reply = build_reply(req, config, int(time.time()))
    if req.service_tier == "flex" and state.faults.flex_unavailable(config.flex_unavailable_rate):
        state.stats.answered(429)
        return error_response(FLEX_UNAVAILABLE)
    cost = req.budget_cost(config.default_max_tokens)
    decision = state.limiter.admit(cost)
    if not decision.admitted:
        state.stats.answered(429, limited=decision.kind)
        return error_response(_rate_limit_error(decision, req, cost))
    state.stats.admitted(cost)
    fault = state.faults.draw()
    if fault is not Fault.NONE:
        state.stats.faults[fault.value] += 1
    if fault is Fault.FAIL:
        await _sleep(_delay_s(state, 0))
        error = state.faults.server_error()
        error.headers.update(decision.headers)
        raise error
    if fault is Fault.TIMEOUT:
        await _hold(state)
    cached = await _read_prefix_cache(state, req, big=len(raw) > BIG_BODY_BYTES)
    mark_cached(reply, cached)
    await _generate(state, reply.longest_choice_tokens)
    if fault is Fault.GARBAGE:
        state.stats.answered(200)
        return web.Response(
            body=state.faults.garbage(reply.body), content_type=JSON, headers=decision.headers
        )
    state.stats.answered(
        200, prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens,
        cached_tokens=cached,
    )
    return web.Response(
        body=json.dumps(reply.body).encode(), content_type=JSON, headers=decision.headers
    )


async def _read_prefix_cache(state: SimulatorState, req: CompletionRequest, *, big: bool) -> int:
    """The request's prompt tokens found in the prefix cache, its prefixes stored for later
    requests. Prompts too short to be cached are not tokenized again."""
    if state.prefix_cache.capacity <= 0 or max(req.prompt_tokens) < MIN_TOKENS:
        return 0
    sequences = await asyncio.to_thread(req.prompt_sequences) if big else req.prompt_sequences()
    bucket = f"{req.model}\0{req.prompt_cache_key or ''}"
    return sum(state.prefix_cache.read_and_store(bucket, ids) for ids in sequences)


PROMPT_KEY = "docq_prompt"
FLEX_UNAVAILABLE = ApiError(
    429, "Resource Unavailable: the flex tier has no capacity for this request right now; "
    "try again later or use another service tier.", type="invalid_request_error",
    code="resource_unavailable")


def _prompt_text(body: Any) -> str | None:
    """What identifies a request's prompt: the last chat message's text, or the first prompt."""
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        content = messages[-1].get("content")
        return content if isinstance(content, str) else None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else None


def _check_key(request: web.Request, api_key: str | None) -> None:
    """401 unless `Authorization: Bearer <key>` matches; the key received is never echoed."""
    if api_key is None:
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(
            401,
            "You didn't provide an API key: send it as 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
        )
    if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")


async def _read_body(request: web.Request, limit: int) -> bytes:
    declared = request.content_length
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(256 * 1024):
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > DRAIN_LIMIT_BYTES:
            break
    if size > limit or (declared is not None and declared > limit):
        shown = declared if declared is not None else size
        raise ApiError(
            413,
            f"The request body is {shown} bytes; this server accepts at most "
            f"{limit} bytes (--max-body-bytes).",
            code="request_too_large",
        )
    return b"".join(chunks)


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(
            400, f"The request body is not valid JSON: {exc}.", code="invalid_json"
        ) from None


def _check_model(model: str, config: SimulatorConfig) -> None:
    if model not in config.models:
        raise ApiError(
            404,
            f"The model '{model}' does not exist. This simulator serves: "
            f"{', '.join(config.models)}.",
            param="model",
            code="model_not_found",
        )


def _check_context(req: CompletionRequest, limit: int | None) -> None:
    if limit is None:
        return
    longest = max(req.prompt_tokens)
    if longest > limit:
        param = "messages" if req.endpoint == "chat" else "prompt"
        raise ApiError(
            400,
            f"This model's maximum context length is {limit} tokens. However, "
            f"your {param} resulted in {longest} tokens. Please reduce the length "
            f"of the {param}.",
            param=param,
            code="context_length_exceeded",
        )


def _rate_limit_error(decision: Decision, req: CompletionRequest, cost: int) -> ApiError:
    kind = decision.kind or "requests"
    label = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
    limit = decision.headers.get(f"x-ratelimit-limit-{kind}", "?")
    requested = 1 if kind == "requests" else cost
    headers = dict(decision.headers)
    if decision.retry_after_ns is None:
        message = (
            f"Request too large for {req.model} on {label}: Limit {limit}, Requested "
            f"{requested}. Reduce the prompt or max_tokens; waiting cannot help."
        )
    else:
        wait_s = decision.retry_after_ns / 1e9
        message = (
            f"Rate limit reached for {req.model} on {label}: Limit {limit}, Requested "
            f"{requested}. Please try again in {wait_s:.3f}s."
        )
        headers.update(retry_after_headers(decision.retry_after_ns))
    return ApiError(429, message, type=kind, code="rate_limit_exceeded", headers=headers)


def _delay_s(state: SimulatorState, output_tokens: int) -> float:
    config = state.config
    ms = config.latency_ms + config.ms_per_token * output_tokens
    if config.jitter_ms:
        ms += state.jitter.uniform(0.0, config.jitter_ms)
    return ms / 1000.0


async def _generate(state: SimulatorState, output_tokens: int) -> None:
    """Wait as long as generating the answer takes: its latency, on a server model that
    queues beyond its slots and slows down past its saturation point."""
    if state.slots is None:
        await _sleep(_delay_s(state, output_tokens))
        return
    async with state.slots:
        state.decoding += 1
        try:
            slowdown = max(1.0, state.decoding / (state.config.saturation or state.decoding))
            await _sleep(_delay_s(state, output_tokens) * slowdown)
        finally:
            state.decoding -= 1


async def _sleep(delay_s: float) -> None:
    if delay_s > 0:
        await asyncio.sleep(delay_s)


async def _hold(state: SimulatorState) -> None:
    """Keep a request open for --timeout-hold-s, or until the server starts shutting down."""
    try:
        await asyncio.wait_for(state.closing.wait(), state.config.timeout_hold_s)
    except TimeoutError:
        return
    raise ApiError(
        503, "The simulator is shutting down.", type="server_error", code="service_unavailable"
    )


async def _models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _check_key(request, state.config.api_key)
    data = [_model_entry(m, state.started_s) for m in state.config.models]
    return web.json_response({"object": "list", "data": data})


async def _model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _check_key(request, state.config.api_key)
    name = request.match_info["model"]
    _check_model(name, state.config)
    return web.json_response(_model_entry(name, state.started_s))


def _model_entry(name: str, created_s: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created_s, "owned_by": "docq-simulator"}


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].stats.snapshot())


async def _requests(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.config.record_requests:
        raise ApiError(404, "Requests are not recorded; start the simulator with "
                       "--record-requests.", code="not_found")
    return web.json_response({"requests": state.requests})


async def _change_limits(request: web.Request) -> web.Response:
    """POST {"rpm": n|null, "tpm": n|null}: the provider changes the limits mid-run."""
    body = _decode(await request.read())
    if not isinstance(body, dict):
        raise ApiError(400, "Send a JSON object with rpm and tpm (a positive integer or null).")
    values: dict[str, int | None] = {}
    for name in ("rpm", "tpm"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ApiError(400, f"{name} must be a positive integer or null, got {value!r}.",
                           param=name)
        values[name] = value
    request.app[STATE].limiter.change(values["rpm"], values["tpm"])
    return web.json_response(values)


async def _stats_reset(request: web.Request) -> web.Response:
    request.app[STATE].stats.reset()
    request.app[STATE].requests.clear()
    request.app[STATE].prefix_cache.clear()
    return web.json_response({"reset": True})


def error_response(exc: ApiError) -> web.Response:
    return web.Response(
        status=exc.status,
        body=json.dumps(exc.body()).encode(),
        content_type=JSON,
        headers=exc.headers,
    )


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as OpenAI-shaped JSON: router misses, bad methods, our own bugs."""
    try:
        response = await handler(request)
    except ApiError as exc:
        response = error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status)
        message = f"{request.method} {request.path}: {exc.reason}."
        if exc.status == 404:
            message = f"Unknown path {request.path}; see GET /v1/models for what is served."
        response = error_response(ApiError(exc.status, message, code=code))
    except Exception as exc:  # a bug in the simulator: say so in JSON rather than in HTML
        logger.exception("simulator bug while answering %s %s", request.method, request.path)
        response = error_response(
            ApiError(500, f"internal simulator error: {type(exc).__name__}", type="server_error")
        )
    if request.app[STATE].config.log_requests:
        logger.info("%s %s -> %s", request.method, request.path, response.status)
    return response


async def _limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every response carries the current x-ratelimit-* headers (and a request id)."""
    headers = response.headers
    if "x-ratelimit-limit-requests" not in headers and "x-ratelimit-limit-tokens" not in headers:
        headers.update(request.app[STATE].limiter.headers())
    headers["x-request-id"] = f"req_{random.getrandbits(128):032x}"


async def serve(config: SimulatorConfig) -> None:
    """Listen until SIGTERM or SIGINT, then close quickly (held requests are let go)."""
    encoding(), vocabulary()  # load before listening, so the first request is not slow
    app = build_app(config)
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, backlog=4096)
        await site.start()
        host, port = runner.addresses[0][:2]
        logger.info("listening on http://%s:%s/v1 %s", host, port, config.describe_limits())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        app[STATE].closing.set()
    finally:
        await runner.cleanup()
