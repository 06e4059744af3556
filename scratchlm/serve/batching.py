"""The serving engine: concurrent requests share decode steps (continuous batching).

One thread owns the model. Each loop iteration it
  1. admits waiting requests into free *slots* (rows of one preallocated KV cache) and prefills each
     prompt on its own, which gives the request its first token;
  2. runs one decode step for every running request together: a (rows, 1) batch of their last tokens,
     through model/decode.py's lean step (the same logits as GPT.forward, in fewer operations);
  3. samples each row with its own settings, turns tokens into text (`TextStream`), and retires the
     rows that finished or whose client went away, so their slots take new requests at once.

Rows join and leave at different times, so each slot keeps its own length: a row's prompt sits at cache
positions 0..T-1 of its slot, its position ids count from 0, and the attention mask of a decode step lets
row b see keys 0..length[b] only (no mask when every row is at one length: a lone row always is). A row
therefore computes exactly what it would compute alone (the tests check batched greedy text against
unbatched `generate_ids`).

The waiting line is bounded: `submit` raises `QueueFull` instead of letting latency grow without limit.

Which thread runs the loop matters for speed on a CPU. PyTorch's parallel operations run on OpenMP, and
GNU OpenMP gives every thread that starts parallel work a team of worker threads of its own. Once the
main thread has done any (loading the model does) and a second thread decodes, it manages twice as many
threads as there are cores and stops letting idle workers spin: every small parallel operation then waits
for a worker to wake from sleep. Decoding ran ~40% slower on a second thread than on the main one
(the small shape, bf16, batch 1: 140-165 against 240-265 tokens/s in one process). So `scratchlm serve`
runs the loop on its main thread (`run`) and the HTTP server on another, and the terminal chat lets
`stream` drive the steps on the calling thread. `start` (a thread of the engine's own) is for tests and
for programs that embed the engine.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from scratchlm.generate import SamplingConfig, sample_next
from scratchlm.model.attention import KVCache
from scratchlm.model.decode import Decoder
from scratchlm.model.gpt import GPT
from scratchlm.serve.text import TextStream

log = logging.getLogger("scratchlm.serve")


class QueueFull(Exception):
    """Every slot is busy and the waiting line is full: the caller should retry later (HTTP 429)."""


@dataclass
class Event:
    """What the engine tells a request: more text, and on the last event why it ended and the counts."""
    text: str = ""
    finish_reason: str | None = None   # "stop" | "length" on the last event; "error" if the engine failed
    prompt_tokens: int = 0
    completion_tokens: int = 0         # every token the model generated, a stop token included


@dataclass(eq=False)  # requests are compared by identity: two equal prompts are still two requests
class Request:
    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0           # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    stop_tokens: list[int] = field(default_factory=list)
    emit: Callable[[Event], None] = lambda event: None   # called on the thread running the loop
    cancelled: bool = False


@dataclass(eq=False)
class _Row:
    """A running request: its slot, how much of the slot's cache is filled, its sampler and its text."""
    req: Request
    slot: int
    length: int = 0
    last: int = 0
    generated: int = 0
    generator: torch.Generator | None = None
    text: TextStream | None = None


class SlotCache(KVCache):
    """A KV cache whose rows (slots) each have their own length. Before each forward pass `select`
    says which slots the batch rows are and where each writes; positions and masks come from the
    caller, so the model's own `pos` counter stays 0. (Decode steps go through Decoder.step_rows,
    which indexes the same tensors itself; GPT.forward uses this for prefills, and for every step
    with Engine(lean=False).)"""

    def select(self, slots: list[int], starts: list[int]) -> None:
        self.slots, self.starts = slots, starts

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.size(2)
        end = max(self.starts) + T
        if len(self.slots) == 1:  # prefill (or a lone decode row): plain slices
            s, start = self.slots[0], self.starts[0]
            self.k[layer, s:s + 1, :, start:start + T] = k
            self.v[layer, s:s + 1, :, start:start + T] = v
            return self.k[layer, s:s + 1, :, :end], self.v[layer, s:s + 1, :, :end]
        assert T == 1, "batched steps decode one token per row"
        rows = torch.tensor(self.slots, device=k.device)
        at = torch.tensor(self.starts, device=k.device)
        self.k[layer][rows, :, at] = k[:, :, 0]
        self.v[layer][rows, :, at] = v[:, :, 0]
        if self.slots == list(range(len(self.slots))):  # the common case: a view, no copy
            return self.k[layer, :len(self.slots), :, :end], self.v[layer, :len(self.slots), :, :end]
        return self.k[layer][rows, :, :end], self.v[layer][rows, :, :end]

    def advance(self, T: int) -> None:
        pass  # lengths live in the engine's rows


class Engine:
    """Batches concurrent generation requests into shared decode steps on one model."""

    def __init__(self, model: GPT, tokenizer, max_batch: int = 16, max_queue: int = 64, lean: bool = True):
        """lean=False decodes through GPT.forward instead of the lean step (the same tokens; for tests and
        benchmarks). The model's layers must be final (packed, quantized) before this: the lean step binds them."""
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = model.cfg.context_length
        self.device = next(model.parameters()).device
        c = model.cfg
        p = next(model.parameters())
        self.cache = SlotCache(c.n_layers, max_batch, c.kv_heads, c.context_length, c.head_dim,
                               device=self.device, dtype=p.dtype)
        self.decoder = Decoder(model, self.cache) if lean else None
        self.rows: list[_Row | None] = [None] * max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.cond = threading.Condition()
        self.counts = {"completed": 0, "cancelled": 0, "errors": 0, "rejected": 0}
        self._thread: threading.Thread | None = None
        self._looping = False  # a loop (`start`'s thread or `run`) is taking the steps
        self._stop = False

    # --- the public side (any thread) ---------------------------------------------------------
    def start(self) -> "Engine":
        """Run the loop on a thread of the engine's own (tests, embedding). Slower on a CPU: see the top."""
        if self._thread is None:
            self._stop = False
            self._looping = True  # before the thread runs: no `stream` may start driving steps meanwhile
            self._thread = threading.Thread(target=self._loop, name="scratchlm-engine", daemon=True)
            self._thread.start()
        return self

    def run(self) -> None:
        """Run the loop on the calling thread until `shutdown` (from another thread) or Ctrl-C."""
        self._looping = True
        self._loop()

    def shutdown(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def submit(self, req: Request) -> Request:
        """Queue a request; its events arrive through `req.emit` on the loop's thread."""
        if not req.prompt or len(req.prompt) >= self.context:
            raise ValueError(f"prompt of {len(req.prompt)} tokens: it must be 1 to {self.context - 1} tokens")
        if max(req.prompt) >= self.model.cfg.vocab_size or min(req.prompt) < 0:
            raise ValueError("prompt has a token id outside the model's vocabulary")
        req.max_tokens = max(1, min(req.max_tokens, self.context - len(req.prompt)))  # never past the context
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                self.counts["rejected"] += 1
                raise QueueFull(f"the server is busy ({self.max_batch} running, {len(self.waiting)} waiting); "
                                f"retry later")
            self.waiting.append(req)
            self.cond.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (its client went away); its slot is free before the next decode step."""
        with self.cond:
            if not req.cancelled:
                req.cancelled = True
                if req in self.waiting:  # never started: give its place in the line back now
                    self.waiting.remove(req)
                    self.counts["cancelled"] += 1
                self.cond.notify_all()

    def stats(self) -> dict:
        with self.cond:
            return {"running": sum(r is not None for r in self.rows), "waiting": len(self.waiting),
                    "max_batch": self.max_batch, "max_queue": self.max_queue, **self.counts}

    def stream(self, req: Request) -> Iterator[Event]:
        """Submit and iterate over the events on this thread (the terminal chat, benchmarks). With no
        loop running, the steps run here, on the calling thread (the fast one: see the top); that is for
        one caller at a time: several threads streaming at once need a loop (`start` or `run`)."""
        events: queue.Queue[Event] = queue.Queue()
        req.emit = events.put
        self.submit(req)
        try:
            while True:
                while not self._looping and events.empty():
                    self._step_or_fail()
                event = events.get()
                yield event
                if event.finish_reason:
                    return
        finally:
            self.cancel(req)  # a no-op when it finished; frees the slot when the caller stopped reading

    # --- the engine loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self._stop and not self.waiting and not any(self.rows):
                        self.cond.wait()
                    if self._stop:
                        return
                self._step_or_fail()
        finally:
            self._looping = False

    def _step_or_fail(self) -> None:
        """One step; if it fails, only its requests end (with an "error" event): the server, or the chat,
        must outlive any one bad batch."""
        try:
            self.step()
        except Exception:
            log.exception("engine step failed; ending the running requests with an error")
            for row in self.rows:
                if row is not None:
                    self._finish(row, "error")

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests, prefill them, then one shared decode step for all running rows."""
        with self.cond:
            for row in self.rows:
                if row is not None and row.req.cancelled:
                    self._finish(row, None)
            admitted = []
            while self.waiting and None in self.rows:
                req = self.waiting.popleft()
                if req.cancelled:
                    self.counts["cancelled"] += 1
                    continue
                slot = self.rows.index(None)
                self.rows[slot] = _Row(req, slot, text=TextStream(self.tokenizer, req.stop_strings))
                admitted.append(self.rows[slot])
        for row in admitted:
            self._prefill(row)
        running = [r for r in self.rows if r is not None and r not in admitted]
        if running:
            self._decode(running)

    def _prefill(self, row: _Row) -> None:
        req = row.req
        if req.seed is not None:
            row.generator = torch.Generator(device=self.device).manual_seed(req.seed)
        T = len(req.prompt)
        ids = torch.tensor([req.prompt], device=self.device)
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()[None, None]
        self.cache.select([row.slot], [0])
        logits, _ = self.model(ids, mask=causal, cache=self.cache)
        row.length = T
        self._take([row], logits[:, -1, :])

    def _decode(self, rows: list[_Row]) -> None:
        rows.sort(key=lambda r: r.slot)
        ids = torch.tensor([[r.last] for r in rows], device=self.device)
        slots, lengths = [r.slot for r in rows], [r.length for r in rows]
        if self.decoder is not None:
            logits = self.decoder.step_rows(ids, slots, lengths)
        else:
            at = torch.tensor(lengths, device=self.device)
            mask = torch.arange(max(lengths) + 1, device=self.device)[None, :] <= at[:, None]  # row b sees 0..length[b]
            self.cache.select(slots, lengths)
            logits, _ = self.model(ids, positions=at[:, None], mask=mask[:, None, None, :], cache=self.cache)
        for r in rows:
            r.length += 1
        self._take(rows, logits[:, -1, :])

    def _take(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample one token per row (each with its own settings and generator) and act on it."""
        V = self.tokenizer.vocab_size  # a padded output layer has ids the tokenizer cannot decode: never pick them
        tokens = sample_next(logits, SamplingConfig(temperature=0), None, vocab_size=V).tolist()
        for i, row in enumerate(rows):
            if row.req.temperature > 0:
                cfg = SamplingConfig(temperature=row.req.temperature, top_p=row.req.top_p)
                tokens[i] = int(sample_next(logits[i:i + 1], cfg, row.generator, vocab_size=V)[0])
        for row, t in zip(rows, tokens):
            row.generated += 1
            row.last = t
            if t in row.req.stop_tokens:
                self._finish(row, "stop")
                continue
            text = row.text.push(t)
            if row.text.stopped:
                self._finish(row, "stop", text)
            elif row.generated >= row.req.max_tokens:
                self._finish(row, "length", text)
            elif text:
                self._emit(row.req, Event(text=text))

    def _finish(self, row: _Row, reason: str | None, text: str = "") -> None:
        """Free the row's slot; tell its client why it ended (unless it was cancelled: nobody listens)."""
        with self.cond:
            self.rows[row.slot] = None
            key = {None: "cancelled", "error": "errors"}.get(reason, "completed")
            self.counts[key] += 1
        if reason is not None:
            if reason != "error":
                text += row.text.finish()
            self._emit(row.req, Event(text=text, finish_reason=reason, prompt_tokens=len(row.req.prompt),
                                      completion_tokens=row.generated))

    @staticmethod
    def _emit(req: Request, event: Event) -> None:
        try:
            req.emit(event)
        except Exception:  # a listener that is gone (closed event loop) must not stop the engine
            log.debug("dropped an event for a request whose listener is gone", exc_info=True)
