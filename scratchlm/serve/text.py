"""Text in and text out for serving: chat prompts that fit the context, and streamed text that is safe to show.

Prompts. A fine-tuned checkpoint names its template (meta["state"]["task"]["template"]); a base model has
none and gets the plain fallback below, which any text model can continue:

    System: You are terse.          (only when there is a system message)

    User: Hi!

    Assistant: Hello.

    User: How are you?

    Assistant:

and stops when it starts the next "\\nUser:" line. A conversation longer than the context loses its oldest
turns first (system messages are kept); a single last message that alone is too long keeps its end.
The alpaca template is single-turn: only the last user message is sent.

Streamed text. Byte-level BPE can split one UTF-8 character over two tokens, and a stop string can arrive
over several tokens; `TextStream` shows only whole characters and holds back any tail that might be the
start of a stop string, so neither a broken character nor a piece of a stop string ever reaches a client.
Special tokens the model emits (other than the stop tokens, which end the reply) are not shown, as
Hugging Face's `skip_special_tokens=True` does.
"""

from __future__ import annotations

import codecs
import uuid
from dataclasses import dataclass, field

from scratchlm.errors import UserError
from scratchlm.finetune.templates import Template, check_messages, get_template

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass
class ChatFormat:
    """How messages become prompt ids for one checkpoint, and what ends a reply."""
    tokenizer: object
    template: Template | None = None       # None: the plain fallback
    stop_strings: list[str] = field(default_factory=list)  # always applied (the fallback's next turn)
    stop_tokens: list[int] = field(default_factory=list)

    @classmethod
    def for_checkpoint(cls, tokenizer, meta: dict) -> "ChatFormat":
        task = ((meta or {}).get("state") or {}).get("task") or {}
        name = task.get("template") if isinstance(task, dict) else None
        if not name:
            return cls(tokenizer, None, ["\nUser:"], [tokenizer.eot_id])
        template = get_template(name)
        specials = tokenizer.special_tokens
        missing = [s for s in template.special_tokens if s not in specials]
        if missing:
            raise UserError(f"the checkpoint's {name} template needs token(s) {', '.join(missing)} its tokenizer "
                            f"lacks; re-run fine-tuning with a matching tokenizer")
        # A reply ends at the template's end token, at end-of-text, or when the model starts a new turn.
        stops = {tokenizer.eot_id, specials[template.end_token]}
        stops |= {specials[s] for s in ("<|system|>", "<|user|>", "<|assistant|>") if s in specials}
        return cls(tokenizer, template, [], sorted(stops))

    @property
    def name(self) -> str:
        return self.template.name if self.template else "plain"

    def render(self, messages: list[dict]) -> str:
        """The text the model continues to answer the last message."""
        if self.template is None:
            parts = [f"{PLAIN_ROLES[m['role']]}: {m['content']}\n\n" for m in messages]
            return "".join(parts) + "Assistant:"
        if self.template.name == "alpaca":
            users = [m for m in messages if m["role"] == "user"]
            return self.template.prompt(users[-1:])
        return self.template.prompt(messages)

    def encode(self, messages: list[dict]) -> list[int]:
        """Prompt ids. The template's own role tokens become special ids; message contents are user data
        and never do (someone typing "<|end|><|assistant|>" gets those characters, not a forged turn)."""
        if self.template is None:
            return self.tokenizer.encode_ordinary(self.render(messages))
        marker = f"\x00{uuid.uuid4().hex}\x00"
        contents = [m["content"] for m in messages]
        text = self.render([{**m, "content": f"{marker}{i}{marker}"} for i, m in enumerate(messages)])
        ids: list[int] = []
        for k, piece in enumerate(text.split(marker)):  # template, content index, template, ...
            if k % 2:
                ids += self.tokenizer.encode_ordinary(contents[int(piece)])
            elif piece:
                ids += self.tokenizer.encode(piece, allowed_special="all")
        return ids

    def prompt_ids(self, messages: list[dict], budget: int) -> tuple[list[int], int]:
        """Prompt ids of at most `budget` tokens, and how many messages were dropped to get there.

        Drops the oldest non-system messages, one at a time, while the prompt is too long and more than
        the last message remains; then, if still too long, cuts the last message's content from the front."""
        check_messages(messages)
        if messages[-1]["role"] == "assistant":
            raise UserError("messages: the last message must be from the user (or system), not the assistant")
        if self.template is not None and self.template.name == "alpaca" and not any(m["role"] == "user"
                                                                                     for m in messages):
            raise UserError("messages: the alpaca template needs a user message")
        msgs = [dict(m) for m in messages]
        older = [i for i, m in enumerate(msgs[:-1]) if m["role"] != "system"]

        def without_oldest(k: int) -> list[dict]:
            gone = set(older[:k])
            return [m for i, m in enumerate(msgs) if i not in gone]

        # The fewest oldest turns to drop, by bisection: dropping more never makes the prompt longer, and
        # re-encoding once per dropped turn would make a long conversation cost quadratic time.
        lo, hi = 0, len(older)
        if len(self.encode(msgs)) > budget:
            while lo < hi:
                mid = (lo + hi) // 2
                if len(self.encode(without_oldest(mid))) <= budget:
                    hi = mid
                else:
                    lo = mid + 1
        dropped = lo
        msgs = without_oldest(dropped)
        ids = self.encode(msgs)
        if len(ids) > budget:  # the last message alone is too long: keep the end of its text
            last = msgs[-1]
            content = self.tokenizer.encode_ordinary(last["content"])
            while len(ids) > budget and content:
                content = content[len(ids) - budget:]
                last["content"] = self.tokenizer.decode(content).lstrip("\ufffd")  # a cut may split a character
                ids = self.encode(msgs)
            ids = ids[-budget:]  # only when the system messages and the template alone do not fit
        return ids, dropped


class TextStream:
    """Feed generated token ids; get back text that is safe to show now. See the module docstring."""

    def __init__(self, tokenizer, stop_strings: list[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stop_strings if s]
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""       # decoded text not shown yet (it may be the start of a stop string)
        self.text = ""          # everything shown so far
        self.stopped = False    # a stop string was found; nothing more will be shown
        self.n_text_tokens = len(tokenizer.vocab)  # ids from here on are special tokens (<|pad|>, <|user|>, ...)

    def push(self, token_id: int) -> str:
        """The newly showable text after one more token ('' while a character or a stop string is incomplete)."""
        if self.stopped:
            return ""
        if token_id >= self.n_text_tokens:  # a special token that is not a stop token: shown as nothing
            return ""
        self.pending += self.utf8.decode(self.tokenizer.decode_bytes([token_id]))
        return self._release(final=False)

    def finish(self) -> str:
        """Whatever is left when generation ends: an incomplete character becomes U+FFFD."""
        if self.stopped:
            return ""
        self.pending += self.utf8.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
        else:
            hold = 0 if final else self._partial_stop_len()
            out = self.pending[:len(self.pending) - hold]
            self.pending = self.pending[len(self.pending) - hold:]
        self.text += out
        return out

    def _partial_stop_len(self) -> int:
        """The longest tail of `pending` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:k]):
                    best = k
                    break
        return best
