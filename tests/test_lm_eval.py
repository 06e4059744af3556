"""Our multiple-choice numbers equal lm-evaluation-harness's, item by item.

The two sides share nothing but the model weights and the tokenizer:
- prompts: lm-eval builds them from the raw files with its own task configs (the real
  hellaswag / arc_easy / mmlu_astronomy YAML and hellaswag utils, `include`d and pointed at local
  files; tests/lm_eval_tasks/raw_formats.py only maps the files' layouts onto the HF ones);
- requests: lm-eval's TemplateLM splits context and continuation tokens;
- scoring: a plain one-request-at-a-time forward pass here, our batched scorer on our side.
Per-item log-likelihoods are compared, not only mean accuracy.
"""

import shutil
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval.api.model import TemplateLM

from scratchlm.config import load_config
from scratchlm.eval.multiple_choice import score_items
from scratchlm.eval.tasks import load_arc, load_hellaswag, load_mmlu
from scratchlm.train.checkpoint import load_for_inference
from scratchlm.train.trainer import pretrain

N = 30
LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dataset):
    out = tmp_path_factory.mktemp("lmeval")
    cfg = load_config("tiny", ["model.context_length=128", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                               "model.d_ff=64", "train.batch_size=8", "train.max_steps=20", "train.eval_every=0",
                               "train.precision=fp32", f"run.out_dir={out}", "run.name=m"])
    pretrain(cfg, tiny_dataset, log=lambda *_: None, quiet=True)
    return out / "m"


class NaiveLM(TemplateLM):
    """lm-eval's request handling on our model, scored with one plain forward pass per request."""

    def __init__(self, model, tok):
        super().__init__()
        self.model, self.tok = model, tok

    @property
    def eot_token_id(self):
        return self.tok.eot_id

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.tok.encode_ordinary(string)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        T = self.model.cfg.context_length
        out = []
        for _, ctx, cont in requests:
            full = (ctx + cont)[-(T + 1):]
            logits = self.model(torch.tensor([full[:-1]]))[0][0]
            logp = torch.log_softmax(logits.double(), dim=-1)
            rows = range(len(full) - 1 - len(cont), len(full) - 1)
            out.append((sum(logp[r, t].item() for r, t in zip(rows, cont)),
                        all(logp[r].argmax().item() == t for r, t in zip(rows, cont))))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError


def write_tasks(folder: Path, shared: Path) -> None:
    shutil.copy(Path(__file__).parent / "lm_eval_tasks" / "raw_formats.py", folder)
    (folder / "raw_mmlu.yaml").write_text(f"""include: {LM_EVAL_TASKS}/mmlu/default/mmlu_astronomy.yaml
task: raw_mmlu_astronomy
tag: []
dataset_path: csv
dataset_name: null
dataset_kwargs:
  data_files:
    test: {shared}/mmlu/test/astronomy_test.csv
    dev: {shared}/mmlu/dev/astronomy_dev.csv
process_docs: !function raw_formats.mmlu_csv
num_fewshot: 5
""")
    (folder / "raw_hellaswag.yaml").write_text(f"""include: {LM_EVAL_TASKS}/hellaswag/hellaswag.yaml
task: raw_hellaswag
tag: []
dataset_path: text
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {shared}/hellaswag_val_part1.txt
training_split: null
process_docs: !function raw_formats.hellaswag_text
""")
    (folder / "raw_arc.yaml").write_text(f"""include: {LM_EVAL_TASKS}/arc/arc_easy.yaml
task: raw_arc_easy
tag: []
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {shared}/arc/arc_easy_validation.jsonl
training_split: null
test_split: null
""")


def test_mmlu_5shot_hellaswag_arc_match_lm_eval_item_by_item(tmp_path, shared, run_dir):
    from lm_eval.tasks import TaskManager
    write_tasks(tmp_path, shared)
    model, tok, _ = load_for_inference(run_dir, device="cpu")
    res = lm_eval.simple_evaluate(model=NaiveLM(model, tok), tasks=["raw_mmlu_astronomy", "raw_hellaswag", "raw_arc_easy"],
                                  task_manager=TaskManager(include_path=str(tmp_path)), limit=N, log_samples=True)
    ours = {
        "raw_mmlu_astronomy": load_mmlu(shared / "mmlu" / "test" / "astronomy_test.csv", shots=5)[:N],
        "raw_hellaswag": load_hellaswag(shared / "hellaswag_val_part1.txt")[:N],
        "raw_arc_easy": load_arc(shared / "arc" / "arc_easy_validation.jsonl")[:N],
    }
    assert res["configs"]["raw_mmlu_astronomy"]["num_fewshot"] == 5
    for task, items in ours.items():
        mine, details = score_items(model, tok, items)
        samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
        assert len(samples) == len(items) == N, task
        for item, det, sample in zip(items, details, samples):
            contexts = {a[0] for a in sample["arguments"]}
            assert contexts == {item.context}, (task, sample["doc_id"])          # same prompt, character for character
            assert [a[1] for a in sample["arguments"]] == [" " + c for c in item.choices], task
            theirs = [r[0] for r in sample["filtered_resps"]]
            assert det["loglikelihoods"] == pytest.approx(theirs, abs=2e-4), (task, sample["doc_id"])
            assert det["gold"] == int(sample["target"]), task
        theirs = res["results"][task]
        assert mine.acc == pytest.approx(theirs["acc,none"], abs=1e-9), task
        if "acc_norm,none" in theirs:
            assert mine.acc_norm == pytest.approx(theirs["acc_norm,none"], abs=1e-9), task


def test_every_hellaswag_prompt_matches_lm_evals_preprocessing(shared):
    """All 5,021 items, prompts only: our text loader vs lm-eval's hellaswag process_docs."""
    import datasets
    import importlib.util
    spec = importlib.util.spec_from_file_location("raw_formats", Path(__file__).parent / "lm_eval_tasks" / "raw_formats.py")
    raw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(raw)
    lines = (shared / "hellaswag_val_part1.txt").read_text(encoding="utf-8").split("\n")[:-1]
    docs = raw.hellaswag_text(datasets.Dataset.from_dict({"text": lines}))
    items = load_hellaswag(shared / "hellaswag_val_part1.txt")
    assert len(docs) == len(items) == 5021
    assert [d["query"] for d in docs] == [it.context for it in items]
    assert [d["choices"] for d in docs] == [it.choices for it in items]
    # The two reconstructions are independent: ours reads ctx_b off letter case, raw_formats off the
    # item's source. They cut 5 ActivityNet items differently (a tail that starts with a digit or a
    # quote, e.g. "... lip. 5 the guy"), where str.capitalize changes nothing, so every prompt agrees.
    from scratchlm.eval.tasks import split_hellaswag_context
    spec = importlib.util.spec_from_file_location("hs_utils", LM_EVAL_TASKS / "hellaswag" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    ours = [split_hellaswag_context(line)[1:] for line in lines[::6]]
    theirs = [(d["ctx_a"], d["ctx_b"]) for d in docs]
    assert sum(a != b for a, b in zip(ours, theirs)) == 5
    assert sum(d["ctx_b"] != "" for d in docs) == 1622  # every ActivityNet item, no WikiHow item
    # lm-eval's prompt is not the text form's line: capitalising ctx_b changes 1,617 of 5,021 contexts
    # (its whitespace clean-up one more: the README's 1,618 against the raw lines)
    assert sum(d["query"] != utils.preprocess(line) for d, line in zip(docs, lines[::6])) == 1617
    assert [int(d["gold"]) for d in docs] == [it.gold for it in items]


def test_rolling_loglikelihood_and_generate_until(run_dir):
    from lm_eval.api.instance import Instance

    from scratchlm.eval.lm_eval_adapter import ScratchLM
    lm = ScratchLM(ckpt=str(run_dir), device="cpu")
    short = "To be, or not to be, that is the question. " * 4
    assert len(lm.tok.encode_ordinary(short)) < 128  # one window: rolling == P(text | <|endoftext|>)
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (short,), 0)])
    (direct, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("", short), 0)])
    assert rolling < 0 and rolling == pytest.approx(direct, abs=1e-3)
    long = short * 10  # several windows: every token scored once, so it grows ~linearly
    (rolling_long,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long,), 0)])
    assert rolling_long < rolling * 5
    (out,) = lm.generate_until([Instance("generate_until", {}, ("ROMEO:", {"until": ["\n"], "max_gen_toks": 20}), 0)])
    assert "\n" not in out


def test_adapter_agrees_with_the_naive_scorer(run_dir):
    """The registered adapter (TemplateLM + our batched scorer) == the plain forward pass above."""
    from lm_eval.api.instance import Instance

    from scratchlm.eval.lm_eval_adapter import ScratchLM
    lm = ScratchLM(ckpt=str(run_dir), device="cpu", batch_size=3)
    naive = NaiveLM(lm.model, lm.tok)
    reqs = [Instance("loglikelihood", {}, (f"ROMEO: speak {i} times, ", f"and then {'more ' * i}"), i) for i in range(7)]
    assert [x[0] for x in lm.loglikelihood(reqs)] == pytest.approx([x[0] for x in naive.loglikelihood(reqs)], abs=2e-4)
