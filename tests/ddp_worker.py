"""One rank of a torchrun job that trains through `train()` and reports what *this* rank ended with
(only rank 0 writes checkpoints, so the other ranks' weights are otherwise invisible).

    torchrun --nproc_per_node=2 tests/ddp_worker.py DATASET OUT_JSON_PREFIX --set k=v ...
"""

import hashlib
import json
import os
import sys

import torch

from scratchlm.config import load_config
from scratchlm.model import GPT
from scratchlm.train.objective import PretrainObjective
from scratchlm.train.trainer import train


def main() -> None:
    dataset, out_prefix, *rest = sys.argv[1:]
    overrides = [rest[i + 1] for i in range(0, len(rest), 2)]
    cfg = load_config("tiny", overrides)
    objective = PretrainObjective(dataset, cfg.model.context_length, cfg.eval.prompts,
                                  eval_windows=cfg.train.eval_batches * 8, sample_tokens=cfg.train.sample_tokens)
    cfg.model.vocab_size = objective.tokenizer.vocab_size
    torch.manual_seed(cfg.run.seed)
    model = GPT(cfg.model)
    lrs = []  # the learning rate of every step this rank took
    adamw_step = torch.optim.AdamW.step

    def recording_step(self, *a, **kw):
        lrs.append(self.param_groups[0]["lr"])
        return adamw_step(self, *a, **kw)

    torch.optim.AdamW.step = recording_step
    result = train(cfg, model, objective, log=lambda *_: None, quiet=True)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    rank = int(os.environ.get("RANK", 0))
    with open(f"{out_prefix}.rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "step": result.step, "stopped_by": result.stopped_by,
                   "weights_sha256": digest.hexdigest(), "tokens": result.tokens, "lrs": lrs}, f)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, f"{out_prefix}.rank{rank}.pt")


if __name__ == "__main__":
    main()
