"""`scratchlm chat`: a conversation in the terminal, with the same template, trimming and engine as the server.

The whole history is kept; each turn sends as much of it as fits the context (oldest turns go first, and
the chat says so). Ctrl-C stops a reply mid-way; /reset starts over; /quit or Ctrl-D leaves.
"""

from __future__ import annotations

import sys
from typing import Callable

from scratchlm.errors import UserError
from scratchlm.serve.batching import Engine, Request
from scratchlm.serve.text import ChatFormat


def chat_loop(engine: Engine, fmt: ChatFormat, max_tokens: int = 256, temperature: float = 0.8,
              top_p: float = 1.0, seed: int | None = None, system: str | None = None,
              read: Callable[[str], str] = input, write: Callable[[str], object] | None = None) -> list[dict]:
    """Run the chat until /quit or end of input; returns the conversation."""
    write = write or _write
    context = engine.context
    reserve = min(max_tokens, context // 2)  # room for the reply, as the server keeps it
    history: list[dict] = []
    write(f"chatting with a {fmt.name}-template model (context {context} tokens). "
          f"/reset starts over, /quit leaves, Ctrl-C stops a reply.\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("\n")
            break
        if line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            history = []
            write("(new conversation)\n")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        ids, dropped = fmt.prompt_ids(messages, max(context - reserve, 1))
        if dropped:
            write(f"(the {dropped} oldest message(s) no longer fit the context; the model does not see them)\n")
        req = Request(prompt=ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                      stop_strings=fmt.stop_strings, stop_tokens=fmt.stop_tokens)
        write("bot> ")
        reply = ""
        events = engine.stream(req)
        try:
            for event in events:
                write(event.text)
                reply += event.text
        except KeyboardInterrupt:
            events.close()  # cancels the request in the engine
            write(" [stopped]")
        write("\n")
        history.append({"role": "assistant", "content": reply})
    return history


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()  # show each piece of a reply as it arrives


def chat(ckpt: str, device: str = "auto", **kw) -> None:
    if kw.get("max_tokens", 1) < 1 or kw.get("temperature", 0) < 0 or not 0 < kw.get("top_p", 1) <= 1:
        raise UserError("--max-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    from scratchlm.train.checkpoint import load_for_inference
    model, tok, meta = load_for_inference(ckpt, device=device)
    # Not started: `stream` runs the steps on this thread, the one that loaded the model (faster on a CPU;
    # scratchlm/serve/batching.py says why).
    engine = Engine(model, tok, max_batch=1, max_queue=1)
    chat_loop(engine, ChatFormat.for_checkpoint(tok, meta), **kw)
