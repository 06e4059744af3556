"""A tiny model that has learned one line with emoji and CJK (so streams carry multi-byte characters),
and a real uvicorn server on a free localhost port, for the serving tests."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from functools import lru_cache

import torch

from scratchlm.model import GPT, ModelConfig
from scratchlm.tokenizer.bpe import Tokenizer

LINE = "Once upon a time 🙂 a cat said 你好 to the 世界. 🎉 The end.\n"


@lru_cache(maxsize=None)  # one training per test session, shared by the serving test files
def trained_model(steps: int = 150) -> tuple[GPT, Tokenizer]:
    """Byte-level tokenizer (every CJK character is 3 tokens, every emoji 4) and a 2-layer model that
    has memorised LINE: its greedy text is meaningful and full of characters split across tokens."""
    tok = Tokenizer([])
    ids = torch.tensor(tok.encode(LINE * 40))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=128, d_model=64, n_layers=2, n_heads=4,
                            d_ff=128))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 129, (16,))
        x = torch.stack([ids[s:s + 128] for s in starts])
        y = torch.stack([ids[s + 1:s + 129] for s in starts])
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), tok


@contextmanager
def running_server(app):
    """Serve `app` with uvicorn in a thread; yields the base URL."""
    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    t = time.time()
    while not server.started:
        assert time.time() - t < 20 and thread.is_alive(), "the test server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
