"""Serving throughput: `scratchlm serve` under 1, 4 and 16 concurrent streaming clients, vs Hugging Face
`generate` on the same weights.

Ours is the real thing: the server runs in its own process (uvicorn + the batching engine) and the clients
are threads here that stream `/v1/completions` over HTTP, starting together. The peer is HF `generate`
in-process with one static batch of the same prompts and no HTTP at all — what a server built on it could
reach at best when every request arrives at the same moment; its time to first token is a
`max_new_tokens=1` call on that batch. Weights: the 'small' shape (6 layers, width 384, GPT-2 layout) with
random weights, copied into HF's GPT2LMHeadModel, and a 512-token BPE vocabulary so each token is real text;
special tokens' output rows are zeroed so no stream ends early.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

from benchmarks.common import SHARED, md_table
from benchmarks.train_step import SHAPES, hf, ours

NEW, PROMPT, LEVELS, ROUNDS = 128, 32, (1, 4, 16), 2


def _to_hf(model, ref) -> None:
    """Our GPT-2-layout weights into HF's GPT2LMHeadModel (its Conv1D stores Linear weights transposed)."""
    sd = {"transformer.wte.weight": model.embed_tokens.weight, "transformer.wpe.weight": model.pos_embed.weight,
          "transformer.ln_f.weight": model.norm.weight, "transformer.ln_f.bias": model.norm.bias}
    for i, b in enumerate(model.layers):
        p = f"transformer.h.{i}."
        sd |= {p + "ln_1.weight": b.attn_norm.weight, p + "ln_1.bias": b.attn_norm.bias,
               p + "ln_2.weight": b.ffn_norm.weight, p + "ln_2.bias": b.ffn_norm.bias,
               p + "attn.c_attn.weight": b.attn.qkv.weight.T, p + "attn.c_attn.bias": b.attn.qkv.bias,
               p + "attn.c_proj.weight": b.attn.out.weight.T, p + "attn.c_proj.bias": b.attn.out.bias,
               p + "mlp.c_fc.weight": b.ffn.up_proj.weight.T, p + "mlp.c_fc.bias": b.ffn.up_proj.bias,
               p + "mlp.c_proj.weight": b.ffn.down_proj.weight.T, p + "mlp.c_proj.bias": b.ffn.down_proj.bias}
    missing, _ = ref.load_state_dict({k: v.detach().clone().contiguous() for k, v in sd.items()}, strict=False)
    assert set(missing) <= {"lm_head.weight"}, missing  # tied to wte


def _stream(url: str, prompt: list[int], out: list, start: threading.Barrier) -> None:
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": NEW, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    start.wait()
    t0 = time.perf_counter()
    first, tokens = None, 0
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    out.append((first, tokens, time.perf_counter() - t0))


def _load(url: str, prompts: list[list[int]]) -> tuple[float, list[float]]:
    """All streams at once; returns aggregate tokens/s and each stream's time to first token."""
    out: list = []
    start = threading.Barrier(len(prompts) + 1)
    threads = [threading.Thread(target=_stream, args=(url, p, out, start)) for p in prompts]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return sum(n for _, n, _ in out) / wall, [f for f, _, _ in out]


def _serve(ckpt: Path) -> tuple[subprocess.Popen, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "scratchlm", "serve", "--ckpt", str(ckpt), "--port", str(port),
                             "--device", "cpu", "--model-name", "bench", "--max-batch", "16"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    t = time.time()
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() - t > 120:
                proc.kill()
                raise SystemExit(f"the server did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)


def run() -> str:
    from scratchlm.config import Config, to_dict
    from scratchlm.tokenizer import Tokenizer
    from scratchlm.train import checkpoint as ckpt
    tok = Tokenizer.train([(SHARED / "the-verdict.txt").read_text()], 512)
    s = dict(SHAPES["small"], vocab=tok.vocab_size, ctx=512)
    torch.manual_seed(0)
    model = ours(s).eval()
    with torch.no_grad():
        model.lm_head.weight[len(tok.vocab):] = 0  # tied: special tokens get logit 0 and never win
    ref = hf(s).eval()
    _to_hf(model, ref)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, len(tok.vocab), (PROMPT,), generator=g).tolist() for _ in range(max(LEVELS))]
    with torch.inference_mode():  # the copy is exact: same greedy tokens
        from scratchlm.generate import SamplingConfig, generate_ids
        a = generate_ids(model, [prompts[0]], SamplingConfig(max_new_tokens=16, temperature=0))[0]
        b = ref.generate(torch.tensor([prompts[0]]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, PROMPT:]
        assert a == b.tolist(), "the HF copy of the weights does not generate what ours does"

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config()
        cfg.model = model.cfg
        tok.save(Path(tmp) / "tokenizer")
        ckpt.save_checkpoint(Path(tmp) / "checkpoints", 1, model, None,
                             {"config": to_dict(cfg), "tokenizer_fingerprint": tok.fingerprint})
        proc, url = _serve(Path(tmp))
        try:
            _load(url, prompts[:2])  # warm-up
            for c in LEVELS:
                best = max((_load(url, prompts[:c]) for _ in range(ROUNDS)), key=lambda r: r[0])
                rows.append(["scratchlm serve (HTTP, streaming, continuous batching)", c, f"{best[0]:,.0f}",
                             f"{statistics.median(best[1]) * 1000:,.0f}", f"{max(best[1]) * 1000:,.0f}"])
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    with torch.inference_mode():
        ref.generate(torch.tensor(prompts[:2]), max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        for c in LEVELS:
            ids = torch.tensor(prompts[:c])
            tps = ttft = 0.0
            for _ in range(ROUNDS):
                t = time.perf_counter()
                ref.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
                first = time.perf_counter() - t
                t = time.perf_counter()
                out = ref.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
                rate = c * (out.shape[1] - PROMPT) / (time.perf_counter() - t)
                if rate > tps:
                    tps, ttft = rate, first
            rows.append(["HF generate (one static batch, no HTTP)", c, f"{tps:,.0f}", f"{ttft * 1000:,.0f}",
                         f"{ttft * 1000:,.0f}"])
    return (f"### Serving: aggregate tokens/s and time to first token, {PROMPT}-token prompts, {NEW} new tokens "
            f"per stream, greedy, 'small' shape (vocab {tok.vocab_size})\n\n"
            f"Best of {ROUNDS} rounds per row. Ours: the `scratchlm serve` process, clients streaming over HTTP "
            f"and starting together. HF: the same weights, one `generate` call per batch.\n\n"
            + md_table(["server", "concurrent streams", "tokens/s (all streams)", "TTFT median ms", "TTFT max ms"],
                       rows))
