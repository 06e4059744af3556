"""Import from Hugging Face: GPT-2, Llama and Qwen3 directories (built here by transformers, random weights)
become scratchlm runs with the same logits and the same token ids, and export back unchanged."""

import json
import shutil

import pytest
import torch
from interop_util import SHARED, SPECIAL_TEXT, TEXTS
from safetensors.torch import load_file

from scratchlm.cli import main
from scratchlm.interop.hf import export_hf, import_hf
from scratchlm.train.checkpoint import load_for_inference

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def hf_tokenizer(style: str):
    """A byte-level BPE trained by `tokenizers`: GPT-2 style (ByteLevel regex) or Llama-3 style
    (Split regex, then ByteLevel). Its byte tokens are in GPT-2's character order, not byte order."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    t = tokenizers.Tokenizer(models.BPE())
    if style == "gpt2":
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        t.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=380, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    t.train_from_iterator(TEXTS * 30, trainer)
    eos = "<|endoftext|>" if style == "gpt2" else "<|end_of_text|>"  # Llama 3 names it differently
    t.add_special_tokens([eos, "<|begin_of_text|>", "<|user|>", "<|assistant|>", "<|end|>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, eos_token=eos)


def hf_model(arch: str, vocab: int, tied: bool, kv_heads: int = 2):
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      tie_word_embeddings=tied)
        model = transformers.GPT2LMHeadModel(cfg)
    elif arch == "qwen3":  # Llama + a q/k RMSNorm per head: our model.qk_norm
        cfg = transformers.Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=8,
                                       max_position_embeddings=64, rms_norm_eps=1e-5,
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                       tie_word_embeddings=tied)
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def save_hf(tmp_path, arch: str, tied: bool, style: str, kv_heads: int = 2, **save):
    tok = hf_tokenizer(style)
    model = hf_model(arch, len(tok), tied, kv_heads)
    d = tmp_path / f"hf_{arch}"
    model.save_pretrained(d, **save)
    tok.save_pretrained(d)
    return d, model, tok


CASES = {"gpt2-tied": ("gpt2", True, "gpt2", 4), "gpt2-untied": ("gpt2", False, "gpt2", 4),
         "llama-gqa-untied": ("llama", False, "llama3", 2), "llama-mqa-tied": ("llama", True, "llama3", 1),
         "qwen3-gqa-untied": ("qwen3", False, "llama3", 2), "qwen3-mqa-tied": ("qwen3", True, "llama3", 1)}


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_hf_and_round_trips(tmp_path, case):
    arch, tied, style, kv = CASES[case]
    src, hf, hf_tok = save_hf(tmp_path, arch, tied, style, kv)
    run = import_hf(src, tmp_path / "run")
    ours, tok, _ = load_for_inference(run, device="cpu")

    for text in TEXTS + [SPECIAL_TEXT]:  # the same ids on prose, code, emoji/CJK and special tokens
        assert tok.encode(text, allowed_special="all") == hf_tok.encode(text, add_special_tokens=False), text
    assert tok.custom_vocab and tok.vocab[0] == b"!"  # GPT-2's byte order, held as is
    assert tok.eot_id == hf_tok.eos_token_id
    ids = torch.tensor([tok.encode(" ".join(TEXTS))[:64]])
    with torch.no_grad():
        diff = (ours(ids)[0] - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4
    assert ours.cfg.qk_norm == (arch == "qwen3")

    out = export_hf(run, tmp_path / "back")  # import -> export gives back the very same tensors
    original, exported = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    back_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert back_tok.eos_token == hf_tok.eos_token
    for text in TEXTS:
        assert back_tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)


def test_imported_tokenizer_survives_save_and_load(tmp_path):
    src, _, hf_tok = save_hf(tmp_path, "gpt2", True, "gpt2")
    run = import_hf(src, tmp_path / "run")
    from scratchlm.tokenizer import Tokenizer
    tok = Tokenizer.load(run / "tokenizer")
    assert tok.to_dict()["version"] == 2 and tok.vocab_size == len(hf_tok)
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.encode_python(text) == ids  # the readable encoder agrees with the fast one
        assert tok.decode(ids) == text


def test_pytorch_bin_and_shards(tmp_path):
    src, hf, _ = save_hf(tmp_path, "llama", False, "llama3", max_shard_size="20KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    run = import_hf(src, tmp_path / "run")
    ours, _, _ = load_for_inference(run, device="cpu")
    ids = torch.tensor([[5, 9, 200, 17, 3]])
    with torch.no_grad():
        assert (ours(ids)[0] - hf(ids).logits).abs().max().item() <= 1e-4

    bin_dir = tmp_path / "bin"  # the older format: a pickled state dict, read with weights_only=True
    bin_dir.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, bin_dir / f)
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    run2 = import_hf(bin_dir, tmp_path / "run2")
    ours2, _, _ = load_for_inference(run2, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ours2.state_dict().values()))

    (src / shards[-1]).unlink()
    with pytest.raises(Exception, match=f"missing shard {shards[-1]}"):
        import_hf(src, tmp_path / "run3")
    assert not (tmp_path / "run3").exists()


def test_imported_run_generates_evaluates_and_continues_pretraining(tmp_path, capsys):
    src, _, _ = save_hf(tmp_path, "gpt2", True, "gpt2")
    run = tmp_path / "runs" / "gpt2"
    assert main(["import", "hf", str(src), "--out", str(run)]) == 0
    assert main(["generate", "--ckpt", str(run), "--prompt", "The quick", "--max-new-tokens", "5", "--greedy"]) == 0
    text = tmp_path / "text.txt"
    text.write_text(" ".join(TEXTS) * 10)
    assert main(["eval", "perplexity", "--ckpt", str(run), "--data", str(text)]) == 0
    assert "bits_per_byte" in capsys.readouterr().out

    # Continued pretraining: data tokenized with the imported tokenizer, then `pretrain --resume`.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((SHARED / "tinyshakespeare.txt").read_text()[:40_000])
    data = tmp_path / "data"
    assert main(["prepare", "--input", str(corpus), "--out", str(data), "--tokenizer", str(run / "tokenizer")]) == 0
    before = load_file(str(run / "checkpoints" / "step_000000" / "model.safetensors"))
    assert main(["pretrain", "--config", str(run / "config.toml"), "--data", str(data), "--resume",
                 "--set", "train.max_steps=3", "--set", "train.batch_size=2", "--set", "train.eval_every=0",
                 "--set", "train.precision=fp32",
                 "--set", "train.warmup_steps=1", "--set", "train.checkpoint_every=3"]) == 0
    assert "resumed from" in capsys.readouterr().out
    latest = sorted((run / "checkpoints").iterdir())[-1]
    assert latest.name == "step_000003"
    after = load_file(str(latest / "model.safetensors"))
    assert sorted(after) == sorted(before)
    assert not torch.equal(after["embed_tokens.weight"], before["embed_tokens.weight"])  # it trained


def test_import_bad_input_is_one_line(tmp_path, capsys):
    def refuse(src, needle):
        out = tmp_path / "out"
        assert main(["import", "hf", str(src), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
        assert not out.exists()

    refuse(tmp_path, "no config.json")
    src, _, _ = save_hf(tmp_path, "gpt2", True, "gpt2")
    capsys.readouterr()  # transformers' progress bars
    bert = tmp_path / "bert"
    shutil.copytree(src, bert)
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    refuse(bert, "model_type 'bert' is not gpt2, llama or qwen3")

    qwen, _, _ = save_hf(tmp_path, "qwen3", False, "llama3")
    capsys.readouterr()
    config = json.loads((qwen / "config.json").read_text())
    for bad, needle in (({"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0,
                          "layer_types": ["sliding_attention"] * 2}, "sliding-window attention"),
                        ({"head_dim": 16}, "head_dim=16 is not hidden_size/num_attention_heads")):
        (qwen / "config.json").write_text(json.dumps({**config, **bad}))
        refuse(qwen, needle)

    wordpiece = tmp_path / "wp"
    shutil.copytree(src, wordpiece)
    t = json.loads((src / "tokenizer.json").read_text())
    t["model"]["type"] = "WordPiece"
    (wordpiece / "tokenizer.json").write_text(json.dumps(t))
    refuse(wordpiece, "not byte-level BPE")
    t = json.loads((src / "tokenizer.json").read_text())
    t["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁"}
    (wordpiece / "tokenizer.json").write_text(json.dumps(t))
    refuse(wordpiece, "pre-tokenizer 'Metaspace'")
    (wordpiece / "tokenizer.json").unlink()
    refuse(wordpiece, "no tokenizer.json")

    noweights = tmp_path / "noweights"
    shutil.copytree(src, noweights)
    (noweights / "model.safetensors").unlink()
    refuse(noweights, "no model.safetensors or pytorch_model.bin")

    fewer = tmp_path / "fewer"  # config.json and weights disagree
    shutil.copytree(src, fewer)
    config = json.loads((src / "config.json").read_text())
    (fewer / "config.json").write_text(json.dumps({**config, "n_layer": 1}))
    refuse(fewer, "tensors its config.json does not describe (h.1.")
    (fewer / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    refuse(fewer, "no tensor 'h.2.ln_1.weight'")

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert main(["import", "hf", str(src), "--out", str(busy)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["import", "hf", str(src), "--out", str(busy / "x" / "run")]) == 2  # under a file: unwritable
    assert "cannot write" in capsys.readouterr().err
    assert sorted(p.name for p in busy.iterdir()) == ["x"]


def test_gpt2_hub_layout_special_token_also_in_vocab(tmp_path):
    """GPT-2's own tokenizer.json lists <|endoftext|> in the BPE vocab *and* as an added token, and
    its weights have no `transformer.` prefix; both import."""
    src, hf, hf_tok = save_hf(tmp_path, "gpt2", True, "gpt2")
    t = json.loads((src / "tokenizer.json").read_text())
    t["model"]["vocab"]["<|endoftext|>"] = hf_tok.eos_token_id
    (src / "tokenizer.json").write_text(json.dumps(t, ensure_ascii=False))
    from safetensors.torch import save_file
    weights = load_file(str(src / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in weights.items()}, str(src / "model.safetensors"))
    run = import_hf(src, tmp_path / "run")
    ours, tok, _ = load_for_inference(run, device="cpu")
    assert tok.eot_id == hf_tok.eos_token_id and tok.vocab_size == len(hf_tok)
    ids = torch.tensor([tok.encode(TEXTS[1])[:40]])
    with torch.no_grad():
        assert (ours(ids)[0] - hf(ids).logits).abs().max().item() <= 1e-4
