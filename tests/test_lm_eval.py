"""Our multiple-choice numbers equal lm-evaluation-harness's, on the same model and items."""

import json

import pytest

from scratchlm.config import load_config
from scratchlm.eval.multiple_choice import score_items
from scratchlm.eval.tasks import load_arc, load_hellaswag, load_mmlu
from scratchlm.train.checkpoint import load_for_inference
from scratchlm.train.trainer import pretrain

N = 40


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dataset):
    out = tmp_path_factory.mktemp("lmeval")
    cfg = load_config("tiny", ["model.context_length=128", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                               "model.d_ff=64", "train.batch_size=8", "train.max_steps=20", "train.eval_every=0",
                               "train.precision=fp32", f"run.out_dir={out}", "run.name=m"])
    pretrain(cfg, tiny_dataset, log=lambda *_: None, quiet=True)
    return out / "m"


def write_tasks(folder, shared):
    mmlu_csv = shared / "mmlu" / "test" / "astronomy_test.csv"
    hs_items = load_hellaswag(shared / "hellaswag_val_part1.txt")[:N]
    hs_file = folder / "hs.jsonl"
    hs_file.write_text("".join(json.dumps({"query": it.context, "choices": it.choices, "gold": it.gold}) + "\n"
                               for it in hs_items))
    arc_file = shared / "arc" / "arc_easy_validation.jsonl"
    (folder / "mmlu.yaml").write_text(f"""task: scratch_mmlu_astronomy
dataset_path: csv
dataset_kwargs:
  data_files:
    test: {mmlu_csv}
test_split: test
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about astronomy.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choice0}}}}\\nB. {{{{choice1}}}}\\nC. {{{{choice2}}}}\\nD. {{{{choice3}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (folder / "hs.yaml").write_text(f"""task: scratch_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    test: {hs_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (folder / "arc.yaml").write_text(f"""task: scratch_arc_easy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {arc_file}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices.text}}}}"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")


def test_mmlu_hellaswag_arc_match_lm_eval(tmp_path, shared, run_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from scratchlm.eval.lm_eval_adapter import ScratchLM
    write_tasks(tmp_path, shared)
    lm = ScratchLM(ckpt=str(run_dir), device="cpu")
    res = lm_eval.simple_evaluate(model=lm, tasks=["scratch_mmlu_astronomy", "scratch_hellaswag", "scratch_arc_easy"],
                                  task_manager=TaskManager(include_path=str(tmp_path)), limit=N, num_fewshot=0)
    model, tok, _ = load_for_inference(run_dir, device="cpu")
    ours = {
        "scratch_mmlu_astronomy": load_mmlu(shared / "mmlu" / "test" / "astronomy_test.csv")[:N],
        "scratch_hellaswag": load_hellaswag(shared / "hellaswag_val_part1.txt")[:N],
        "scratch_arc_easy": load_arc(shared / "arc" / "arc_easy_validation.jsonl")[:N],
    }
    for task, items in ours.items():
        mine, _ = score_items(model, tok, items)
        theirs = res["results"][task]
        assert mine.acc == pytest.approx(theirs["acc,none"], abs=1e-9), task
        assert mine.acc_norm == pytest.approx(theirs["acc_norm,none"], abs=1e-9), task
        assert mine.acc_stderr == pytest.approx(theirs["acc_stderr,none"], rel=1e-6), task


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
