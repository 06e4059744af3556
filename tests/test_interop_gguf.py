"""GGUF export, read back with gguf's own reader: the right tensors, the right metadata.
(llama.cpp itself runs the file in tests/check_llamacpp.py: `make check-llamacpp`.)"""

import numpy as np
import pytest
import torch
from interop_util import make_run

from scratchlm.cli import main
from scratchlm.interop.gguf import export_gguf, rope_to_interleaved
from scratchlm.model.attention import apply_rope, rope_tables
from scratchlm.tokenizer.hf_export import bytes_to_unicode, to_hf_dict
from scratchlm.train.checkpoint import load_for_inference

gguf = pytest.importorskip("gguf")  # in pyproject's `test` and `interop` extras


def read(path):
    r = gguf.GGUFReader(path)

    def field(key):
        f = r.fields[key]
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            return [bytes(f.parts[i]).decode() if f.types[-1] == gguf.GGUFValueType.STRING else f.parts[i][0]
                    for i in f.data]
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0]

    tensors = {t.name: torch.from_numpy(np.array(t.data)).reshape(tuple(int(x) for x in reversed(t.shape)))
               for t in r.tensors}
    return field, tensors


@pytest.mark.parametrize("preset, overrides, arch", [("gpt2-124m", (), "gpt2"), ("llama-small", (), "llama"),
                                                      ("llama-small", ("model.bias=true",), "llama"),
                                                      ("llama-small", ("model.qk_norm=true",), "qwen3")])
def test_gguf_reads_back(tmp_path, preset, overrides, arch):
    run = make_run(tmp_path, "run", preset, overrides, state_extra={"task": {"kind": "sft", "template": "chat"}})
    path = export_gguf(run, tmp_path / "m.gguf")
    field, tensors = read(path)
    model, tok, _ = load_for_inference(run, device="cpu")
    c = model.cfg
    assert field("general.architecture") == arch
    assert field(f"{arch}.context_length") == c.context_length and field(f"{arch}.block_count") == c.n_layers
    assert field(f"{arch}.embedding_length") == c.d_model and field(f"{arch}.attention.head_count") == c.n_heads
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "llama-bpe"
    b2u = bytes_to_unicode()
    tokens = field("tokenizer.ggml.tokens")
    assert tokens[:len(tok.vocab)] == ["".join(b2u[x] for x in b) for b in tok.vocab]
    assert tokens[tok.eot_id] == "<|endoftext|>" and field("tokenizer.ggml.eos_token_id") == tok.eot_id
    assert field("tokenizer.ggml.merges") == to_hf_dict(tok)["model"]["merges"]  # "left right", one space each
    assert field("tokenizer.ggml.eot_token_id") == tok.special_tokens["<|end|>"]
    assert field("tokenizer.ggml.token_type")[tok.eot_id] == gguf.TokenType.CONTROL
    assert "<|assistant|>" in field("tokenizer.chat_template")

    sd = model.state_dict()
    assert torch.equal(tensors["token_embd.weight"], sd["embed_tokens.weight"])
    assert torch.equal(tensors["blk.1.ffn_down.weight"], sd["layers.1.ffn.down_proj.weight"])
    if arch == "gpt2":
        assert torch.equal(tensors["blk.0.attn_qkv.weight"], sd["layers.0.attn.qkv.weight"])  # (out, in): no transpose
        assert torch.equal(tensors["position_embd.weight"], sd["pos_embed.weight"])
        assert "output.weight" in tensors  # llama.cpp's gpt2 wants the head even when tied
    else:
        assert field(f"{arch}.attention.head_count_kv") == c.kv_heads
        assert field(f"{arch}.rope.freq_base") == pytest.approx(c.rope_theta)
        assert ("blk.0.attn_q.bias" in tensors) == c.bias
        k = sd["layers.0.attn.qkv.weight"][c.d_model:c.d_model + c.kv_heads * c.head_dim]
        if arch == "llama":  # adjacent-pair RoPE: rows permuted
            assert torch.equal(tensors["blk.0.attn_k.weight"], rope_to_interleaved(k, c.kv_heads))
        else:  # qwen3 rotates halves as we do; the QK-norm gains are its attn_{q,k}_norm
            assert torch.equal(tensors["blk.0.attn_k.weight"], k)
            assert torch.equal(tensors["blk.1.attn_q_norm.weight"], sd["layers.1.attn.q_norm.weight"])
            assert torch.equal(tensors["blk.1.attn_k_norm.weight"], sd["layers.1.attn.k_norm.weight"])
        assert ("output.weight" in tensors) == (not c.tie_embeddings)


def test_rope_permutation_turns_half_split_into_adjacent_pairs():
    """Rotating adjacent pairs of the permuted vectors (llama.cpp) = permuting our rotated vectors."""
    H, d, T = 2, 8, 5
    x = torch.randn(1, H, T, d)
    cos, sin = rope_tables(d, T, 10000.0)
    ours = apply_rope(x, cos, sin)
    px = rope_to_interleaved(x[0].transpose(0, 1).reshape(T, H * d).T, H).T.reshape(T, H, d)
    x1, x2 = px[..., 0::2], px[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    adjacent = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).reshape(T, H, d)
    expected = rope_to_interleaved(ours[0].transpose(0, 1).reshape(T, H * d).T, H).T.reshape(T, H, d)
    assert torch.allclose(adjacent, expected, atol=1e-6)


def test_gguf_refusals(tmp_path, capsys):
    run = make_run(tmp_path, "run")
    (tmp_path / "taken.gguf").write_text("x")
    assert main(["export", "gguf", "--ckpt", str(run), "--out", str(tmp_path / "taken.gguf")]) == 2
    assert "already exists" in capsys.readouterr().err
    custom = make_run(tmp_path, "custom", pattern=r"\w+|\s+|[^\w\s]+")
    assert main(["export", "gguf", "--ckpt", str(custom), "--out", str(tmp_path / "c.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "tokenizer.pattern" in err and len(err.splitlines()) == 1
    sinus = make_run(tmp_path, "sinus", overrides=("model.pos_encoding=sinusoidal",))
    assert main(["export", "gguf", "--ckpt", str(sinus), "--out", str(tmp_path / "s.gguf")]) == 2
    assert "model.pos_encoding" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf" or p.name.startswith(".")) == ["taken.gguf"]
