"""LoRA: train a low-rank update instead of the weight itself (Hu et al. 2021).

A frozen linear layer y = W x becomes

    y = W x + (alpha / r) · B A x          A: (r, in), B: (out, r), r << in, out

A starts random and B at zero, so training starts exactly at the base model. Only A and B learn:
for a 4096x4096 matrix at r = 8 that is 65k numbers instead of 16.8M. The update is scaled by
**alpha / r** (not alpha): doubling r then keeps the update's size, so alpha need not be re-tuned.
`merge` folds (alpha/r)·B A into W (inference at no extra cost); `unmerge` takes it out again.

Targets (names in `LoraConfig.targets`):
    q, k, v   the slices of the fused `attn.qkv` projection (each its own A, B)
    o         the attention output projection `attn.out`
    mlp       `ffn.up_proj`, `ffn.gate_proj` (SwiGLU), `ffn.down_proj`
    head      `lm_head` (a classifier's head is trained whole instead)

Adapters are saved alone (safetensors, KBs) with a fingerprint of the frozen base weights, so
loading them onto another base is refused instead of producing garbage.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from scratchlm.config import LoraConfig
from scratchlm.errors import UserError

ADAPTER_FILE = "adapter.safetensors"


class LoRALinear(nn.Linear):
    """A Linear with low-rank adapters on slices of its output (one slice = the whole output,
    or q/k/v of a fused projection). It keeps the original `weight`/`bias` Parameters (same names,
    same objects: tied weights stay tied) and adds `lora_A.<part>`, `lora_B.<part>`."""

    def __init__(self, base: nn.Linear, parts: dict[str, tuple[int, int]], cfg: LoraConfig):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.parts = dict(parts)
        self.scaling = cfg.scaling
        self.lora_dropout = nn.Dropout(cfg.dropout)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (s, e) in self.parts.items():
            a = torch.empty(cfg.rank, self.in_features, device=base.weight.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # what nn.Linear (and peft) use
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(e - s, cfg.rank, device=base.weight.device))
        self.merged = False

    def delta(self, name: str) -> torch.Tensor:
        """(alpha/r) · B A for one part: what merging adds to rows s:e of the weight."""
        return self.scaling * (self.lora_B[name] @ self.lora_A[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        h = self.lora_dropout(x)
        for name, (s, e) in self.parts.items():
            update = F.linear(F.linear(h, self.lora_A[name]), self.lora_B[name]) * self.scaling
            y = y + F.pad(update, (s, self.out_features - e))  # zeros outside this part's slice
        return y

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            for name, (s, e) in self.parts.items():
                self.weight[s:e] += self.delta(name).to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            for name, (s, e) in self.parts.items():
                self.weight[s:e] -= self.delta(name).to(self.weight.dtype)
            self.merged = False


def _sites(model: nn.Module, targets: list[str]) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """(module path, {part: (start, end)}) for every Linear the targets name."""
    gpt = model
    c = gpt.cfg
    q, kv = c.n_heads * c.head_dim, c.kv_heads * c.head_dim
    sites = []
    for i in range(c.n_layers):
        qkv = {p: r for p, r in (("q", (0, q)), ("k", (q, q + kv)), ("v", (q + kv, q + 2 * kv))) if p in targets}
        if qkv:
            sites.append((f"layers.{i}.attn.qkv", qkv))
        if "o" in targets:
            sites.append((f"layers.{i}.attn.out", {"o": (0, c.d_model)}))
        if "mlp" in targets:
            for name in ("up_proj", "gate_proj", "down_proj"):
                if hasattr(gpt.layers[i].ffn, name):
                    lin = getattr(gpt.layers[i].ffn, name)
                    sites.append((f"layers.{i}.ffn.{name}", {"mlp": (0, lin.out_features)}))
    if "head" in targets:
        sites.append(("lm_head", {"head": (0, gpt.lm_head.out_features)}))
    return sites


def add_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Freeze every parameter of `model` (a GPT), then wrap the targeted Linears with adapters
    (which train). Returns the model, changed in place. Call `base_fingerprint` before, if needed."""
    cfg.validate()
    for p in model.parameters():
        p.requires_grad_(False)
    for path, parts in _sites(model, cfg.targets):
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        base = getattr(parent, name)
        if isinstance(base, LoRALinear):
            raise UserError(f"{path} already has LoRA adapters; merge them first (merge_lora)")
        setattr(parent, name, LoRALinear(base, parts, cfg))
    model.lora = asdict(cfg)  # what was attached, for the checkpoint's metadata
    return model


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight. A head tied to the embedding is untied first: merging
    into the shared matrix would change the input embeddings too."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, LoRALinear) and head.weight is model.embed_tokens.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.cfg = type(model.cfg)(**{**asdict(model.cfg), "tie_embeddings": False})
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then put plain Linears back: a model with no trace of LoRA (for export, or as a base)."""
    merge_lora(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_path, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.weight, plain.bias = module.weight, module.bias
            setattr(parent, attr, plain)
    if hasattr(model, "lora"):
        del model.lora
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters and any other parameter that trains (a classifier head): all a LoRA run changes."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad or ".lora_" in n}


def base_fingerprint(model: nn.Module, skip: tuple[str, ...] = ()) -> str:
    """sha256 over the frozen base weights (names, shapes, values), adapters excluded."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if ".lora_" in name or name.startswith(skip):
            continue
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_adapter(model: nn.Module, path: str | Path, fingerprint: str, extra: dict | None = None) -> Path:
    """adapter.safetensors: adapter tensors + metadata (LoRA config, base fingerprint)."""
    from scratchlm.atomic import write_bytes
    from safetensors.torch import save as save_bytes
    meta = {"lora": json.dumps(model.lora), "base_fingerprint": fingerprint, **(extra or {})}
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / ADAPTER_FILE
    write_bytes(path, save_bytes(adapter_state(model), metadata=meta))
    return path


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.exists():
        raise UserError(f"no LoRA adapter at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise UserError(f"{path} is not a readable safetensors adapter ({e})") from None


def load_adapter(model: nn.Module, path: str | Path, fingerprint: str | None = None) -> nn.Module:
    """Attach the adapter saved at `path` to `model` (a GPT with the base weights). Refuses an
    adapter trained on a different base (fingerprint of the base weights)."""
    tensors, meta = read_adapter(path)
    if "lora" not in meta:
        raise UserError(f"{path} has no LoRA metadata; is it a scratchlm adapter?")
    fp = fingerprint or base_fingerprint(model)
    if meta.get("base_fingerprint") != fp:
        raise UserError(f"the LoRA adapter {path} was trained on another base model (fingerprint "
                        f"{meta.get('base_fingerprint')}, this base is {fp}); load it onto its own base")
    add_lora(model, LoraConfig(**json.loads(meta["lora"])))
    load_adapter_tensors(model, tensors, str(path))
    return model


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    own = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise UserError(f"{where} does not fit this model: unexpected {unknown[:3]}")
    for k, v in tensors.items():
        if own[k].shape != v.shape:
            raise UserError(f"{where}: {k} is {tuple(v.shape)} there, {tuple(own[k].shape)} here")
        with torch.no_grad():
            own[k].copy_(v)


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
