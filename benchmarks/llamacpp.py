"""llama.cpp (`llama-cpp-python`) as a decoding peer, on the same weights as ours.

The weights go out through our GGUF exporter (fp32, scratchlm/interop/gguf.py), then llama.cpp's
own quantizer (`llama_model_quantize`, what its `llama-quantize` tool runs) converts them to the
formats CPU users pick: bf16 (same numbers as our bf16 model) and q8_0 (8-bit blocks of 32 with
an fp16 scale each, 8.5 bits per weight; the peer of our int8). The GGUF needs a tokenizer; the
benchmark feeds token ids, so a synthetic byte-level one (byte pairs as merges) fills the vocabulary.
"""

from __future__ import annotations

import ctypes
import tempfile
from pathlib import Path
from typing import Callable

import torch

from scratchlm.interop.gguf import write_gguf
from scratchlm.tokenizer import GPT4_PATTERN, Tokenizer

FORMATS = {"bf16": "LLAMA_FTYPE_MOSTLY_BF16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


_OPEN: list = []   # the loaded models: close() frees them before the interpreter exits
_LOG_CALLBACK = None


def _quiet(llama_cpp) -> None:
    """Keep llama.cpp's per-tensor quantization log off the benchmark's output."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def close() -> None:
    while _OPEN:
        _OPEN.pop().close()


def unavailable() -> str | None:
    """Why llama.cpp cannot run here, or None."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python is not importable here ({e}); `pip install 'scratchlm[llamacpp]'`"
    return None


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer with exactly vocab_size ids (merges: byte pairs, in order)."""
    n_special = 1
    merges = [(i // 256, i % 256) for i in range(vocab_size - 256 - n_special)]
    return Tokenizer(merges, GPT4_PATTERN, special_tokens=["<|endoftext|>"])


def step_bytes(path: Path) -> int:
    """Bytes one decoding step reads from a GGUF: every tensor but the lookup tables, one row of those."""
    import gguf
    total = 0
    for t in gguf.GGUFReader(str(path)).tensors:
        rows = int(t.shape[-1]) if t.name in ("token_embd.weight", "position_embd.weight") else 1
        total += int(t.n_bytes) // rows
    return total


def contenders(model: torch.nn.Module, prompt: list[int], threads: int, workdir: Path
               ) -> dict[str, tuple[Callable[[int], None], int]]:
    """label -> (generate n greedy tokens after `prompt`, weight bytes per step), one per format."""
    import llama_cpp
    _quiet(llama_cpp)
    f32 = write_gguf(model, synthetic_tokenizer(model.cfg.vocab_size), workdir / "f32.gguf", "bench")
    out = {}
    for fmt, ftype in FORMATS.items():
        path = workdir / f"{fmt}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, ftype)
        params.nthread = threads
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama_model_quantize to {fmt} failed")
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=model.cfg.context_length, n_threads=threads,
                              n_threads_batch=threads, verbose=False)

        def gen(n: int, llm=llm) -> list[int]:
            got = []
            for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                got.append(t)
                if len(got) == n:
                    return got
            return got

        _OPEN.append(llm)
        out[f"llama.cpp {llama_cpp.__version__}, {fmt} GGUF"] = (gen, step_bytes(path))
    return out


if __name__ == "__main__":
    from benchmarks.train_step import SHAPES, ours
    s = dict(SHAPES["small"], ctx=512)
    m = ours(s).eval().to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as d:
        for label, (fn, nb) in contenders(m, list(range(32)), torch.get_num_threads(), Path(d)).items():
            print(label, nb / 1e6, fn(8))
        close()
