"""Hugging Face interop: a checkpoint of ours <-> a `transformers` model directory.

Our parameter names already follow Llama's, so the work is in the few places the layouts differ:

    ours                         GPT-2 (GPT2LMHeadModel)              Llama (LlamaForCausalLM)
    embed_tokens                 transformer.wte                      model.embed_tokens
    pos_embed                    transformer.wpe                      (RoPE: none)
    layers.N.attn_norm           transformer.h.N.ln_1                 model.layers.N.input_layernorm
    layers.N.attn.qkv  (fused)   ...attn.c_attn  (fused, Conv1D: W.T) ...self_attn.{q,k,v}_proj (split)
    layers.N.attn.out            ...attn.c_proj  (W.T)                ...self_attn.o_proj
    layers.N.ffn_norm            ...ln_2                              ...post_attention_layernorm
    layers.N.ffn.{gate,up,down}  ...mlp.c_fc / c_proj (W.T, no gate)  ...mlp.{gate,up,down}_proj
    norm, lm_head                transformer.ln_f, lm_head            model.norm, lm_head
    layers.N.attn.{q,k}_norm     (none)                               (none; Qwen3: ...self_attn.{q,k}_norm)

A QK-norm model (model.qk_norm) is Llama plus one RMSNorm gain per head channel on q and k, applied
per head before RoPE: exactly Qwen3ForCausalLM, so it exports as "qwen3" with Llama's names.

GPT-2's Conv1D stores weights as (in, out), the transpose of nn.Linear: forgetting the transpose
gives a model that loads without complaint and outputs noise. Its GELU is the tanh approximation
("gelu_new"), as ours is. Our RoPE rotates (first half, second half) pairs, as HF Llama does, so
Q and K need no permutation here (GGUF is another story: see gguf.py). GPT-2 always has biases;
a bias-free model of ours is exported with zero biases, the same function.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from scratchlm.atomic import staged_dir, write_text
from scratchlm.errors import UserError
from scratchlm.finetune.templates import Template, get_template
from scratchlm.interop.hf_tokenizer import pad_token, stop_token_ids, tokenizer_from_hf, write_tokenizer_files
from scratchlm.model import GPT
from scratchlm.model.config import ModelConfig
from scratchlm.tokenizer import Tokenizer

NORM_EPS = 1e-5  # our LayerNorm and RMSNorm epsilon


# --- which HF architecture ------------------------------------------------------------------

def hf_layout(cfg: ModelConfig) -> str:
    """'gpt2', 'llama' or 'qwen3', or a one-line refusal naming the field HF cannot express."""
    if cfg.qk_norm:  # Qwen3 = Llama + q_norm/k_norm, with no MLP biases at all
        for ok, field, value in ((cfg.pos_encoding == "rope", "pos_encoding", cfg.pos_encoding),
                                 (cfg.norm == "rmsnorm", "norm", cfg.norm), (cfg.ffn == "swiglu", "ffn", cfg.ffn),
                                 (not cfg.bias, "bias", cfg.bias)):
            if not ok:
                shown = str(value).lower() if isinstance(value, bool) else repr(value)  # as the config writes it
                raise UserError(f"model.qk_norm=true with model.{field}={shown} has no Hugging Face architecture "
                                f"(QK-norm exports as Qwen3: pos_encoding=rope, norm=rmsnorm, ffn=swiglu, bias=false)")
        return "qwen3"
    if cfg.pos_encoding == "learned":
        for ok, field, value in ((cfg.norm == "layernorm", "norm", cfg.norm), (cfg.ffn == "gelu", "ffn", cfg.ffn),
                                 (cfg.kv_heads == cfg.n_heads, "n_kv_heads", cfg.n_kv_heads)):
            if not ok:
                raise UserError(f"model.{field}={value!r} with learned positions has no Hugging Face architecture "
                                f"(GPT-2 has LayerNorm, GELU and one K/V head per query head)")
        return "gpt2"
    if cfg.pos_encoding == "rope":
        for ok, field, value in ((cfg.norm == "rmsnorm", "norm", cfg.norm), (cfg.ffn == "swiglu", "ffn", cfg.ffn)):
            if not ok:
                raise UserError(f"model.{field}={value!r} with RoPE has no Hugging Face architecture "
                                f"(Llama has RMSNorm and SwiGLU)")
        return "llama"
    raise UserError(f"model.pos_encoding={cfg.pos_encoding!r} has no Hugging Face architecture "
                    f"(GPT-2 learns positions, Llama rotates them)")


# --- our state dict <-> theirs --------------------------------------------------------------

def _split_qkv(cfg: ModelConfig, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    d = cfg.head_dim
    return t.split([cfg.n_heads * d, cfg.kv_heads * d, cfg.kv_heads * d], dim=0)


def to_hf_state(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> the HF model's (without lm_head.weight when the head is tied)."""
    layout = hf_layout(cfg)
    out: dict[str, torch.Tensor] = {}

    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        if layout == "gpt2":
            h = f"transformer.h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
                out[h + theirs + ".weight"] = sd[p + ours + ".weight"]
                out[h + theirs + ".bias"] = sd.get(p + ours + ".bias", torch.zeros_like(sd[p + ours + ".weight"]))
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"),
                                 ("ffn.up_proj", "mlp.c_fc"), ("ffn.down_proj", "mlp.c_proj")):
                w = sd[p + ours + ".weight"]
                out[h + theirs + ".weight"] = w.t().contiguous()  # Conv1D is (in, out)
                out[h + theirs + ".bias"] = sd.get(p + ours + ".bias", w.new_zeros(w.shape[0]))
        else:
            h = f"model.layers.{i}."
            out[h + "input_layernorm.weight"] = sd[p + "attn_norm.weight"]
            out[h + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
            if layout == "qwen3":
                for n in ("q_norm", "k_norm"):
                    out[h + f"self_attn.{n}.weight"] = sd[p + f"attn.{n}.weight"]
            for suffix in ("weight", "bias") if cfg.bias else ("weight",):
                q, k, v = _split_qkv(cfg, sd[p + "attn.qkv." + suffix])
                for name, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    out[h + f"self_attn.{name}.{suffix}"] = t.contiguous()
                out[h + f"self_attn.o_proj.{suffix}"] = sd[p + "attn.out." + suffix]
                for name in ("gate_proj", "up_proj", "down_proj"):
                    out[h + f"mlp.{name}.{suffix}"] = sd[p + f"ffn.{name}.{suffix}"]
    if layout == "gpt2":
        out["transformer.wte.weight"] = sd["embed_tokens.weight"]
        out["transformer.wpe.weight"] = sd["pos_embed.weight"]
        out["transformer.ln_f.weight"] = sd["norm.weight"]
        out["transformer.ln_f.bias"] = sd.get("norm.bias", torch.zeros_like(sd["norm.weight"]))
    else:
        out["model.embed_tokens.weight"] = sd["embed_tokens.weight"]
        out["model.norm.weight"] = sd["norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def from_hf_state(layout: str, cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF model's state dict -> ours (the inverse of `to_hf_state`). Every tensor must be used:
    a leftover one means config.json does not describe these weights."""
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise UserError(f"the checkpoint has no tensor {name!r}; is it complete (all shards present)?")
        used.add(name)
        return hf[name]

    sd: dict[str, torch.Tensor] = {}
    if layout == "gpt2":
        hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
        sd["embed_tokens.weight"] = take("wte.weight")
        sd["pos_embed.weight"] = take("wpe.weight")
        sd["norm.weight"], sd["norm.bias"] = take("ln_f.weight"), take("ln_f.bias")
        for i in range(cfg.n_layers):
            h, p = f"h.{i}.", f"layers.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
                for s in ("weight", "bias"):
                    sd[p + ours + "." + s] = take(h + theirs + "." + s)
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"),
                                 ("ffn.up_proj", "mlp.c_fc"), ("ffn.down_proj", "mlp.c_proj")):
                sd[p + ours + ".weight"] = take(h + theirs + ".weight").t().contiguous()
                sd[p + ours + ".bias"] = take(h + theirs + ".bias")
    else:
        sd["embed_tokens.weight"] = take("model.embed_tokens.weight")
        sd["norm.weight"] = take("model.norm.weight")
        for i in range(cfg.n_layers):
            h, p = f"model.layers.{i}.", f"layers.{i}."
            sd[p + "attn_norm.weight"] = take(h + "input_layernorm.weight")
            sd[p + "ffn_norm.weight"] = take(h + "post_attention_layernorm.weight")
            if layout == "qwen3":
                for n in ("q_norm", "k_norm"):
                    sd[p + f"attn.{n}.weight"] = take(h + f"self_attn.{n}.weight")
            sd[p + "attn.qkv.weight"] = torch.cat([take(h + f"self_attn.{n}_proj.weight") for n in "qkv"])
            sd[p + "attn.out.weight"] = take(h + "self_attn.o_proj.weight")
            for n in ("gate_proj", "up_proj", "down_proj"):
                sd[p + f"ffn.{n}.weight"] = take(h + f"mlp.{n}.weight")
            if cfg.bias:  # HF may have attention biases without MLP biases (or the reverse): zeros fill in
                def bias(name: str, width: int) -> torch.Tensor:
                    return take(name) if name in hf else torch.zeros(width, dtype=sd["norm.weight"].dtype)
                sd[p + "attn.qkv.bias"] = torch.cat([bias(h + f"self_attn.{n}_proj.bias", w) for n, w in
                                                     (("q", cfg.n_heads * cfg.head_dim),
                                                      ("k", cfg.kv_heads * cfg.head_dim),
                                                      ("v", cfg.kv_heads * cfg.head_dim))])
                sd[p + "attn.out.bias"] = bias(h + "self_attn.o_proj.bias", cfg.d_model)
                for n, w in (("gate_proj", cfg.d_ff), ("up_proj", cfg.d_ff), ("down_proj", cfg.d_model)):
                    sd[p + f"ffn.{n}.bias"] = bias(h + f"mlp.{n}.bias", w)
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = take("lm_head.weight")
    # Causal-mask and RoPE-frequency buffers some checkpoints carry; a tied head's copy.
    ignorable = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", "lm_head.weight")
    leftover = sorted(k for k in hf if k not in used and not k.endswith(ignorable))
    if leftover:
        raise UserError(f"the checkpoint has tensors its config.json does not describe ({', '.join(leftover[:3])}"
                        f"{', ...' if len(leftover) > 3 else ''}); check num_hidden_layers/n_layer")
    return {k: v.float().contiguous() for k, v in sd.items()}


# --- config.json ------------------------------------------------------------------------------

def hf_config(cfg: ModelConfig, tok: Tokenizer) -> dict:
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
              "bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id,
              "pad_token_id": tok.special_tokens[pad_token(tok)], "use_cache": True}
    if hf_layout(cfg) == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": cfg.d_model,
                "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "n_positions": cfg.context_length,
                "n_ctx": cfg.context_length, "activation_function": "gelu_new", "layer_norm_epsilon": NORM_EPS,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.attention_dropout,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, **common}
    layout = hf_layout(cfg)
    if layout == "qwen3":  # Llama's keys (no mlp_bias: Qwen3's MLP has none), sliding window off
        llama = hf_config(dataclasses.replace(cfg, qk_norm=False), tok)
        del llama["mlp_bias"]
        return {**llama, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False,
                "sliding_window": None, "max_window_layers": cfg.n_layers,
                "layer_types": ["full_attention"] * cfg.n_layers}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.d_model,
            "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "max_position_embeddings": cfg.context_length, "rms_norm_eps": NORM_EPS, "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "rope_scaling": None,
            "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": cfg.attention_dropout,
            "initializer_range": 0.02, **common}


def model_config_from_hf(config: dict, where: Path) -> tuple[str, ModelConfig]:
    """(layout, our ModelConfig) for a GPT-2, Llama or Qwen3 config.json, or a one-line refusal."""
    kind = config.get("model_type")

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise UserError(f"{where}: {what}; scratchlm's GPT cannot hold this model")

    if kind == "gpt2":
        act = config.get("activation_function", "gelu_new")
        need(act in ("gelu_new", "gelu_pytorch_tanh"), f"activation_function={act!r} (scratchlm uses tanh GELU)")
        need(math.isclose(config.get("layer_norm_epsilon", 1e-5), NORM_EPS), "layer_norm_epsilon is not 1e-5")
        need(not config.get("scale_attn_by_inverse_layer_idx") and not config.get("reorder_and_upcast_attn")
             and config.get("scale_attn_weights", True), "a non-standard GPT-2 attention scaling is set")
        d = config["n_embd"]
        cfg = ModelConfig(vocab_size=config["vocab_size"], context_length=config["n_positions"], d_model=d,
                          n_layers=config["n_layer"], n_heads=config["n_head"], d_ff=config.get("n_inner") or 4 * d,
                          pos_encoding="learned", norm="layernorm", ffn="gelu", bias=True,
                          tie_embeddings=config.get("tie_word_embeddings", True))
        return "gpt2", cfg.validate()
    if kind in ("llama", "qwen3"):
        if kind == "qwen3":
            need(not config.get("use_sliding_window") and "sliding_attention" not in (config.get("layer_types") or []),
                 "sliding-window attention is enabled (scratchlm attends to the whole context)")
        rope = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        need(rope_type == "default", f"rope type {rope_type!r} (scratchlm has plain RoPE only)")
        need(config.get("hidden_act", "silu") == "silu", f"hidden_act={config.get('hidden_act')!r} (SwiGLU uses silu)")
        need(math.isclose(config.get("rms_norm_eps", 1e-6), NORM_EPS),
             f"rms_norm_eps={config.get('rms_norm_eps', 1e-6)} (scratchlm's RMSNorm uses 1e-5)")
        d, heads = config["hidden_size"], config["num_attention_heads"]
        head_dim = config.get("head_dim", 128 if kind == "qwen3" else None)  # Qwen3Config's default is 128
        need(head_dim in (None, d // heads), f"head_dim={head_dim} is not hidden_size/num_attention_heads")
        cfg = ModelConfig(vocab_size=config["vocab_size"], context_length=config["max_position_embeddings"], d_model=d,
                          n_layers=config["num_hidden_layers"], n_heads=heads,
                          n_kv_heads=config.get("num_key_value_heads") or heads, d_ff=config["intermediate_size"],
                          pos_encoding="rope", rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 1e4))),
                          norm="rmsnorm", ffn="swiglu", qk_norm=kind == "qwen3",
                          bias=bool(config.get("attention_bias") or config.get("mlp_bias")),
                          tie_embeddings=config.get("tie_word_embeddings", False))
        return kind, cfg.validate()
    raise UserError(f"{where}: model_type {kind!r} is not gpt2, llama or qwen3; scratchlm imports those families")


# --- export -----------------------------------------------------------------------------------

def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; choose a new --out directory")


def template_for(state: dict, name: str | None) -> Template | None:
    """The chat template to export: the one asked for, else the one a fine-tuned checkpoint records."""
    if name:
        return None if name == "none" else get_template(name)
    task = state.get("task") or {}
    return get_template(task["template"]) if task.get("kind") in ("sft", "dpo") and task.get("template") else None


def load_for_export(ckpt: str | Path):
    """(model, tokenizer, meta) of a run as one plain GPT, what export writes: a LoRA run's adapters
    are merged into the base weights (merge_and_unload), so the exported model computes what the
    LoRA model computes; a classifier, whose head scores classes instead of tokens, is refused."""
    from scratchlm.finetune.lora import lora_layers, merge_and_unload
    from scratchlm.train.checkpoint import load_for_inference
    model, tok, meta = load_for_inference(ckpt, device="cpu")
    if meta["state"]["task"].get("kind") == "classify":
        raise UserError(f"{ckpt} is a classifier; export supports language models (pretrained, imported, SFT, "
                        f"DPO, LoRA runs merged), so use `scratchlm classify --ckpt {ckpt}` to run it")
    if lora_layers(model):
        model = merge_and_unload(model)
    return model, tok, meta


def export_hf(ckpt: str | Path, out: str | Path, template: str | None = None) -> Path:
    """Write a directory that `AutoModelForCausalLM/AutoTokenizer.from_pretrained` load as is
    (a LoRA run: the adapters merged into the weights)."""
    from safetensors.torch import save_file

    out = Path(out)
    _check_out_dir(out)
    model, tok, meta = load_for_export(ckpt)
    cfg = model.cfg
    hf_layout(cfg)  # refuse before writing anything
    tmpl = template_for(meta["state"], template)
    tensors = to_hf_state(cfg, model.state_dict())
    try:
        with staged_dir(out, replace=out.exists()) as tmp:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            write_text(tmp / "config.json", json.dumps(hf_config(cfg, tok), indent=1))
            generation = {"bos_token_id": tok.eot_id, "eos_token_id": stop_token_ids(tok, tmpl),
                          "pad_token_id": tok.special_tokens[pad_token(tok)], "max_length": cfg.context_length}
            write_text(tmp / "generation_config.json", json.dumps(generation, indent=1))
            write_tokenizer_files(tok, tmp, tmpl, cfg.context_length)
            write_text(tmp / "scratchlm.json", json.dumps({"source": meta["path"],
                                                           "model": dataclasses.asdict(cfg)}, indent=1))
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}); choose a writable --out") from None
    return out


# --- import -----------------------------------------------------------------------------------

def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint: one file or shards (safetensors, or pytorch_model.bin read
    with weights_only=True, so no code in the file runs)."""
    from safetensors.torch import load_file

    def load_one(path: Path) -> dict[str, torch.Tensor]:
        if not path.exists():
            raise UserError(f"missing shard {path.name} in {directory} (listed in its index); download it again")
        try:
            if path.suffix == ".safetensors":
                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt headers, pickles with objects weights_only refuses
            raise UserError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (directory / single).exists():
            return load_one(directory / single)
        if (directory / index).exists():
            try:
                files = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
                raise UserError(f"{directory / index} is not a readable shard index ({type(e).__name__})") from None
            missing = [f for f in files if not (directory / f).exists()]
            if missing:
                raise UserError(f"missing shard {missing[0]} in {directory} ({len(missing)} of {len(files)} "
                                f"missing); download it again")
            weights: dict[str, torch.Tensor] = {}
            for f in files:
                weights.update(load_one(directory / f))
            return weights
    raise UserError(f"no model.safetensors or pytorch_model.bin (or their shard index) in {directory}")


def import_hf(src: str | Path, out: str | Path) -> Path:
    """A HF GPT-2/Llama/Qwen3 directory -> a scratchlm run directory (checkpoint + tokenizer + config)
    that `generate`, `eval`, fine-tuning and `pretrain --resume` use like any run of ours."""
    from scratchlm.config import Config
    from scratchlm.train import checkpoint as ckpt
    from scratchlm.train.trainer import make_optimizer, model_fingerprint

    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise UserError(f"{src} has no config.json: it is not a Hugging Face model directory")
    try:
        config = json.loads((src / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{src / 'config.json'} is not readable JSON ({type(e).__name__})") from None
    _check_out_dir(out)
    layout, mcfg = model_config_from_hf(config, src / "config.json")
    tok = tokenizer_from_hf(src)
    if tok.vocab_size > mcfg.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model only {mcfg.vocab_size} embeddings")
    hf = read_hf_weights(src)
    sd = from_hf_state(layout, mcfg, hf)

    cfg = Config(model=mcfg)
    cfg.run.out_dir, cfg.run.name = str(out.parent), out.name
    cfg.tokenizer.vocab_size, cfg.tokenizer.path = tok.vocab_size, str(out / "tokenizer")
    model = GPT(mcfg)
    own = model.state_dict()
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise UserError(f"{src}: tensor for {k} is {tuple(v.shape)}, config.json implies {tuple(own[k].shape)}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied head only
    state = {"step": 0, "tokens": 0, "planned_steps": cfg.train.max_steps, "best_val_loss": math.inf,
             "elapsed": 0.0, "loader": {"epoch": 0, "batch_in_epoch": 0, "seed": cfg.run.seed},  # a fresh loader's
             "model": model_fingerprint(cfg), "tokenizer_fingerprint": tok.fingerprint,
             "config": dataclasses.asdict(cfg), "imported_from": {"format": "hf", "path": str(src.resolve()),
                                                                  "architecture": layout}}
    from scratchlm.config import to_toml
    try:
        with staged_dir(out, replace=out.exists()) as tmp:
            tok.save(tmp / "tokenizer")
            write_text(tmp / "config.toml", to_toml(cfg))
            # A fresh optimizer, so `pretrain --resume` continues from these weights like any run.
            ckpt.save_checkpoint(tmp / "checkpoints", 0, model, make_optimizer(model, cfg.train, torch.device("cpu")),
                                 state)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}); choose a writable --out") from None
    return out
