"""Generation speed, "small" shape, 32-token prompts, 256 new tokens, greedy, vs HF `generate`.

At batch 1 decoding reads every weight once per token, so its limit is the memory bandwidth:
tokens/s x weight bytes per token / bandwidth is the fraction of the limit reached. bf16 (half the
bytes of fp32) is the fair fast setting for both sides; int8 weight-only (ours, `--quantize int8`)
halves the bytes again. Alternating best-of rounds: a noisy neighbour slows every side alike.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks import llamacpp
from benchmarks.common import md_table
from benchmarks.limits import measure
from benchmarks.train_step import SHAPES, hf, ours
from scratchlm.generate import SamplingConfig, generate_ids
from scratchlm.model.packed import PackedLinear, pack_linears
from scratchlm.quantize import decode_bytes_per_token, quantize_int8

NEW = 256
ROUNDS = {1: 4, 8: 2, 32: 2}


def _tps(fn, batch: int) -> float:
    t = time.perf_counter()
    fn(NEW)
    return batch * NEW / (time.perf_counter() - t)


def _contenders(s: dict, prompt: torch.Tensor, workdir: Path) -> dict:
    r = hf(s).eval().to(torch.bfloat16)
    m = ours(s).eval().to(torch.bfloat16)
    torch.manual_seed(0)
    q = quantize_int8(ours(s).eval().to(torch.bfloat16))
    torch.manual_seed(0)
    packed = ours(s).eval().to(torch.bfloat16)
    pack_linears(packed)
    rows = prompt.tolist()

    def hf_gen(n: int) -> None:
        with torch.inference_mode():
            r.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)

    def our_gen(model, lean=True):
        return lambda n: generate_ids(model, rows, SamplingConfig(max_new_tokens=n, temperature=0), lean=lean)

    gens = {"HF generate, bf16 weights": (hf_gen, decode_bytes_per_token(m)),
            "ours, bf16 weights, plain F.linear": (our_gen(m), decode_bytes_per_token(m)),
            "ours, bf16 weights, packed, GPT.forward per step": (our_gen(packed, lean=False),
                                                                 decode_bytes_per_token(packed)),
            "ours, bf16 weights, packed (--quantize bf16)": (our_gen(packed), decode_bytes_per_token(packed)),
            "ours, int8 weights (--quantize int8)": (our_gen(q), decode_bytes_per_token(q))}
    if len(rows) == 1:
        gens["ceiling: the step's weight products alone (packed)"] = (_products_only(packed),
                                                                       decode_bytes_per_token(packed))
    if len(rows) > 1:  # the batched tables keep to the settings a user runs
        del gens["ours, bf16 weights, plain F.linear"], gens["ours, bf16 weights, packed, GPT.forward per step"]
    if len(rows) == 1 and llamacpp.unavailable() is None:  # its Python API decodes one sequence
        gens.update(llamacpp.contenders(m, rows[0], torch.get_num_threads(), workdir))
    return gens


def _products_only(model: torch.nn.Module) -> Callable[[int], None]:
    """n 'steps' of nothing but the packed model's weight products, in a decoding step's order, on one
    row: no attention, norms, sampling or Python between them. No step built from these kernels can be
    faster, so this row is the ceiling of the lean step's approach on this machine."""
    linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
    inputs = [torch.zeros(1, 1, m.in_features, dtype=torch.bfloat16) for m in linears]

    def steps(n: int) -> None:
        with torch.inference_mode():
            for _ in range(n):
                for m, x in zip(linears, inputs):
                    m(x)
    return steps


def run() -> str:
    lim = measure()
    s = dict(SHAPES["small"], ctx=512)
    rows = []
    missing = llamacpp.unavailable()
    if missing:
        rows.append([1, "llama.cpp", "not run", "", "", "", missing])
    for batch, rounds in ROUNDS.items():
        prompt = torch.randint(0, s["vocab"], (batch, 32), generator=torch.Generator().manual_seed(0))
        with tempfile.TemporaryDirectory() as workdir:
            _bench(s, prompt, batch, rounds, Path(workdir), lim, rows)
            llamacpp.close()
    return (f"### Generation: tokens/s, 'small' shape, 32-token prompts, {NEW} new tokens, greedy\n\n"
            f"Limit: memory read bandwidth {lim.read_bytes_per_s / 1e9:.1f} GB/s (see limits). Weight MB = bytes one "
            "decoding step reads (every Linear and norm, one embedding row); GB/s = that x steps/s. "
            f"Best of {ROUNDS[1]} (batch 1) or {ROUNDS[8]} (batched) alternating rounds. "
            "llama.cpp runs the same weights, exported with `scratchlm export --format gguf` (fp32) and converted "
            "by llama.cpp's own quantizer (`llama_model_quantize`) to bf16 and to q8_0 (its 8-bit format, 8.5 "
            "bits/weight), same thread count, default settings otherwise; batch 1 only (llama-cpp-python's "
            "`Llama` decodes one sequence). 'packed': every Linear's weight reordered once into oneDNN's blocked "
            "layout (scratchlm/model/packed.py; the same outputs, bit for bit, as plain F.linear). Each decoding step "
            "runs model/decode.py's lean step (the same logits, bit for bit, in fewer PyTorch operations), except "
            "in the 'GPT.forward per step' row. The 'ceiling' row times only the weight products of a step (every "
            "packed Linear once, back to back, one row): what a step made of these kernels could reach with "
            "attention, norms, sampling and Python cost nothing.\n\n"
            + md_table(["batch", "implementation", "tokens/s", "weight MB/step", "weights GB/s",
                        "of bandwidth", "vs HF bf16"], rows))


def _bench(s: dict, prompt: torch.Tensor, batch: int, rounds: int, workdir: Path, lim, rows: list) -> None:
    gens = _contenders(s, prompt, workdir)
    for fn, _ in gens.values():
        fn(8)  # warm-up
    best = dict.fromkeys(gens, 0.0)
    for _ in range(rounds):
        for label, (fn, _) in gens.items():
            best[label] = max(best[label], _tps(fn, batch))
    peer = best["HF generate, bf16 weights"]
    for label, (_, nbytes) in gens.items():
        gbs = best[label] / batch * nbytes / 1e9  # each step reads the weights once for the whole batch
        rows.append([batch, label, f"{best[label]:,.0f}", f"{nbytes / 1e6:.1f}", f"{gbs:.1f}",
                     f"{gbs * 1e9 / lim.read_bytes_per_s * 100:.0f}%", f"{best[label] / peer:.2f}x"])


if __name__ == "__main__":
    print(run())
