"""llama.cpp runs our GGUF files: same token ids, same logits, same greedy continuation.

Not part of `make test` (llama-cpp-python compiles llama.cpp when installed, minutes on a small
machine); run it with `make check-llamacpp`, which installs the package first."""

import pytest
import torch
from interop_util import SPECIAL_TEXT, TEXTS, make_run

from scratchlm.generate import SamplingConfig, generate_ids
from scratchlm.interop.gguf import export_gguf
from scratchlm.interop.hf import import_hf
from scratchlm.train.checkpoint import load_for_inference

llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python (make check-llamacpp does)")

N_NEW = 20


def check(run, path):
    ours, tok, _ = load_for_inference(run, device="cpu")
    f32 = llama_cpp.GGML_TYPE_F32  # llama.cpp keeps its KV cache in fp16 unless told otherwise
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=ours.cfg.context_length, logits_all=True, verbose=False,
                          n_threads=1, type_k=f32, type_v=f32, flash_attn=False)  # its FA path rounds to fp16
    try:
        for text in TEXTS + [SPECIAL_TEXT]:  # prose, code, emoji/CJK, special tokens
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, allowed_special="all")
        prompt = tok.encode(TEXTS[0])[:12]
        llm.reset()
        llm.eval(prompt)
        theirs_logits = torch.tensor(llm.scores[:len(prompt)])
        with torch.no_grad():
            our_logits = ours(torch.tensor([prompt]))[0][0]
        # ggml's CPU GELU reads an fp16 lookup table (GGML_GELU_FP16), so GPT-2's logits agree to ~2e-3;
        # the Llama path (SiLU) is fp32 throughout.
        tolerance = 5e-3 if ours.cfg.ffn == "gelu" else 1e-4
        assert (theirs_logits - our_logits).abs().max().item() <= tolerance
        mine = generate_ids(ours, [prompt], SamplingConfig(max_new_tokens=N_NEW, temperature=0))[0]
        theirs = []
        for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            theirs.append(t)
            if len(theirs) == N_NEW:
                break
        assert theirs == mine
    finally:
        llm.close()


@pytest.mark.parametrize("preset, overrides, pattern", [
    ("gpt2-124m", (), "gpt2"), ("gpt2-124m", ("model.vocab_size=448",), "gpt4"), ("llama-small", (), "gpt4"),
    ("llama-small", ("model.tie_embeddings=true", "model.n_kv_heads=1", "model.bias=true"), "gpt2"),
    ("llama-small", ("model.qk_norm=true",), "gpt4")])  # llama.cpp's qwen3
def test_llamacpp_runs_our_gguf(tmp_path, preset, overrides, pattern):
    run = make_run(tmp_path, "run", preset, overrides, pattern=pattern)
    check(run, export_gguf(run, tmp_path / "m.gguf"))


@pytest.mark.parametrize("preset", ["gpt2-124m", "llama-small"])
def test_llamacpp_runs_a_char_level_gguf(tmp_path, preset):
    """No merges in the tokenizer: the GGUF carries one that can never fire (llama.cpp needs the list)."""
    run = make_run(tmp_path, "run", preset, kind="char")
    check(run, export_gguf(run, tmp_path / "m.gguf"))


@pytest.mark.parametrize("arch, style", [("gpt2", "gpt2"), ("llama", "llama3")])
def test_llamacpp_runs_an_imported_model(tmp_path, arch, style):
    from test_interop_import import save_hf
    src, _, _ = save_hf(tmp_path, arch, False, style)
    run = import_hf(src, tmp_path / "run")
    check(run, export_gguf(run, tmp_path / "m.gguf"))
