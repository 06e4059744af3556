"""Tokenizer: our trainer and encoder vs Hugging Face `tokenizers` (Rust), same corpus, same regex."""

from __future__ import annotations

import time

from benchmarks.common import best_of, gutenberg_texts, md_table
from scratchlm.tokenizer import DEFAULT_SPECIAL_TOKENS, GPT4_PATTERN, Tokenizer


def run() -> str:
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    texts = gutenberg_texts(20.0)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    vocab = 8192

    t = time.perf_counter()
    ours = Tokenizer.train(texts, vocab, pattern=GPT4_PATTERN, num_workers=2)
    ours_train = time.perf_counter() - t

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False, special_tokens=list(DEFAULT_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t = time.perf_counter()
    hf.train_from_iterator(texts, trainer)
    hf_train = time.perf_counter() - t

    # Encoding: documents cut into ~4 KB pieces (a typical data-pipeline batch), both batched.
    docs = [t[i:i + 4096] for t in texts for i in range(0, len(t), 4096)]
    ours.encode_batch(docs[:100])
    ours_enc = best_of(lambda: ours.encode_batch(docs), 2)
    hf_enc = best_of(lambda: hf.encode_batch(docs, add_special_tokens=False), 2)
    ours_tokens = sum(len(x) for x in ours.encode_batch(docs))
    hf_tokens = sum(len(e.ids) for e in hf.encode_batch(docs, add_special_tokens=False))

    rows = [
        ["train to vocab 8192 (s)", f"{ours_train:.2f}", f"{hf_train:.2f}", f"{ours_train / hf_train:.2f}x time",
         "<= 1.0x"],
        ["encode throughput (MB/s)", f"{mb / ours_enc:.1f}", f"{mb / hf_enc:.1f}", f"{hf_enc / ours_enc:.2f}x speed",
         ">= 2.5x"],
        ["bytes per token", f"{mb * 1e6 / ours_tokens:.4f}", f"{mb * 1e6 / hf_tokens:.4f}",
         f"{(mb * 1e6 / ours_tokens) / (mb * 1e6 / hf_tokens):.4f}", "within 1%"],
    ]
    return (f"### Tokenizer ({mb:.1f} MB of Gutenberg text, GPT-4 regex, 2 processes for our counting)\n\n"
            + md_table(["", "scratchlm", "HF tokenizers", "ratio", "goal"], rows))


if __name__ == "__main__":
    print(run())
