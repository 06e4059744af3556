"""Prompt templates: how a conversation becomes text, and text becomes token ids with a loss mask.

A template turns messages ``[{"role": "system"|"user"|"assistant", "content": str}, ...]`` into
*segments*: pieces of text that are either prompt (the model reads them) or response (the model
learns to write them, and each is followed by the template's end token). Two templates:

``alpaca`` — the book's chapter 7 format, one instruction (+ optional input) and one response::

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    Rewrite the sentence in passive voice.

    ### Input:
    The cat chased the mouse.

    ### Response:
    The mouse was chased by the cat.<|endoftext|>

``chat`` — the tokenizer's role tokens, any number of turns::

    <|system|>
    You are helpful.<|end|>
    <|user|>
    Hi!<|end|>
    <|assistant|>
    Hello.<|end|>

Token ids are built piece by piece — ``encode(prompt) + encode(response) + [end]`` — and never by
encoding the joined string: BPE merges across the prompt/response boundary (a prompt that ends in
a space or newline merges with the response's first word), so "count the prompt's tokens and mask
that many" masks the wrong tokens. Here the boundary is exact by construction:

    >>> ids, mask = encode_conversation(tok, get_template("chat"), messages)   # doctest: +SKIP
    >>> # mask[i] is True where ids[i] is a response token or a response's end token

The end token always counts in the loss (it is how the model learns to stop), even when the
padding id equals it: padding is masked by position, never by id.
"""

from __future__ import annotations

from dataclasses import dataclass

from scratchlm.errors import UserError

ROLES = ("system", "user", "assistant")

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")


def check_messages(messages: list[dict], where: str = "messages") -> list[dict]:
    """Refuse what no template can render: not a list of {role, content} with a known role."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: expected a non-empty list of {{role, content}} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}[{i}]: each message needs a 'role' and a 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{where}[{i}]: unknown role {m['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}[{i}]: content must be a string")
    return messages


@dataclass(frozen=True)
class Template:
    """How messages become text. `end_token` follows every response and is a stop token."""
    name: str
    end_token: str

    def segments(self, messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """[(text, is_response), ...]; each response segment is followed by `end_token` (not in the text).

        With `add_generation_prompt`, the conversation must not end with an assistant turn, and the
        last segment is the prompt that invites the next response."""
        check_messages(messages)
        if self.name == "alpaca":
            return _alpaca_segments(messages, add_generation_prompt)
        return _chat_segments(messages, add_generation_prompt)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The whole conversation as one string, end tokens written out (what HF's chat template renders)."""
        return "".join(text + (self.end_token if is_response else "")
                       for text, is_response in self.segments(messages, add_generation_prompt))

    def prompt(self, messages: list[dict]) -> str:
        """The text a model continues to answer the last user turn."""
        return self.render(messages, add_generation_prompt=True)

    @property
    def special_tokens(self) -> list[str]:
        """Special tokens the tokenizer must have for this template."""
        return ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"] if self.name == "chat" else [self.end_token]


def _alpaca_prompt(instruction: str, input_text: str = "") -> str:
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input_text:
        text += f"\n\n### Input:\n{input_text}"
    return text + "\n\n### Response:\n"


def _alpaca_segments(messages: list[dict], add_generation_prompt: bool) -> list[tuple[str, bool]]:
    # Alpaca is single-turn and has no system slot: refuse rather than drop text silently.
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) != len(messages):
        raise UserError("the alpaca template has no system message; use the chat template")
    if not turns or turns[0]["role"] != "user" or len(turns) > 2 or (len(turns) == 2 and turns[1]["role"] != "assistant"):
        raise UserError("the alpaca template takes one user turn and at most one assistant turn; use the chat template "
                        "for multi-turn conversations")
    segs = [(_alpaca_prompt(turns[0]["content"], turns[0].get("input", "")), False)]
    if len(turns) == 2:
        if add_generation_prompt:
            raise UserError("add_generation_prompt needs a conversation that ends with a user turn")
        segs.append((turns[1]["content"], True))
    elif not add_generation_prompt:
        raise UserError("the conversation has no assistant turn to train on")
    return segs


def _chat_segments(messages: list[dict], add_generation_prompt: bool) -> list[tuple[str, bool]]:
    segs: list[tuple[str, bool]] = []
    pending = ""  # prompt text waiting for the next response (or the generation prompt)
    for m in messages:
        if m["role"] == "assistant":
            segs.append((pending + "<|assistant|>\n", False))
            segs.append((m["content"], True))
            pending = "\n"  # after a response's <|end|>
        else:
            pending += f"<|{m['role']}|>\n{m['content']}<|end|>\n"
    if add_generation_prompt:
        if messages[-1]["role"] == "assistant":
            raise UserError("add_generation_prompt needs a conversation that ends with a user turn")
        segs.append((pending + "<|assistant|>\n", False))
    elif messages[-1]["role"] != "assistant":
        raise UserError("the conversation ends with a user turn: there is no response to train on")
    return [(t, r) for t, r in segs if t or r]


TEMPLATES = {"alpaca": Template("alpaca", "<|endoftext|>"), "chat": Template("chat", "<|end|>")}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise UserError(f"unknown template {name!r}; templates are: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def alpaca_messages(record: dict) -> list[dict]:
    """The book's `{instruction, input, output}` record as messages (input kept with the user turn)."""
    msgs = [{"role": "user", "content": record["instruction"], "input": record.get("input", "") or ""}]
    if "output" in record:
        msgs.append({"role": "assistant", "content": record["output"]})
    return msgs


def check_tokenizer(tok, template: Template) -> None:
    missing = [s for s in template.special_tokens if s not in tok.special_tokens]
    if missing:
        raise UserError(f"the tokenizer has no special token(s) {', '.join(missing)} that the {template.name} "
                        f"template needs; use a template it supports (alpaca needs only <|endoftext|>)")


def encode_conversation(tok, template: Template, messages: list[dict],
                        add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids and a loss mask (True = response token or its end token), built piece by piece."""
    check_tokenizer(tok, template)
    end_id = tok.special_tokens[template.end_token]
    ids: list[int] = []
    mask: list[bool] = []
    for text, is_response in template.segments(messages, add_generation_prompt):
        # Prompts may contain the template's role tokens; responses are user data and never do.
        piece = tok.encode(text, allowed_special="all") if not is_response else tok.encode_ordinary(text)
        ids += piece
        mask += [is_response] * len(piece)
        if is_response:
            ids.append(end_id)
            mask.append(True)
    return ids, mask


def encode_prompt_response(tok, template: Template, prompt_messages: list[dict],
                           response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + [end]) — what SFT and DPO build on; the prompt ids are the same
    for every response to it, exactly."""
    check_tokenizer(tok, template)
    prompt_ids = tok.encode(template.prompt(prompt_messages), allowed_special="all")
    return prompt_ids, tok.encode_ordinary(response) + [tok.special_tokens[template.end_token]]


def task_prompts(task: dict, tok, texts: list[str], raw: bool = False) -> tuple[list[str], list[int]]:
    """What `generate` feeds a checkpoint, given its task metadata (meta["state"]["task"]): an SFT
    (or DPO) run's prompts wrapped in its stored template as one user turn, and its end token as the stop
    token; any other language model's prompts as they are, stopping at <|endoftext|>."""
    kind = task.get("kind", "pretrain")
    if kind == "classify":
        raise UserError("this checkpoint is a classifier; use `scratchlm classify --ckpt ... TEXT`")
    if kind not in ("sft", "dpo") or raw or not task.get("template"):
        return list(texts), [tok.eot_id]
    template = get_template(task["template"])
    check_tokenizer(tok, template)
    stops = sorted({tok.special_tokens[template.end_token], tok.eot_id})
    return [template.prompt([{"role": "user", "content": t}]) for t in texts], stops
