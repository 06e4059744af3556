"""Exporting fine-tuned runs: LoRA adapters are merged into the weights (HF and GGUF), a
classifier is refused, and the run's chat template travels with the export."""

import pytest
import torch
from interop_util import TEXTS, make_lora_run, make_run

from scratchlm.cli import main
from scratchlm.finetune.lora import lora_layers
from scratchlm.interop.hf import export_hf
from scratchlm.train.checkpoint import load_for_inference

transformers = pytest.importorskip("transformers")

ALL = ("q", "k", "v", "o", "mlp", "head")
LORA_CASES = {  # (preset, overrides, targets)
    "gpt2-tied-all": ("gpt2-124m", (), ALL),                       # head LoRA on a tied head: untied on merge
    "gpt2-qv": ("gpt2-124m", (), ("q", "v")),
    "llama-gqa-untied-all": ("llama-small", (), ALL),
    "llama-mqa-tied-kv-mlp": ("llama-small", ("model.n_kv_heads=1", "model.tie_embeddings=true"), ("k", "v", "mlp")),
    "qwen3-all": ("llama-small", ("model.qk_norm=true",), ALL),        # QK-norm base: Qwen3 names
}


def hf_logits(path, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_run_exports_merged(tmp_path, case):
    preset, overrides, targets = LORA_CASES[case]
    base = make_run(tmp_path, "base", preset, overrides)
    run = make_lora_run(tmp_path, "lora", base, targets)
    ours, tok, _ = load_for_inference(run, device="cpu")
    assert lora_layers(ours), "the run is loaded with its adapters, unmerged"
    ids = tok.encode(" ".join(TEXTS))[:64]
    with torch.no_grad():
        our_logits = ours(torch.tensor([ids]))[0]
    theirs = hf_logits(export_hf(run, tmp_path / "hf"), ids)
    assert (theirs - our_logits).abs().max().item() <= 1e-4
    base_logits = hf_logits(export_hf(base, tmp_path / "hf_base"), ids)
    assert (base_logits - our_logits).abs().max().item() > 0.1, "the adapters must matter for this test to mean much"


@pytest.mark.parametrize("case", ["gpt2-tied-all", "llama-gqa-untied-all"])
def test_lora_run_gguf_has_the_merged_weights(tmp_path, case):
    pytest.importorskip("gguf")
    from test_interop_gguf import read

    from scratchlm.interop.gguf import export_gguf, gguf_tensors
    from scratchlm.interop.hf import load_for_export
    preset, overrides, targets = LORA_CASES[case]
    base = make_run(tmp_path, "base", preset, overrides)
    run = make_lora_run(tmp_path, "lora", base, targets)
    _, tensors = read(export_gguf(run, tmp_path / "m.gguf"))
    merged, _, _ = load_for_export(run)
    assert not lora_layers(merged)
    expected = gguf_tensors(merged.cfg, merged.state_dict())
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in tensors)
    base_model, _, _ = load_for_inference(base, device="cpu")
    unmerged = gguf_tensors(base_model.cfg, base_model.state_dict())
    changed = [k for k in unmerged if not torch.equal(unmerged[k], tensors[k])]
    assert "blk.0.ffn_down.weight" in changed and "output.weight" in changed  # mlp and head adapters folded in
    assert "token_embd.weight" not in changed  # merging the head's adapter left the (tied) embeddings alone


def test_classifier_export_is_refused_in_one_line(tmp_path, capsys):
    import dataclasses

    from scratchlm.finetune.base import attach_classifier_head
    from scratchlm.train import checkpoint as ckpt
    base, tok, meta = load_for_inference(make_run(tmp_path, "base"), device="cpu")
    model = attach_classifier_head(base, 2)  # a full fine-tune's classifier checkpoint, as finetune classify saves it
    run = tmp_path / "run"
    tok.save(run / "tokenizer")
    cfg = dataclasses.replace(meta["config"], model=model.cfg)
    ckpt.save_checkpoint(run / "checkpoints", 1, model, None, {
        "tokenizer_fingerprint": tok.fingerprint, "config": dataclasses.asdict(cfg),
        "task": {"kind": "classify", "labels": ["ham", "spam"], "max_length": 64}})
    assert load_for_inference(run, device="cpu")[0].lm_head.out_features == 2
    for fmt, out in (("hf", tmp_path / "hf"), ("gguf", tmp_path / "m.gguf")):
        assert main(["export", fmt, "--ckpt", str(run), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "is a classifier" in err and "export supports language models" in err and len(err.splitlines()) == 1
        assert not out.exists()


def test_dpo_run_exports_its_template(tmp_path):
    import json
    run = make_run(tmp_path, "run", state_extra={"task": {"kind": "dpo", "template": "chat", "beta": 0.1}})
    cfg = json.loads((export_hf(run, tmp_path / "hf") / "tokenizer_config.json").read_text())
    assert "<|assistant|>" in cfg["chat_template"]


def test_finetune_sft_from_imported_gpt2_then_export(tmp_path, shared):
    """The book's chapter 7 path: a GPT-2 directory (tiny, random, built by transformers) -> `import hf`
    -> `finetune sft` with LoRA and the alpaca template -> `export hf`: the adapters merged, the template
    shipped as the chat template."""
    import json

    from test_interop_import import hf_tokenizer

    from scratchlm.finetune.templates import get_template
    hf_tok = hf_tokenizer("gpt2")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(hf_tok), n_positions=256, n_embd=32,
                                                                n_layer=2, n_head=4))
    src = tmp_path / "gpt2"
    gpt2.save_pretrained(src)
    hf_tok.save_pretrained(src)
    assert main(["import", "hf", str(src), "--out", str(tmp_path / "runs" / "gpt2")]) == 0
    data = tmp_path / "instr.json"
    data.write_text(json.dumps(json.loads((shared / "instruction-data.json").read_text())[:30]))
    sets = ["finetune.template=alpaca", "finetune.trainable=lora", 'lora.targets=["q","k","v","o","mlp"]',
            "train.lr=1e-2", "train.max_steps=4", "train.batch_size=4", "train.warmup_steps=1", "train.eval_every=4",
            "train.eval_batches=1", "train.log_every=100", "train.sample_tokens=4", "train.precision=fp32"]
    sft = tmp_path / "runs" / "sft"
    assert main(["finetune", "sft", "--ckpt", str(tmp_path / "runs" / "gpt2"), "--data", str(data), "--out", str(sft),
                 *[x for s in sets for x in ("--set", s)]]) == 0
    ours, tok, meta = load_for_inference(sft, device="cpu")
    assert meta["state"]["task"]["template"] == "alpaca" and lora_layers(ours)

    out = export_hf(sft, tmp_path / "hf")
    ids = tok.encode(" ".join(TEXTS))[:64]
    with torch.no_grad():
        our_logits = ours(torch.tensor([ids]))[0]
        before = gpt2.eval()(torch.tensor([ids])).logits
    after = hf_logits(out, ids)
    assert (after - our_logits).abs().max().item() <= 1e-4
    assert (after - before).abs().max().item() > 1e-2  # the fine-tune moved the model, and export kept that

    exported_tok = transformers.AutoTokenizer.from_pretrained(out)
    alpaca = get_template("alpaca")
    for msgs in ([{"role": "user", "content": "Name a colour."}],
                 [{"role": "user", "content": "Translate to French.", "input": "Good morning"}]):
        text = exported_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert text == alpaca.prompt(msgs)
        assert exported_tok.encode(text, add_special_tokens=False) == tok.encode(text, allowed_special="all")


@pytest.mark.parametrize("case", ["gpt2-tied-all", "gpt2-qv", "llama-gqa-untied-all", "qwen3-all"])
def test_peft_adapter_on_the_exported_base_gives_our_logits(tmp_path, case):
    peft = pytest.importorskip("peft")
    import json
    preset, overrides, targets = LORA_CASES[case]
    base = make_run(tmp_path, "base", preset, overrides)
    run = make_lora_run(tmp_path, "lora", base, targets)
    base_hf = export_hf(base, tmp_path / "hf_base")
    adapter = tmp_path / "adapter"
    assert main(["export", "hf", "--ckpt", str(run), "--out", str(adapter), "--peft-adapter"]) == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    if preset == "gpt2-124m":  # GPT-2's two c_proj are told apart; the fused c_attn gets one adapter
        modules = config["target_modules"]
        assert "attn.c_attn" in modules and ("mlp.c_proj" in modules) == ("mlp" in targets)
    ours, tok, _ = load_for_inference(run, device="cpu")
    ids = tok.encode(" ".join(TEXTS))[:64]
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits
        our_logits = ours(torch.tensor([ids]))[0]
    assert (theirs - our_logits).abs().max().item() <= 1e-4
    with model.disable_adapter(), torch.no_grad():
        assert (model(torch.tensor([ids])).logits - our_logits).abs().max().item() > 0.1  # the adapters matter
    assert transformers.AutoTokenizer.from_pretrained(adapter).chat_template  # the run's template travels along
    assert main(["export", "gguf", "--ckpt", str(run), "--out", str(tmp_path / "m.gguf"), "--peft-adapter"]) == 2
    assert main(["export", "hf", "--ckpt", str(base), "--out", str(tmp_path / "x"), "--peft-adapter"]) == 2
