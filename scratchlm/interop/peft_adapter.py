"""A LoRA run as a `peft` adapter directory, for the exported base (instead of merging):

    scratchlm export hf --ckpt runs/base --out hf/base
    scratchlm export hf --ckpt runs/sft --out hf/sft-adapter --peft-adapter
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("hf/base"), "hf/sft-adapter")

peft adapts whole modules, y = W x + (alpha/r) B A x, with the same A (r, in) and B (out, r) as
ours, also on GPT-2's Conv1D (fan_in_fan_out only changes how peft merges). The one difference is
our q/k/v adapters on slices of the fused qkv projection:
- Llama splits the projection, so each part becomes its own adapter on q_proj/k_proj/v_proj.
- GPT-2 keeps it fused (c_attn), so n parts become one adapter of rank n·r: A stacked, B block-
  diagonal (part k's B in its own rows and rank columns), alpha n·alpha so that alpha/rank is ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scratchlm.atomic import staged_dir, write_text
from scratchlm.errors import UserError
from scratchlm.finetune.lora import LoRALinear
from scratchlm.interop.hf import _check_out_dir, hf_layout, template_for
from scratchlm.interop.hf_tokenizer import write_tokenizer_files

GPT2_MODULES = {"attn.qkv": "attn.c_attn", "attn.out": "attn.c_proj", "ffn.up_proj": "mlp.c_fc",
                "ffn.down_proj": "mlp.c_proj"}
LLAMA_MODULES = {"attn.qkv": "self_attn.{part}_proj", "attn.out": "self_attn.o_proj", "ffn.up_proj": "mlp.up_proj",
                 "ffn.gate_proj": "mlp.gate_proj", "ffn.down_proj": "mlp.down_proj"}


def peft_tensors(model, layout: str, rank: int, alpha: float) -> tuple[dict[str, torch.Tensor], dict]:
    """(peft's state dict, the adapter_config fields that depend on the adapters) for `model`, a GPT
    with LoRA. target_modules are name suffixes: GPT-2 has attn.c_proj and mlp.c_proj, both c_proj."""
    tensors: dict[str, torch.Tensor] = {}
    targets, rank_pattern, alpha_pattern = set(), {}, {}

    def put(prefix: str, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        targets.add(module)
        for ab, t in (("A", a), ("B", b)):
            tensors[f"base_model.model.{prefix}{module}.lora_{ab}.weight"] = t.detach().float().contiguous().clone()

    for name, layer in model.named_modules():
        if not isinstance(layer, LoRALinear):
            continue
        if name == "lm_head":
            put("", "lm_head", layer.lora_A["head"], layer.lora_B["head"])
            continue
        i, site = name.split(".", 2)[1:]  # "layers.{i}.{site}"
        if layout in ("llama", "qwen3"):  # Qwen3 names its projections as Llama does
            for part in layer.parts:
                put(f"model.layers.{i}.", LLAMA_MODULES[site].format(part=part), layer.lora_A[part], layer.lora_B[part])
        elif site == "attn.qkv":
            n = len(layer.parts)
            a = torch.cat([layer.lora_A[p] for p in layer.parts])
            b = a.new_zeros(layer.out_features, n * rank)
            for k, (part, (s, e)) in enumerate(layer.parts.items()):
                b[s:e, k * rank:(k + 1) * rank] = layer.lora_B[part]
            put(f"transformer.h.{i}.", "attn.c_attn", a, b)
            if n > 1:
                rank_pattern["c_attn"], alpha_pattern["c_attn"] = n * rank, n * alpha
        else:
            (part,) = layer.parts
            put(f"transformer.h.{i}.", GPT2_MODULES[site], layer.lora_A[part], layer.lora_B[part])
    fields = {"target_modules": sorted(targets), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    return tensors, fields


def export_peft_adapter(ckpt: str | Path, out: str | Path, template: str | None = None) -> Path:
    """Write OUT/adapter_config.json + adapter_model.safetensors (+ the tokenizer files, with the
    run's chat template) for the Hugging Face export of the run's base."""
    from safetensors.torch import save_file

    from scratchlm.train.checkpoint import load_for_inference
    out = Path(out)
    _check_out_dir(out)
    model, tok, meta = load_for_inference(ckpt, device="cpu")
    task = meta["state"]["task"]
    if task.get("kind") == "classify":
        raise UserError(f"{ckpt} is a classifier; --peft-adapter supports LoRA language-model runs (SFT)")
    if not task.get("lora"):
        raise UserError(f"{ckpt} has no LoRA adapters (finetune.trainable={task.get('trainable', 'all')!r}); "
                        f"export it without --peft-adapter")
    layout = hf_layout(model.cfg)
    lora = task["lora"]
    tensors, fields = peft_tensors(model, layout, lora["rank"], lora["alpha"])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
              "r": lora["rank"], "lora_alpha": lora["alpha"], "lora_dropout": lora.get("dropout", 0.0), **fields,
              "fan_in_fan_out": layout == "gpt2", "bias": "none", "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}
    tmpl = template_for(meta["state"], template)
    try:
        with staged_dir(out, replace=out.exists()) as tmp:
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            write_text(tmp / "adapter_config.json", json.dumps(config, indent=1))
            write_tokenizer_files(tok, tmp, tmpl, model.cfg.context_length)
            write_text(tmp / "scratchlm.json", json.dumps({"source": meta["path"], "base": task.get("base"),
                                                           "base_fingerprint": task.get("base_fingerprint")},
                                                          indent=1))
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}); choose a writable --out") from None
    return out
