"""Checkpoints that survive crashes: complete or absent, never half-written, never unpickled blindly.

    checkpoints/step_000200/
        model.safetensors     weights (safetensors: plain tensors, no code)
        optimizer.pt          AdamW moments; loaded with weights_only=True (no arbitrary objects)
        state.json            step, tokens, planned steps, data-loader position, best val loss,
                              Python/NumPy RNG states, config, tokenizer fingerprint
        rng.pt                torch RNG states (CPU and CUDA), weights_only
        manifest.json         sha256 of every file above — written last; a checkpoint without a
                              matching manifest is not a checkpoint

The directory is written as .step_000200.tmp, fsynced, and renamed: a kill at any moment leaves
either the old set of checkpoints or the old set plus one complete new one.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from scratchlm.atomic import staged_dir
from scratchlm.errors import UserError

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the tied output matrix (safetensors refuses shared storage)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def rng_state() -> tuple[dict, dict]:
    py = random.getstate()
    np_state = np.random.get_state()
    json_state = {"python": [py[0], list(py[1]), py[2]],
                  "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    torch_state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        torch_state["cuda"] = torch.cuda.get_rng_state_all()
    return json_state, torch_state


def set_rng_state(json_state: dict, torch_state: dict) -> None:
    py = json_state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = json_state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch_state["cpu"])
    if "cuda" in torch_state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(torch_state["cuda"])


def save_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict) -> Path:
    final = Path(ckpt_root) / f"step_{step:06d}"
    json_rng, torch_rng = rng_state()
    with staged_dir(final, replace=True) as tmp:
        save_file(model_state(model), str(tmp / "model.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(torch_rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "rng": json_rng}, indent=1))
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
    return final


def validate(ckpt: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    manifest = ckpt / MANIFEST
    if not manifest.exists():
        return "no manifest (incomplete write)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return "corrupt manifest"
    for name, digest in files.items():
        p = ckpt / name
        if not p.exists():
            return f"{name} missing"
        if _sha256(p) != digest:
            return f"{name} fails its checksum"
    return None


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    root = Path(ckpt_root)
    if not root.exists():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), key=lambda p: p.name)


def latest_valid(ckpt_root: Path, log=print) -> Path | None:
    """The newest checkpoint that passes its checksums; broken ones are reported and skipped."""
    for ckpt in reversed(list_checkpoints(ckpt_root)):
        problem = validate(ckpt)
        if problem is None:
            return ckpt
        log(f"skipping checkpoint {ckpt.name}: {problem}")
    return None


def prune(ckpt_root: Path, keep_last: int, protect: Path | None = None) -> None:
    ckpts = list_checkpoints(ckpt_root)
    for old in ckpts[:-keep_last] if keep_last > 0 else []:
        if protect is None or old.resolve() != Path(protect).resolve():
            shutil.rmtree(old, ignore_errors=True)


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {ckpt} has no readable state.json ({e})") from None


def load_model_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load weights, refusing (in one line) a checkpoint of another shape."""
    path = Path(ckpt) / "model.safetensors"
    if not path.exists():
        raise UserError(f"no model.safetensors in {ckpt}; is this a scratchlm checkpoint?")
    try:
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{path} is corrupt ({e}); use an earlier checkpoint") from None
    own = model.state_dict()
    if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        own.pop("lm_head.weight", None)
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    if missing or extra:
        raise UserError(f"checkpoint {ckpt} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise UserError(f"checkpoint {ckpt} is a different shape: {k} is {tuple(v.shape)} there, "
                            f"{tuple(own[k].shape)} here (check the model config)")
    model.load_state_dict(sd, strict=False)


def load_optimizer(optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    optimizer.load_state_dict(torch.load(Path(ckpt) / "optimizer.pt", weights_only=True, map_location="cpu"))


def load_rng(ckpt: Path, state: dict) -> None:
    set_rng_state(state["rng"], torch.load(Path(ckpt) / "rng.pt", weights_only=True))
