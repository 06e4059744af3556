"""The OpenAI wire format: request JSON -> checked `Params` (or a `BadRequest` naming the field), and the
response/chunk JSON that clients expect. No HTTP here; api.py does that.

Supported fields (others are ignored, as OpenAI-compatible servers do): model, prompt (completions:
a string, a list of strings, or a list of token ids), messages (chat: roles system/developer/user/assistant,
content a string or a list of text parts), max_tokens / max_completion_tokens, temperature, top_p, stop,
seed, stream, stream_options.include_usage, n. With a seed, choice i samples with seed + i.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

MAX_STOP = 4


class ApiError(Exception):
    """An error a client gets as OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


@dataclass
class Params:
    model: str
    prompts: list = field(default_factory=list)       # completions: strings or token-id lists
    messages: list[dict] = field(default_factory=list)  # chat
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    n: int = 1


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise bad(name, f"{name} must be a number, got {v!r}")
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(name, f"{name} must be {'>' if lo_open else '>='} {lo} and <= {hi}, got {v}")
    return float(v)


def _integer(body: dict, name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"{name} must be an integer, got {v!r}")
    if v < lo or v > hi:
        raise bad(name, f"{name} must be between {lo} and {hi}, got {v}")
    return v


def _bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(name, f"{name} must be true or false, got {v!r}")
    return v


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return "".join(p["text"] for p in c)
    raise bad(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object with a role and a content")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise bad(f"messages[{i}].role", f"messages[{i}].role {m.get('role')!r} is not supported; "
                                             f"use system, developer, user or assistant")
        out.append({"role": role, "content": _content(m, i)})
    if out[-1]["role"] == "assistant":
        raise bad("messages", "the last message must be from the user, not the assistant")
    return out


def _prompts(body: dict) -> list:
    p = body.get("prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return p
    if isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        return [p]
    raise bad("prompt", "prompt must be a string, a non-empty list of strings, or a list of token ids")


def parse(body: dict, chat: bool, max_n: int, context: int) -> Params:
    """Check every supported field of a (chat) completion request."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "model is required: the name /v1/models lists")
    p = Params(model=model)
    if chat:
        p.messages = _messages(body)
    else:
        p.prompts = _prompts(body)
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    p.max_tokens = _integer(body, name, 1, context)
    if p.max_tokens is None and not chat:
        p.max_tokens = 16  # OpenAI's default for /v1/completions
    p.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    p.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    p.n = _integer(body, "n", 1, max_n) or 1
    p.seed = _integer(body, "seed", -2**63, 2**63 - 1)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP
                             or not all(isinstance(s, str) and s for s in stop)):
        raise bad("stop", f"stop must be a non-empty string or a list of at most {MAX_STOP} of them")
    p.stop = stop or []
    p.stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("stream_options", "stream_options must be an object")
        if not p.stream:
            raise bad("stream_options", "stream_options is only allowed with stream: true")
        p.include_usage = _bool(opts, "include_usage")
    if body.get("logprobs") not in (None, False, 0) or body.get("echo"):
        raise bad("logprobs" if body.get("logprobs") else "echo", "logprobs and echo are not supported")
    return p


# --- responses ---------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(rid: str, chat: bool, model: str, texts: list[str], reasons: list[str], use: dict) -> dict:
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r, "logprobs": None}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    else:
        choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": use}


def chunk(rid: str, chat: bool, model: str, index: int | None, text: str | None = None,
          finish_reason: str | None = None, first: bool = False, include_usage: bool = False,
          use: dict | None = None) -> dict:
    """One streamed chunk; `index=None` makes the usage-only chunk (no choices) that ends a stream."""
    if index is None:
        choices = []
    elif chat:
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        choices = [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    else:
        choices = [{"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}]
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
           "model": model, "choices": choices}
    if include_usage:
        out["usage"] = use
    return out
