"""The HTTP server: OpenAI's /v1/models, /v1/completions and /v1/chat/completions, /health, and the chat page.

Every request is checked first (body size, JSON, fields, prompt length, queue room) and refused with OpenAI's
error JSON — 400 bad field, 401 wrong key, 404 unknown model or path, 413 body too large, 429 queue full —
before any work starts. Generation runs in the `Engine` loop (on the main thread under `scratchlm serve`);
this module, on the HTTP server's thread, only moves its events to the client, as one JSON response or as
Server-Sent Events:

    data: {"id": ..., "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "Hel"}, ...}]}

    data: [DONE]

A client that goes away mid-request has its rows cancelled, which frees their slots for the next requests.
Unexpected failures are logged here and reach the client as a plain "internal error", never a traceback.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations (HttpRequest) at runtime.

import asyncio
import hmac
import json
import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from scratchlm.errors import UserError
from scratchlm.serve import protocol
from scratchlm.serve.batching import Engine, Event, QueueFull, Request
from scratchlm.serve.protocol import ApiError, Params
from scratchlm.serve.text import ChatFormat

log = logging.getLogger("scratchlm.serve")


@dataclass
class Limits:
    max_body_bytes: int = 1_000_000
    max_n: int = 8                 # choices per request
    disconnect_poll_s: float = 0.5  # how often a non-streaming request checks that its client is still there


def create_app(engine: Engine, chat_format: ChatFormat, model_name: str, api_key: str | None = None,
               limits: Limits | None = None):
    """The FastAPI app around a started `Engine`."""
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    class EventStream(StreamingResponse):
        """Server-Sent Events that cancel their requests however the response ends — even when the client
        is gone before the first event, when the event generator never starts and its `finally` never runs."""

        def __init__(self, events, on_close):
            super().__init__(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.on_close()

    limits = limits or Limits()
    tok = engine.tokenizer
    context = engine.context
    created = int(time.time())
    app = FastAPI(title="scratchlm", docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("scratchlm.serve").joinpath("static/chat.html").read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_, e: HTTPException):  # unknown paths and methods, in OpenAI's shape too
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(ApiError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        log.error("request failed", exc_info=e)
        return JSONResponse(ApiError(500, "internal error", "server_error").body(), status_code=500)

    def check_key(request: HttpRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    async def read_json(request: HttpRequest) -> dict:
        too_big = ApiError(413, f"request body is larger than {limits.max_body_bytes} bytes", code="body_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limits.max_body_bytes:
            raise too_big
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limits.max_body_bytes:
                raise too_big
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return data

    # --- routes ---------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "template": chat_format.name, "context_length": context,
                **engine.stats()}

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "scratchlm", "context_length": context}]}

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await generate(request, chat=True)

    # --- one generation request -----------------------------------------------------------------
    def build(p: Params, chat: bool) -> list[Request]:
        """Prompt ids and engine requests, one per choice; raises ApiError for what cannot be served."""
        if p.model != model_name:
            raise ApiError(404, f"model {p.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        stop_tokens, stop = [tok.eot_id], list(p.stop)
        if chat:
            # Keep room for the reply: trim the oldest turns until the prompt leaves max_tokens (at most
            # half the context) free.
            reserve = min(p.max_tokens or context, context // 2)
            try:
                ids, _ = chat_format.prompt_ids(p.messages, max(context - reserve, 1))
            except UserError as e:
                raise protocol.bad("messages", str(e)) from None
            prompts = [ids]
            stop_tokens, stop = chat_format.stop_tokens, stop + chat_format.stop_strings
        else:
            prompts = [x if isinstance(x, list) else tok.encode(x, allowed_special="all") for x in p.prompts]
            for ids in prompts:
                if not ids or len(ids) >= context:
                    raise protocol.bad("prompt", f"the prompt is {len(ids)} tokens; this model takes 1 to "
                                                 f"{context - 1} (its context is {context})")
                if max(ids) >= tok.vocab_size or min(ids) < 0:
                    raise protocol.bad("prompt", f"token ids must be between 0 and {tok.vocab_size - 1}")
        return [Request(prompt=ids, max_tokens=p.max_tokens or context, temperature=p.temperature, top_p=p.top_p,
                        seed=None if p.seed is None else (p.seed + j) % 2**63, stop_strings=stop,
                        stop_tokens=stop_tokens)
                for ids in prompts for j in range(p.n)]

    async def generate(request: HttpRequest, chat: bool):
        check_key(request)
        p = protocol.parse(await read_json(request), chat, limits.max_n, context)
        reqs = build(p, chat)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        for i, r in enumerate(reqs):
            r.emit = lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, ev))
        try:
            for r in reqs:
                engine.submit(r)
        except QueueFull as e:
            for r in reqs:
                engine.cancel(r)
            raise ApiError(429, str(e), "rate_limit_error", code="queue_full") from None
        rid = protocol.new_id(chat)
        if p.stream:
            return EventStream(stream(rid, chat, p, reqs, events), lambda: [engine.cancel(r) for r in reqs])
        texts, reasons = [""] * len(reqs), [None] * len(reqs)
        use = protocol.usage(0, 0)
        counted: set[int] = set()
        try:
            while None in reasons:
                try:
                    i, ev = await asyncio.wait_for(events.get(), limits.disconnect_poll_s)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)  # nobody reads it; `finally` frees the slots
                    continue
                texts[i] += ev.text
                if ev.finish_reason:
                    reasons[i] = ev.finish_reason
                    _count(use, reqs, i, ev, counted)
        finally:
            for r in reqs:
                engine.cancel(r)
        if "error" in reasons:
            raise ApiError(500, "internal error during generation", "server_error")
        return protocol.response(rid, chat, p.model, texts, reasons, use)

    async def stream(rid: str, chat: bool, p: Params, reqs: list[Request], events: asyncio.Queue):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
        use = protocol.usage(0, 0)
        counted: set[int] = set()
        left = len(reqs)
        try:
            if chat:
                for i in range(len(reqs)):
                    yield sse(protocol.chunk(rid, chat, p.model, i, first=True, include_usage=p.include_usage))
            while left:
                i, ev = await events.get()
                if ev.finish_reason == "error":
                    yield sse(ApiError(500, "internal error during generation", "server_error").body())
                    break
                if ev.text:
                    yield sse(protocol.chunk(rid, chat, p.model, i, ev.text, include_usage=p.include_usage))
                if ev.finish_reason:
                    left -= 1
                    _count(use, reqs, i, ev, counted)
                    yield sse(protocol.chunk(rid, chat, p.model, i, None, ev.finish_reason,
                                             include_usage=p.include_usage))
            if p.include_usage and not left:
                yield sse(protocol.chunk(rid, chat, p.model, None, include_usage=True, use=use))
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects: the server cancels this generator
            for r in reqs:
                engine.cancel(r)

    return app


def _count(use: dict, reqs: list[Request], i: int, ev: Event, counted: set[int]) -> None:
    """Add one finished choice to the usage. Choices of one prompt share it: its tokens count once."""
    key = id(reqs[i].prompt)
    if key not in counted:
        counted.add(key)
        use["prompt_tokens"] += ev.prompt_tokens
    use["completion_tokens"] += ev.completion_tokens
    use["total_tokens"] = use["prompt_tokens"] + use["completion_tokens"]


def serve(ckpt: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, device: str = "auto",
          max_batch: int = 16, max_queue: int = 64, model_name: str | None = None) -> None:
    """`scratchlm serve`: load a checkpoint, then decode on this thread and serve HTTP on another until Ctrl-C."""
    if max_batch < 1 or max_queue < 1:
        raise UserError(f"--max-batch and --max-queue must be >= 1 (got {max_batch} and {max_queue})")
    if not 0 < port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {port}")
    try:
        import uvicorn
    except ImportError:
        raise UserError("serving needs FastAPI and uvicorn: pip install 'scratchlm[serve]'") from None
    sock = _listen(host, port)  # before loading: a port in use is a one-line error, not a wasted load
    try:
        _serve(sock, ckpt, host, port, api_key, device, max_batch, max_queue, model_name)
    finally:
        sock.close()


def _serve(sock: socket.socket, ckpt: str, host: str, port: int, api_key: str | None, device: str, max_batch: int,
           max_queue: int, model_name: str | None) -> None:
    import uvicorn

    from scratchlm.train.checkpoint import load_for_inference
    model, tok, meta = load_for_inference(ckpt, device=device)
    fmt = ChatFormat.for_checkpoint(tok, meta)
    name = model_name or Path(ckpt).resolve().name
    engine = Engine(model, tok, max_batch=max_batch, max_queue=max_queue)
    # The engine decodes on this, the main thread, the one that loaded the model (~40% faster on a CPU than a
    # second thread: scratchlm/serve/batching.py says why); uvicorn's event loop runs beside it.
    server = uvicorn.Server(uvicorn.Config(create_app(engine, fmt, name, api_key=api_key), log_level="warning"))

    def http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            engine.shutdown()  # the HTTP side stopped (or never started): stop decoding too

    web = threading.Thread(target=http, name="scratchlm-http", daemon=True)
    web.start()
    try:
        while not server.started:
            if not web.is_alive():
                raise UserError(f"the HTTP server did not start on {host}:{port} (see the message above)")
            time.sleep(0.02)
    except KeyboardInterrupt:  # Ctrl-C while it starts: stop it too
        server.should_exit = True
        raise
    print(f"serving {name} ({fmt.name} template, context {model.cfg.context_length}) on http://{host}:{port}/"
          f"  — OpenAI API at http://{host}:{port}/v1", flush=True)
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if on_main else None  # `kill` = Ctrl-C
    try:
        engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        if on_main:  # first: a second Ctrl-C during the wait below must not leave ours installed
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        server.should_exit = True
        web.join(timeout=10)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a one-line error (port in use, unknown host)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port or --host") from None
    return sock
