"""Export to Hugging Face: transformers loads the directory and computes our numbers, token for token."""

import json

import pytest
import torch
from interop_util import SPECIAL_TEXT, TEXTS, make_run, tokenizer
from safetensors.torch import load_file

from scratchlm.cli import main
from scratchlm.errors import UserError
from scratchlm.finetune.templates import get_template
from scratchlm.generate import SamplingConfig, generate_ids
from scratchlm.interop.hf import export_hf
from scratchlm.train.checkpoint import load_for_inference

transformers = pytest.importorskip("transformers")  # a test dependency: pyproject's `test` extra has it

VARIANTS = {  # every preset family, and the variants HF's two layouts must express
    "gpt2-124m": ("gpt2-124m", ()),
    "quickstart": ("quickstart", ()),
    "tiny": ("tiny", ()),
    "sheet": ("sheet", ()),
    "gpt2-untied-nobias": ("gpt2-124m", ("model.tie_embeddings=false", "model.bias=false")),
    "gpt2-padded-vocab": ("gpt2-124m", ("model.vocab_size=448",)),  # more rows than tokens, as gpt2-124m has
    "llama-small-gqa-untied": ("llama-small", ()),
    "llama-mqa-tied": ("llama-small", ("model.n_kv_heads=1", "model.tie_embeddings=true")),
    "llama-bias-theta": ("llama-small", ("model.bias=true", "model.n_kv_heads=4", "model.rope_theta=500000")),
    "qwen3-gqa-untied": ("llama-small", ("model.qk_norm=true",)),  # QK-norm: Qwen3
    "qwen3-mqa-tied": ("llama-small", ("model.qk_norm=true", "model.n_kv_heads=1", "model.tie_embeddings=true")),
}


def expected_architecture(cfg) -> str:
    return ("GPT2LMHeadModel" if cfg.pos_encoding == "learned" else
            "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM")


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    cfg = transformers.GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    mask = torch.ones(1, len(ids), dtype=torch.long)
    out = model.generate(torch.tensor([ids]), generation_config=cfg, attention_mask=mask)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_logits_and_greedy_match_transformers(tmp_path, variant):
    preset, overrides = VARIANTS[variant]
    run = make_run(tmp_path, "run", preset, overrides)
    out = export_hf(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours, tok, _ = load_for_inference(run, device="cpu")
    assert type(hf).__name__ == expected_architecture(ours.cfg)
    if ours.cfg.qk_norm:  # our per-head q/k gains are Qwen3's q_norm/k_norm, tensor for tensor
        assert torch.equal(hf.model.layers[1].self_attn.k_norm.weight, ours.layers[1].attn.k_norm.weight)
        assert hf.config.rms_norm_eps == ours.layers[0].attn.q_norm.eps
    ids = tok.encode(" ".join(TEXTS))[:64]
    with torch.no_grad():
        theirs_logits = hf(torch.tensor([ids])).logits
        our_logits, _ = ours(torch.tensor([ids]))
    assert theirs_logits.shape == our_logits.shape
    assert (theirs_logits - our_logits).abs().max().item() <= 1e-4
    assert our_logits.std() > 0.5  # the comparison means something: the logits are far from flat

    prompt = ids[:12]
    mine = generate_ids(ours, [prompt], SamplingConfig(max_new_tokens=20, temperature=0))[0]
    assert hf_greedy(hf, prompt, 20) == mine and len(mine) == 20


def test_exported_tokenizer_gives_our_ids(tmp_path):
    run = make_run(tmp_path, "run")
    out = export_hf(run, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    tok = tokenizer()
    for text in TEXTS + [SPECIAL_TEXT]:
        ids = tok.encode(text, allowed_special="all")
        assert hf_tok.encode(text, add_special_tokens=False) == ids, text
        assert hf_tok.decode(ids) == tok.decode(ids)
    assert hf_tok.eos_token_id == tok.eot_id and hf_tok.pad_token_id == tok.special_tokens["<|pad|>"]
    assert hf_tok.convert_tokens_to_ids("<|assistant|>") == tok.special_tokens["<|assistant|>"]


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?\n"}],
]


def test_chat_template_renders_like_ours(tmp_path):
    # A fine-tuned checkpoint records its template; export picks it up without being told.
    run = make_run(tmp_path, "run", state_extra={"task": {"kind": "sft", "template": "chat"}})
    out = export_hf(run, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    chat = get_template("chat")
    for msgs in CONVERSATIONS:
        assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == chat.render(msgs, True)
        full = msgs + [{"role": "assistant", "content": "Sure."}]
        assert hf_tok.apply_chat_template(full, tokenize=False) == chat.render(full)
        ids = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert list(ids) == tokenizer().encode(chat.render(msgs, True), allowed_special="all")
    gen = json.loads((out / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == sorted([tokenizer().eot_id, tokenizer().special_tokens["<|end|>"]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert set(hf.generation_config.eos_token_id) == set(gen["eos_token_id"])

    out2 = export_hf(run, tmp_path / "hf_alpaca", template="alpaca")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out2)
    alpaca = get_template("alpaca")
    for msgs in ([{"role": "user", "content": "Name a colour."}],
                 [{"role": "user", "content": "Translate.", "input": "Bonjour"}]):
        assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == alpaca.render(msgs, True)
        full = msgs + [{"role": "assistant", "content": "Red."}]
        assert hf_tok.apply_chat_template(full, tokenize=False) == alpaca.render(full)


def test_base_model_exports_without_chat_template(tmp_path):
    out = export_hf(make_run(tmp_path, "run"), tmp_path / "hf")
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    assert not (out / "chat_template.jinja").exists()


def test_tied_export_has_no_duplicate_head_and_conv1d_is_transposed(tmp_path):
    run = make_run(tmp_path, "run", "gpt2-124m")
    out = export_hf(run, tmp_path / "hf")
    tensors = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    ours, _, _ = load_for_inference(run, device="cpu")
    assert torch.equal(tensors["transformer.h.0.mlp.c_fc.weight"], ours.layers[0].ffn.up_proj.weight.T)
    assert json.loads((out / "config.json").read_text())["activation_function"] == "gelu_new"


# --- refusals: one line, nothing written -------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    (("model.pos_encoding=sinusoidal",), "model.pos_encoding='sinusoidal'"),
    (("model.norm=rmsnorm",), "model.norm='rmsnorm'"),
    (("model.n_kv_heads=2",), "model.n_kv_heads=2"),
    (("model.pos_encoding=rope",), "model.norm='layernorm'"),
    (("model.qk_norm=true",), "model.qk_norm=true with model.pos_encoding='learned'"),  # Qwen3 needs Llama's layout
    (("model.pos_encoding=rope", "model.norm=rmsnorm", "model.ffn=swiglu", "model.qk_norm=true", "model.bias=true"),
     "model.qk_norm=true with model.bias=true"),  # Qwen3's MLP has no biases
])
def test_export_refuses_what_hf_cannot_express(tmp_path, capsys, overrides, field):
    run = make_run(tmp_path, "run", "tiny", overrides)
    assert main(["export", "hf", "--ckpt", str(run), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert field in err and len(err.splitlines()) == 1
    assert not (tmp_path / "hf").exists()


def test_export_refuses_non_empty_or_unwritable_out(tmp_path, capsys):
    run = make_run(tmp_path, "run")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert main(["export", "hf", "--ckpt", str(run), "--out", str(busy)]) == 2
    assert "not empty" in capsys.readouterr().err and sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["export", "hf", "--ckpt", str(run), "--out", str(blocker / "hf")]) == 2
    assert "cannot write" in capsys.readouterr().err
    from scratchlm.interop.hf_tokenizer import write_tokenizer_files
    from scratchlm.tokenizer import Tokenizer
    with pytest.raises(UserError, match="needs special token"):  # a tokenizer without the chat roles
        write_tokenizer_files(Tokenizer([], special_tokens=["<|endoftext|>"]), tmp_path / "t", get_template("chat"), 64)
    assert not (tmp_path / "t").exists()
    # an empty existing directory is fine
    (tmp_path / "empty").mkdir()
    assert main(["export", "hf", "--ckpt", str(run), "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging debris


@pytest.mark.parametrize("preset", ["gpt2-124m", "llama-small"])
def test_lm_eval_hf_on_export_equals_scratchlm_eval(tmp_path, shared, preset):
    """lm-evaluation-harness `--model hf` on the exported directory, `scratchlm eval` on the run:
    the same items, the same acc and acc_norm."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    n = 30
    arc = shared / "arc" / "arc_easy_validation.jsonl"
    (tmp_path / "arc.yaml").write_text(f"""task: scratch_arc_easy_hf
dataset_path: json
dataset_kwargs:
  data_files:
    test: {arc}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices.text}}}}"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    run = make_run(tmp_path, "run", preset, ("model.context_length=256",))
    out = export_hf(run, tmp_path / "hf")
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},dtype=float32,device=cpu,batch_size=8",
                                  tasks=["scratch_arc_easy_hf"], task_manager=TaskManager(include_path=str(tmp_path)),
                                  limit=n, num_fewshot=0)["results"]["scratch_arc_easy_hf"]
    assert main(["eval", "arc", "--ckpt", str(run), "--data", str(arc), "--limit", str(n), "--device", "cpu"]) == 0
    ours = json.loads((run / "eval_arc.json").read_text())
    assert ours["n"] == n
    assert ours["acc"] == pytest.approx(res["acc,none"], abs=1e-9)
    assert ours["acc_norm"] == pytest.approx(res["acc_norm,none"], abs=1e-9)
    assert 0 < ours["acc"] < 1 or 0 < ours["acc_norm"] < 1  # not a degenerate all-same answer
