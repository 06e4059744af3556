"""Configuration: one small dataclass per concern, loaded from TOML, overridable from the CLI.

    cfg = load_config("configs/quickstart.toml", overrides=["train.lr=3e-4", "model.n_layers=2"])

Unknown sections or keys, values of the wrong type and values that cannot work are errors, each
one line when the config loads (a typo must not silently train the default, nor crash an hour in).
The effective config is saved with every run as `config.toml`.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scratchlm.errors import UserError
from scratchlm.model.config import ModelConfig
from scratchlm.tokenizer.bpe import CHAR_VOCAB_SIZE, KINDS
from scratchlm.train.schedule import SCHEDULES, train_lengths

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"          # the run lives in out_dir/name
    seed: int = 1337
    device: str = "auto"           # auto | cpu | cuda | cuda:N | mps


@dataclass
class DataConfig:
    corpus: str = "builtin"        # builtin | path | glob | directory | http(s) URL | hf:NAME
    text_field: str = "text"       # for JSONL / parquet / datasets
    dataset_dir: str = ""          # prepared shards; default: <run>/data
    val_fraction: float = 0.05     # share of *documents* held out for validation
    dedup: bool = True
    near_dedup_threshold: float = 0.8
    min_chars: int = 32
    max_docs: int = 0              # 0 = all
    max_chars: int = 0             # 0 = all; a cap on corpus size for quick runs
    on_bad_record: str = "stop"    # stop | skip: a malformed JSONL line or record without the text field
    decontaminate: list[str] = field(default_factory=list)  # eval files whose 13-grams are looked for
    drop_contaminated: bool = False  # drop flagged documents (default: only report them)
    shard_tokens: int = 50_000_000   # tokens per shard file (also what `prepare` buffers in memory)


@dataclass
class TokenizerConfig:
    kind: str = "bpe"              # bpe | char: char = the 256 bytes + special tokens, no merges (one token
                                   # per character on ASCII text); it ignores vocab_size and pattern
    vocab_size: int = 4096         # bpe: tokens in all, 256 bytes and special tokens included
    pattern: str = "gpt4"          # bpe: gpt2 | gpt4 | a regex
    path: str = ""                 # an existing tokenizer directory to use instead of training

    @property
    def effective_vocab_size(self) -> int:
        """The vocabulary this config trains (what model.vocab_size = 0 becomes)."""
        return CHAR_VOCAB_SIZE if self.kind == "char" else self.vocab_size


@dataclass
class TrainConfig:
    batch_size: int = 16           # sequences per optimizer step, across all processes
    grad_accum: int = 1            # micro-steps per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1      # final lr = lr * min_lr_ratio
    warmup_steps: int = 50
    schedule: str = "cosine"       # cosine | wsd | constant
    decay_fraction: float = 0.2    # wsd: share of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    optimizer: str = "adamw"       # adamw | muon (Muon for the blocks' matrices, AdamW for the rest: train/muon.py)
    muon_lr: float = 0.02          # muon: the matrices' peak LR (train.lr stays the AdamW parameters'); same schedule
    grad_clip: float = 1.0
    seq_warmup_steps: int = 0      # > 0: pretraining cuts the same tokens into shorter sequences at first, growing
                                   # to the full context by this step (train/schedule.py seq_length_at)
    seq_warmup_start: int = 0      # the shortest sequence length of that warm-up; 0 = context/4
    max_steps: int = 1000
    max_tokens: int = 0            # 0 = no token budget
    max_minutes: float = 0.0       # 0 = no time budget
    precision: str = "auto"        # auto | fp32 | bf16
    compile: bool = False
    parallel: str = "ddp"          # ddp | fsdp (only used under torchrun with several processes)
    tensorboard: bool = False      # also write scalars for TensorBoard (pip install tensorboard)
    eval_every: int = 100
    eval_batches: int = 20
    sample_every: int = 0          # log sample generations every N steps; 0 = only at evals
    sample_tokens: int = 48
    checkpoint_every: int = 200
    keep_last: int = 2
    keep_best: bool = True
    log_every: int = 10


@dataclass
class EvalConfig:
    mc_limit: int = 100            # multiple-choice items per task in the quickstart report
    prompts: list[str] = field(default_factory=lambda: [
        "And God said,", "In the beginning", "The king of", "Blessed are the"])


@dataclass
class FinetuneConfig:
    template: str = "alpaca"       # sft: alpaca | chat (stored in the checkpoint; generate/chat/serve use it)
    train_on_prompt: bool = False  # sft: the loss also covers prompt tokens (default: response + end token)
    max_length: int = 0            # tokens per example; 0 = the model's context (+1 for the shifted target)
    packing: bool = False          # sft: several examples per sequence (attention kept within each)
    trainable: str = "auto"        # auto | all | lora; classify also head | last-block (auto: classify
                                   # last-block, the book's choice; sft all)
    init: str = "pretrained"       # pretrained | random: start from the base's weights or its shape only
    balanced: bool = False         # classify: draw every class equally often
    epochs: float = 0.0            # > 0: train this many passes over the training split (sets max_steps)
    val_fraction: float = 0.1      # held-out shares of the data file, split by run.seed
    test_fraction: float = 0.2


TARGETS = ("q", "k", "v", "o", "mlp", "head")


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0            # the update is scaled by alpha / rank
    dropout: float = 0.0           # on the adapters' input only
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])  # from q k v o mlp head

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> "LoraConfig":
        if self.rank < 1:
            raise UserError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise UserError(f"lora.targets {self.targets} must be a non-empty list from {', '.join(TARGETS)}")
        return self


@dataclass
class DPOConfig:
    beta: float = 0.1              # strength of the leash to the reference: reward = beta * log(pi / pi_ref)
    label_smoothing: float = 0.0   # conservative DPO: the share of preference labels assumed flipped
    length_normalize: bool = False # average response log-probs over tokens instead of summing (book variant)
    precompute_reference: bool = True  # reference log-probs once, stored with the pairs; no reference in memory
    template: str = ""             # "" = the starting checkpoint's template; else alpaca | chat
    val_fraction: float = 0.1      # share of pairs held out (split by run.seed)
    max_pairs: int = 0             # 0 = all; a cap for quick runs
    on_bad_record: str = "stop"    # stop | skip
    sample_prompts: list[str] = field(default_factory=lambda: [
        "Give three tips for staying healthy.", "What is the capital of France?"])


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check (and for CLI strings, convert) a value against a dataclass field type."""
    origin = typing.get_origin(typ)
    if origin is list:
        if isinstance(value, str):  # from --set: a TOML array, or else one item (commas and all)
            value = _toml_array(value, where) if value.lstrip().startswith("[") else [value]
        if not isinstance(value, list):
            raise UserError(f"{where} must be a list, got {value!r}")
        return [str(v) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False  # not bool("False"), which is True: a classic bug
        raise UserError(f"{where} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise UserError(f"{where} must be an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where} must be an integer, got {value!r}") from None
        if f != int(f):
            raise UserError(f"{where} must be an integer, got {value!r}")
        return int(f)
    if typ is float:
        if isinstance(value, bool):  # TOML `true` is not 1.0
            raise UserError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where} must be a number, got {value!r}") from None
    if typ is str:
        return str(value)
    return value


def _toml_array(text: str, where: str) -> list:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{where}: {text!r} is not a TOML array ({e}); write e.g. [\"one, with a comma\", \"two\"]")\
            from None


def _apply(section_obj: Any, section: str, values: dict) -> None:
    hints = typing.get_type_hints(type(section_obj))
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(section_obj))
            raise UserError(f"unknown config key {section}.{key}; known keys in [{section}]: {known}")
        setattr(section_obj, key, _coerce(value, hints[key], f"{section}.{key}"))


def apply_dict(cfg: Config, data: dict) -> Config:
    for section, values in data.items():
        if not hasattr(cfg, section) or not dataclasses.is_dataclass(getattr(cfg, section)):
            names = ", ".join(f.name for f in dataclasses.fields(cfg))
            raise UserError(f"unknown config section [{section}]; sections are: {names}")
        if not isinstance(values, dict):
            raise UserError(f"config section [{section}] must be a table of key = value")
        _apply(getattr(cfg, section), section, values)
    return cfg


def parse_override(text: str) -> tuple[str, str, str]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"bad --set {text!r}: write section.key=value, e.g. --set train.lr=3e-4")
    key, value = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    return section, name, value.strip()


def resolve_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.exists():
        return p
    preset = CONFIG_DIR / f"{name_or_path}.toml"
    if preset.exists():
        return preset
    if p.suffix == ".toml":
        raise UserError(f"config file {p} not found")
    names = ", ".join(sorted(x.stem for x in CONFIG_DIR.glob("*.toml")))
    raise UserError(f"unknown preset {name_or_path!r}; presets are: {names} (or give a .toml path)")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    cfg = Config()
    if path:
        p = resolve_preset(str(path))
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"config file {p} is not valid TOML: {e}") from None
        apply_dict(cfg, data)
    for text in overrides:
        section, name, value = parse_override(text)
        apply_dict(cfg, {section: {name: value}})
    validate(cfg)
    return cfg


def validate(cfg: Config) -> Config:
    """Refuse values that cannot work, one line each, before anything runs."""
    r, d, k, t, e = cfg.run, cfg.data, cfg.tokenizer, cfg.train, cfg.eval
    device_ok = r.device in ("auto", "cpu", "cuda", "mps") or (r.device.startswith("cuda:")
                                                                 and r.device[5:].isdigit())
    checks = [
        (bool(r.name.strip()) and "/" not in r.name, f"run.name must be a plain name (no '/'), got {r.name!r}"),
        (bool(r.out_dir.strip()), "run.out_dir must not be empty"),
        (r.seed >= 0, f"run.seed must be >= 0, got {r.seed}"),
        (device_ok, f"run.device must be auto, cpu, cuda, cuda:N or mps, got {r.device!r}"),
        (0.0 <= d.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {d.val_fraction}"),
        (0.0 < d.near_dedup_threshold <= 1.0, f"data.near_dedup_threshold must be in (0, 1], got {d.near_dedup_threshold}"),
        (d.min_chars >= 0 and d.max_docs >= 0 and d.max_chars >= 0,
         "data.min_chars, data.max_docs and data.max_chars must be >= 0 (0 = no limit)"),
        (k.kind in KINDS, f"tokenizer.kind must be {' or '.join(KINDS)}, got {k.kind!r}"),
        (k.kind == "char" or k.vocab_size >= 257,
         f"tokenizer.vocab_size must be >= 257 (256 bytes + special tokens), got {k.vocab_size}"),
        (bool(k.pattern), "tokenizer.pattern must not be empty (gpt2, gpt4 or a regex)"),
        (t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}"),
        (t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}"),
        (t.batch_size % max(t.grad_accum, 1) == 0,
         f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}"),
        (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
        (0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}"),
        (t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}"),
        (t.schedule in SCHEDULES, f"train.schedule must be one of {', '.join(SCHEDULES)}, got {t.schedule!r}"),
        (0.0 <= t.decay_fraction <= 1.0, f"train.decay_fraction must be in [0, 1], got {t.decay_fraction}"),
        (t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}"),
        (0.0 <= t.beta1 < 1.0 and 0.0 <= t.beta2 < 1.0, f"train.beta1 and beta2 must be in [0, 1), got "
                                                         f"{t.beta1}, {t.beta2}"),
        (t.optimizer in ("adamw", "muon"), f"train.optimizer must be adamw or muon, got {t.optimizer!r}"),
        (t.muon_lr > 0, f"train.muon_lr must be > 0, got {t.muon_lr}"),
        (t.seq_warmup_steps >= 0, f"train.seq_warmup_steps must be >= 0 (0 = off), got {t.seq_warmup_steps}"),
        (0 <= t.seq_warmup_start <= cfg.model.context_length,
         f"train.seq_warmup_start must be in [0, model.context_length={cfg.model.context_length}] (0 = context/4), "
         f"got {t.seq_warmup_start}"),
        (t.seq_warmup_steps == 0 or cfg.model.context_length < 1
         or len(train_lengths(cfg.model.context_length, t.seq_warmup_start)) > 1,
         f"train.seq_warmup_steps needs a shorter length that divides model.context_length="
         f"{cfg.model.context_length} (context/2, /4 or /8, >= train.seq_warmup_start); use an even context "
         f"or train.seq_warmup_steps=0"),
        (t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), got {t.grad_clip}"),
        (t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}"),
        (t.max_tokens >= 0, f"train.max_tokens must be >= 0 (0 = no token budget), got {t.max_tokens}"),
        (t.max_minutes >= 0, f"train.max_minutes must be >= 0 (0 = no time budget), got {t.max_minutes}"),
        (t.precision in ("auto", "fp32", "bf16"), f"train.precision must be auto, fp32 or bf16, got {t.precision!r}"),
        (t.parallel in ("ddp", "fsdp"), f"train.parallel must be ddp or fsdp, got {t.parallel!r}"),
        (t.eval_every >= 0 and t.sample_every >= 0 and t.checkpoint_every >= 0,
         "train.eval_every, sample_every and checkpoint_every must be >= 0 (0 = only at the end / never)"),
        (t.eval_batches >= 1, f"train.eval_batches must be >= 1, got {t.eval_batches}"),
        (t.sample_tokens >= 0, f"train.sample_tokens must be >= 0, got {t.sample_tokens}"),
        (t.keep_last >= 0, f"train.keep_last must be >= 0 (0 = keep every checkpoint), got {t.keep_last}"),
        (t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}"),
        (e.mc_limit >= 0, f"eval.mc_limit must be >= 0, got {e.mc_limit}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    cfg.model.validate()
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def to_toml(cfg: Config | dict) -> str:
    d = to_dict(cfg) if isinstance(cfg, Config) else cfg
    lines = []
    for section, values in d.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def from_dict(data: dict) -> Config:
    return apply_dict(Config(), data)
