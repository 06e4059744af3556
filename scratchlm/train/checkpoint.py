"""Checkpoints that survive crashes: complete or absent, never half-written, never unpickled blindly.

    checkpoints/step_000200/
        model.safetensors     weights (safetensors: plain tensors, no code)
        optimizer.pt          AdamW moments; loaded with weights_only=True (no arbitrary objects)
        state.json            step, tokens, planned steps, data position, best val loss,
                              Python/NumPy RNG states, config, tokenizer fingerprint, and "task":
                              what trained it ({"kind": "pretrain"}, an SFT template, ...)
        rng.pt                torch RNG states (CPU and CUDA), weights_only
        manifest.json         sha256 of every file above — written last; a checkpoint without a
                              matching manifest is not a checkpoint

An FSDP run (`train.parallel = "fsdp"`) writes, instead of optimizer.pt,
        sharded/              model and AdamW state as torch.distributed.checkpoint (DCP) shards,
                              one file per rank plus .metadata; DCP reshards on load, so a run
                              saved by 8 ranks resumes on 4, on 16, or in one process
and still a consolidated model.safetensors, so `generate`, `eval` and export read every
checkpoint the same way. (The sharded directory must be on a filesystem every rank can see.)

The directory is written as .step_000200.tmp, fsynced, and renamed: a kill at any moment leaves
either the old set of checkpoints or the old set plus one complete new one.
(`--resume` removes the staged directories a kill left behind.) The best model so far is kept as
best/step_N, named by the step it comes from.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from scratchlm.atomic import publish_dir, staged_dir
from scratchlm.errors import UserError
from scratchlm.train.distributed import DistInfo, barrier

MANIFEST = "manifest.json"
SHARDED = "sharded"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Parameters that are another parameter under a second name (a tied output head):
    {alias: original}. Saved once, under the original name."""
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            alias[name] = first[id(p)]
        else:
            first[id(p)] = name
    return alias


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied aliases (safetensors refuses shared storage)."""
    aliases = tied_names(model)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in aliases}


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
                    state: dict, info: DistInfo | None = None, sharded: bool = False,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `step_{step}`. Plain runs call this on rank 0 only; sharded (FSDP) runs
    on every rank, since each rank holds a piece of the weights. `weights`: save these tensors
    instead of the whole model (a LoRA run's adapters)."""
    final = Path(ckpt_root) / f"step_{step:06d}"
    if not sharded:
        with staged_dir(final, replace=True) as tmp:
            if optimizer is not None:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            own = weights if weights is not None else model_state(model)
            _finish(tmp, {k: v.detach().contiguous() for k, v in own.items()}, state, step)
        return final

    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    info = info or DistInfo()
    tmp = final.with_name(f".{final.name}.tmp")  # one name every rank can compute
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(info)
    try:
        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            try:
                dcp_save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp / SHARDED)
            except CheckpointException as e:  # DCP wraps every rank's I/O error (a full disk) in one
                raise OSError(f"sharded save failed: {str(e).splitlines()[-1][:300]}") from None
        # Gather the full weights onto rank 0 (CPU), one tensor at a time, for inference.
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if info.is_main:
            for alias in tied_names(model):
                full.pop(alias, None)
            _finish(tmp, {k: v.contiguous() for k, v in full.items()}, state, step)
            publish_dir(tmp, final, replace=True)
    except BaseException:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(info)
    return final


def _finish(tmp: Path, weights: dict[str, torch.Tensor], state: dict, step: int) -> None:
    """Weights, RNG, state.json, and last the manifest of checksums over everything written."""
    json_rng, torch_rng = rng_state()
    save_file(weights, str(tmp / "model.safetensors"))
    torch.save(torch_rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "rng": json_rng}, indent=1))
    files = {p.relative_to(tmp).as_posix(): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


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


def remove_staging(ckpt_root: Path) -> list[str]:
    """Clean up what a killed save leaves behind. Staged `.step_N.*.tmp` directories were never
    published, so never a checkpoint: removed (they can be GBs). A `.step_N.old` is the previous
    copy of `step_N`, moved aside just before the new one took its name: if the kill came between
    the two renames, `step_N` is missing and `.old` is the only copy, so it is put back; otherwise
    it was replaced and goes."""
    root = Path(ckpt_root)
    stale = [p for p in root.glob(".step_*") if p.is_dir() and p.name.endswith((".tmp", ".old"))] \
        if root.exists() else []
    removed = []
    for p in stale:
        final = root / p.name[1:-len(".old")] if p.name.endswith(".old") else None
        if final is not None and not final.exists():
            os.replace(p, final)  # the only copy of a published checkpoint: restore it
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return sorted(removed)


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


def load_model_weights(model: torch.nn.Module, ckpt: Path, strict: bool = True) -> None:
    """Load weights, refusing (in one line) a checkpoint of another shape. strict=False: the
    checkpoint may hold only some of the model's tensors (a LoRA run's adapters)."""
    path = Path(ckpt) / "model.safetensors"
    if not path.exists():
        raise UserError(f"no model.safetensors in {ckpt}; is this a scratchlm checkpoint?")
    try:
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{path} is corrupt ({e}); use an earlier checkpoint") from None
    own = model.state_dict()
    for alias in tied_names(model):
        own.pop(alias, None)
    missing = sorted(set(own) - set(sd)) if strict else []
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


def load_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path,
                        sharded_model: bool = False, strict: bool = True) -> None:
    """Weights and AdamW state from any checkpoint into any layout: a sharded checkpoint goes
    through DCP, which reshards it to this run's world size (1 process included); a plain one
    loads directly, or, into an FSDP model, as full tensors that each rank slices its shard from."""
    # Loading an optimizer state also loads the saved run's choice of kernel (fused/foreach) into every
    # param group: keep this run's own (a checkpoint of an older version would otherwise turn fused off).
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    _load_training_state(model, optimizer, Path(ckpt), sharded_model, strict)
    for group, kernel in zip(optimizer.param_groups, kernels):
        group.update(kernel)
    for opt in (optimizer.muon, optimizer.adamw) if hasattr(optimizer, "adamw") else (optimizer,):
        for group in opt.param_groups:  # the fused kernel wants its step counts beside the parameters
            for p in group["params"] if group.get("fused") else ():
                if "step" in opt.state.get(p, {}):
                    opt.state[p]["step"] = opt.state[p]["step"].to(device=p.device, dtype=torch.float32)


def _load_training_state(model: torch.nn.Module, optimizer, ckpt: Path, sharded_model: bool, strict: bool) -> None:
    import warnings

    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    if (ckpt / SHARDED).is_dir():
        model_sd, optim_sd = get_state_dict(model, optimizer)
        both = {"model": model_sd, "optimizer": optim_sd}
        reader = _safe_reader(ckpt / SHARDED)
        reader.read_metadata()  # check it here, where a refusal is one clear line, not a DCP traceback
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process.*")
            try:
                dcp_load(both, storage_reader=reader)
            except Exception as e:  # DCP gathers errors from all ranks into one long exception
                raise UserError(f"cannot load the sharded checkpoint {ckpt}: {str(e).splitlines()[-1][:300]}; "
                                f"use an earlier checkpoint") from None
        set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])
    elif not sharded_model:
        load_model_weights(model, ckpt, strict=strict)
        load_optimizer(optimizer, ckpt)
    else:
        # A plain optimizer state names parameters by position in its param groups; DCP's
        # full-state format names them by their path in the model. Same order, so map one to the other.
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        plain = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
        optim_sd = {"state": {order[i]: v for i, v in plain["state"].items()},
                    "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in plain["param_groups"]]}
        weights = load_file(str(ckpt / "model.safetensors"))
        for alias, original in tied_names(model).items():
            weights[alias] = weights[original]
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))


def load_rng(ckpt: Path, state: dict) -> None:
    set_rng_state(state["rng"], torch.load(Path(ckpt) / "rng.pt", weights_only=True))


def _safe_reader(path: Path):
    """DCP's FileSystemReader, except that its .metadata (a pickle) may only hold DCP's own
    metadata classes, torch sizes/dtypes/layouts and paths: no arbitrary objects, so no code
    runs from a checkpoint file (the tensors themselves DCP loads with weights_only=True)."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader

    allowed_modules = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    allowed = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            obj = None
            if module.startswith("torch") or (module, name) in allowed:
                try:
                    obj = super().find_class(module, name)
                except (ImportError, AttributeError):
                    pass
            if ((module, name) in allowed or isinstance(obj, torch.dtype)
                    or (module in allowed_modules and isinstance(obj, type))):
                return obj
            raise UserError(f"{path}/.metadata holds a {module}.{name} object, which a checkpoint never "
                            f"contains; refusing to load it (is this file from a trusted run?)")

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # FileSystemReader's, with Unpickler for pickle.load
            from torch.distributed.checkpoint.metadata import StorageMeta
            with open(Path(self.path) / ".metadata", "rb") as f:
                metadata = Unpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def load_for_inference(ckpt_dir: str | Path, device: str = "auto"):
    """(model, tokenizer, meta) from a checkpoint or run directory, ready to generate or evaluate.
    A run directory means its best checkpoint if it kept one, else its latest. meta holds the run's
    "config", the checkpoint's "state" (state["task"]: what trained it, e.g. {"kind": "pretrain"})
    and its "path"."""
    from scratchlm.config import from_dict
    from scratchlm.model import GPT
    from scratchlm.tokenizer import Tokenizer
    from scratchlm.train.precision import pick_device
    path = Path(ckpt_dir)
    if not path.exists():
        raise UserError(f"checkpoint {path} not found")
    if (path / "checkpoints").exists() or (path / "best").exists():  # a run directory
        best = [c for c in list_checkpoints(path / "best") if validate(c) is None]
        path = best[-1] if best else latest_valid(path / "checkpoints", log=lambda *_: None)
        if path is None:
            raise UserError(f"no valid checkpoint in run directory {ckpt_dir}")
    problem = validate(path)
    if problem:
        raise UserError(f"checkpoint {path} is not usable: {problem}")
    state = read_state(path)
    state.setdefault("task", {"kind": "pretrain"})  # checkpoints from before tasks were recorded
    cfg = from_dict(state["config"])
    dataset_tok = Path(cfg.data.dataset_dir or cfg.run_dir / "data") / "tokenizer"
    tok_dir = path.parent.parent / "tokenizer"
    for candidate in (path / "tokenizer", tok_dir, dataset_tok):
        if (candidate / "tokenizer.scratchlm.json").exists():
            tok = Tokenizer.load(candidate)
            break
    else:
        raise UserError(f"no tokenizer found for checkpoint {path} (looked in {tok_dir} and {dataset_tok})")
    if tok.fingerprint != state.get("tokenizer_fingerprint"):
        raise UserError(f"the tokenizer at {tok_dir} is not the one checkpoint {path} was trained with")
    if state["task"].get("kind", "pretrain") == "pretrain":
        model = GPT(cfg.model)
        load_model_weights(model, path)
    else:  # a fine-tuned run: a classifier head, LoRA adapters on their base, ...
        from scratchlm.finetune.base import rebuild
        model = rebuild(cfg, state["task"], path)
    model.to(pick_device(device)).eval()
    return model, tok, {"config": cfg, "state": state, "path": str(path)}
