"""Tiny scratchlm runs for the interop tests: a real tokenizer, random (but not near-zero) weights."""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path

import torch

from scratchlm.config import Config, load_config
from scratchlm.model import GPT
from scratchlm.tokenizer import Tokenizer
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.trainer import model_fingerprint

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SMALL = ["model.context_length=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64"]

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, and we'll count: 1, 22, 333, 4444.",
    "def greet(name):\n    return f'Hello, {name}!'  # code\n\nfor i in range(10):\n\tprint(i ** 2)\n",
    "Emoji 🤖🎉🌍 and CJK 日本語のテキスト 中文字符 한국어, accents: naïve café Ünïcödé — «quotes».",
    "   leading and trailing spaces   \n\n\nnew lines\r\nwindows",
]
SPECIAL_TEXT = "<|user|>\nHi there<|end|>\n<|assistant|>\nHello!<|end|><|endoftext|>"


@lru_cache(maxsize=None)
def tokenizer(pattern: str = "gpt4", kind: str = "bpe") -> Tokenizer:
    if kind == "char":
        return Tokenizer.char_level()
    corpus = [(SHARED / "tinyshakespeare.txt").read_text()[:60_000]] + TEXTS * 20
    return Tokenizer.train(corpus, 400, pattern=pattern)


def make_run(root: Path, name: str, preset: str = "tiny", overrides: tuple[str, ...] = (), seed: int = 0,
             pattern: str = "gpt4", state_extra: dict | None = None, kind: str = "bpe") -> Path:
    """A run directory with one checkpoint of a small random model built from `preset`."""
    tok = tokenizer(pattern, kind)
    cfg: Config = load_config(preset, [*SMALL, f"model.vocab_size={tok.vocab_size}", *overrides,
                                       f"run.out_dir={root}", f"run.name={name}"])
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    with torch.no_grad():  # make every weight matter (and differ from its neighbours): a swapped or
        for p in model.parameters():  # untransposed tensor must change the logits visibly
            p.add_(torch.randn_like(p) * 0.2)
    run = root / name
    tok.save(run / "tokenizer")
    state = {"model": model_fingerprint(cfg), "tokenizer_fingerprint": tok.fingerprint,
             "config": dataclasses.asdict(cfg), **(state_extra or {})}
    ckpt.save_checkpoint(run / "checkpoints", 1, model, None, state)
    return run


def make_lora_run(root: Path, name: str, base: Path, targets: tuple[str, ...], template: str = "chat",
                  rank: int = 4, alpha: float = 8.0, seed: int = 1) -> Path:
    """A LoRA SFT run on `base` as `finetune sft --set finetune.trainable=lora` writes it (adapters
    only, the base named and fingerprinted), with random non-zero A and B: the adapters change the logits."""
    from scratchlm.config import LoraConfig
    from scratchlm.finetune.lora import adapter_state, add_lora, base_fingerprint, lora_layers
    from scratchlm.train.checkpoint import load_for_inference
    model, tok, meta = load_for_inference(base, device="cpu")
    fp = base_fingerprint(model)
    add_lora(model, LoraConfig(rank=rank, alpha=alpha, targets=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            for p in [*layer.lora_A.values(), *layer.lora_B.values()]:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    run = root / name
    tok.save(run / "tokenizer")
    task = {"kind": "sft", "template": template, "base": str(Path(meta["path"]).resolve()), "base_fingerprint": fp,
            "lora": model.lora}
    state = {"model": meta["state"]["model"], "tokenizer_fingerprint": tok.fingerprint,
             "config": dataclasses.asdict(meta["config"]), "task": task}
    ckpt.save_checkpoint(run / "checkpoints", 1, model, None, state, weights=adapter_state(model))
    return run
