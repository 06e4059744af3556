"""Export to GGUF, llama.cpp's file format, with `gguf` (the writer llama.cpp's own converter uses).

Three things differ from the Hugging Face export:
- Tensor names are llama.cpp's (token_embd, blk.N.attn_q, ...), weights in nn.Linear's (out, in)
  layout, so GPT-2's Conv1D transposes do not apply.
- llama.cpp's "llama" architecture rotates *adjacent* channel pairs (GGML's normal RoPE mode),
  while we (and HF Llama) rotate (first half, second half) pairs. Reordering the rows of W_q and
  W_k per head — (x0, x_{d/2}, x1, x_{d/2+1}, ...) — turns one convention into the other; it is
  the permutation llama.cpp's convert_hf_to_gguf.py applies to every Llama checkpoint.
  A QK-norm model is written as llama.cpp's "qwen3" (Llama + blk.N.attn_{q,k}_norm), which rotates
  (first half, second half) pairs as we do (GGML's NeoX mode): no permutation there.
- llama.cpp does not run the tokenizer's regex: it recognises pre-tokenizers by *name* and has the
  regex compiled in. So the pattern must be one it knows ("gpt-2" = our GPT-2 pattern,
  "llama-bpe" = Llama 3's, which is our GPT-4 pattern); any other regex is refused, because
  llama.cpp would silently split text differently and produce other ids.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from scratchlm.errors import UserError
from scratchlm.interop.hf import NORM_EPS, hf_layout, load_for_export, template_for
from scratchlm.interop.hf_tokenizer import chat_template_jinja, pad_token
from scratchlm.model.config import ModelConfig
from scratchlm.tokenizer import GPT2_PATTERN, GPT4_PATTERN, Tokenizer
from scratchlm.tokenizer.hf_export import bytes_to_unicode, to_hf_dict

# Llama 3's regex as its tokenizer.json writes it (what `import hf` brings in from a Llama 3 model).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's names for the pre-tokenizer regexes it has built in (llama-vocab.cpp).
PRE_TOKENIZER = {GPT2_PATTERN: "gpt-2", GPT4_PATTERN: "llama-bpe", LLAMA3_PATTERN: "llama-bpe"}


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install 'scratchlm[interop]'") from None
    return gguf


def rope_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from (first half, second half) pairing to adjacent pairs."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict under llama.cpp's tensor names (gpt2, llama or qwen3 architecture)."""
    layout = hf_layout(cfg)
    out = {"token_embd.weight": sd["embed_tokens.weight"], "output_norm.weight": sd["norm.weight"]}
    if layout == "gpt2":
        out["position_embd.weight"] = sd["pos_embed.weight"]
        out["output.weight"] = sd["lm_head.weight"]  # llama.cpp's gpt2 wants it even when tied
    elif not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    d, H, K = cfg.head_dim, cfg.n_heads, cfg.kv_heads
    for i in range(cfg.n_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        suffixes = ("weight", "bias") if cfg.bias or layout == "gpt2" else ("weight",)
        for s in suffixes:
            def get(name: str) -> torch.Tensor:  # GPT-2 always has biases: zeros where we have none
                w = sd.get(p + name + ".weight")
                return sd[p + name + "." + s] if s == "weight" or p + name + ".bias" in sd else w.new_zeros(w.shape[0])
            out[b + "attn_norm." + s] = get("attn_norm")
            out[b + "ffn_norm." + s] = get("ffn_norm")
            out[b + "attn_output." + s] = get("attn.out")
            out[b + "ffn_up." + s] = get("ffn.up_proj")
            out[b + "ffn_down." + s] = get("ffn.down_proj")
            if layout == "gpt2":
                out[b + "attn_qkv." + s] = get("attn.qkv")
            else:
                q, k, v = get("attn.qkv").split([H * d, K * d, K * d], dim=0)
                permute = rope_to_interleaved if layout == "llama" else lambda w, _: w  # qwen3: NeoX RoPE
                out[b + "attn_q." + s] = permute(q, H)
                out[b + "attn_k." + s] = permute(k, K)
                out[b + "attn_v." + s] = v
                out[b + "ffn_gate." + s] = get("ffn.gate_proj")
        if layout == "qwen3":
            out[b + "attn_q_norm.weight"] = sd[p + "attn.q_norm.weight"]
            out[b + "attn_k_norm.weight"] = sd[p + "attn.k_norm.weight"]
        if layout != "gpt2":  # RMSNorm has no bias
            out.pop(b + "attn_norm.bias", None)
            out.pop(b + "ffn_norm.bias", None)
    if layout == "gpt2":
        out["output_norm.bias"] = sd.get("norm.bias", torch.zeros_like(sd["norm.weight"]))
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def _add_tokenizer(writer, gguf, tok: Tokenizer, vocab_size: int, template) -> None:
    if tok.pattern not in PRE_TOKENIZER:
        raise UserError("tokenizer.pattern is a custom regex that llama.cpp cannot name, so it would tokenize "
                        "differently; GGUF export needs the gpt2 or gpt4 pattern")
    b2u = bytes_to_unicode()
    tokens = ["".join(b2u[x] for x in b) for b in tok.vocab]
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for s, _ in sorted(tok.special_tokens.items(), key=lambda kv: kv[1]):
        tokens.append(s)
        types.append(gguf.TokenType.CONTROL)
    for i in range(len(tokens), vocab_size):  # rows the model has beyond the tokenizer (padding)
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER[tok.pattern])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = to_hf_dict(tok)["model"]["merges"]  # "left right" strings, the form llama.cpp reads
    # llama.cpp refuses a BPE vocabulary without a merge list, and gguf cannot write an empty array.
    # A char-level tokenizer (no merges) gets one that can never fire: bytes C0 and C1 never occur
    # in UTF-8, and the text is always UTF-8.
    writer.add_token_merges(merges or [f"{b2u[0xC0]} {b2u[0xC1]}"])
    writer.add_bos_token_id(tok.eot_id)
    writer.add_eos_token_id(tok.eot_id)
    writer.add_pad_token_id(tok.special_tokens[pad_token(tok)])
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if template is not None:
        writer.add_eot_token_id(tok.special_tokens[template.end_token])
        writer.add_chat_template(chat_template_jinja(template))


def export_gguf(ckpt: str | Path, out: str | Path, template: str | None = None) -> Path:
    """Write FILE.gguf (fp32) that llama.cpp loads, tokenizer included (a LoRA run: adapters merged)."""
    _import_gguf()
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new --out file")
    if out.suffix != ".gguf":
        raise UserError(f"--out {out} should end in .gguf")
    model, tok, meta = load_for_export(ckpt)
    tmpl = template_for(meta["state"], template)
    if tmpl is not None and any(s not in tok.special_tokens for s in tmpl.special_tokens):
        raise UserError(f"the {tmpl.name} template needs special tokens this tokenizer lacks; use another template")
    return write_gguf(model, tok, out, Path(meta["path"]).parent.parent.name, tmpl)


def write_gguf(model, tok: Tokenizer, out: str | Path, name: str, template=None) -> Path:
    """Write `model` (a GPT, any dtype: stored as fp32) and `tok` to the GGUF file `out`, atomically."""
    gguf = _import_gguf()
    out = Path(out)
    cfg = model.cfg
    arch = hf_layout(cfg)
    tensors = gguf_tensors(cfg, model.state_dict())

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}); choose a writable --out") from None
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_context_length(cfg.context_length)
        writer.add_embedding_length(cfg.d_model)
        writer.add_block_count(cfg.n_layers)
        writer.add_feed_forward_length(cfg.d_ff)
        writer.add_head_count(cfg.n_heads)
        writer.add_vocab_size(cfg.vocab_size)
        if arch == "gpt2":
            writer.add_layer_norm_eps(NORM_EPS)
        else:
            writer.add_head_count_kv(cfg.kv_heads)
            writer.add_layer_norm_rms_eps(NORM_EPS)
            writer.add_rope_freq_base(cfg.rope_theta)
            writer.add_rope_dimension_count(cfg.head_dim)
            writer.add_key_length(cfg.head_dim)
            writer.add_value_length(cfg.head_dim)
        _add_tokenizer(writer, gguf, tok, cfg.vocab_size, template)
        for tname, t in tensors.items():
            writer.add_tensor(tname, t.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}); nothing was written") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return out
