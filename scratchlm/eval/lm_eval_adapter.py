"""lm-evaluation-harness interop: our model as an lm-eval `LM`, registered as "scratchlm".

    python -m scratchlm.eval.lm_eval_adapter --model scratchlm --model_args ckpt=runs/quickstart \\
        --tasks my_task --include_path tasks/ 

(the module registers the class, then hands its arguments to lm-eval's own CLI). Task YAMLs can
point at local files (`dataset_path: json`, `dataset_kwargs: {data_files: ...}`), so it runs
offline. lm-eval's `TemplateLM` splits each request into context and continuation tokens (its
own rules); we only score token ids, with the batched scorer `scratchlm eval` uses.
"""

from __future__ import annotations

import sys

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from scratchlm.eval.multiple_choice import loglikelihoods
from scratchlm.generate import SamplingConfig, generate
from scratchlm.train.checkpoint import load_for_inference


@register_model("scratchlm")
class ScratchLM(TemplateLM):
    def __init__(self, ckpt: str, device: str = "auto", batch_size: int | str = 16, **kwargs):
        super().__init__()
        self.model, self.tok, _ = load_for_inference(ckpt, device=device)
        self.batch_size_ = int(batch_size) if str(batch_size).isdigit() else 16

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode_ordinary(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return loglikelihoods(self.model, [(ctx, cont) for _, ctx, cont in requests], batch_size=self.batch_size_)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood: windows of the context length, each token scored once,
        the first predicted from <|endoftext|>."""
        T = self.model.cfg.context_length
        out = []
        for req in requests:
            ids = self.tok.encode_ordinary(req.args[0])
            pairs = []
            prev = [self.tok.eot_id]
            for start in range(0, len(ids), T):
                chunk = ids[start:start + T]
                ctx = (prev + ids[:start])[-(T + 1 - len(chunk)):] if start else prev
                pairs.append((ctx, chunk))
            out.append(sum(ll for ll, _ in loglikelihoods(self.model, pairs, batch_size=self.batch_size_)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            cfg = SamplingConfig(max_new_tokens=int(kwargs.get("max_gen_toks", 128)),
                                 temperature=float(kwargs.get("temperature", 0.0)), stop_strings=until)
            out.append(generate(self.model, self.tok, context, cfg, truncate_prompt=True)[0])
        return out


def main() -> None:
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    sys.exit(main())
