"""`scratchlm plan`: what a training run will cost, before you rent the GPUs.

    plan = make_plan(load_config("gpt2-124m"), tokens=10e9, devices=8, mfu=0.4)
    print(render(plan))

Three numbers decide a run, and all three follow from the config:
  - compute: tokens x FLOPs per token (6N + attention, `model/accounting.py`);
  - time:    compute / (devices x peak FLOP/s x MFU) — the peak is the datasheet's dense bf16
             figure, MFU (model FLOPs utilisation) the share of it a real run achieves: ~30-55%
             for well-tuned GPU runs (see the README's comparison with published runs);
  - memory:  per device — fp32 weights, gradients and AdamW moments (16 bytes per parameter,
             sharded by FSDP), plus the activations of one micro-batch.
It warns when the batch cannot be split over grad_accum x devices, or a device cannot hold it.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch

from scratchlm.config import Config
from scratchlm.errors import UserError
from scratchlm.model.accounting import ActivationMemory, ParamCounts, activation_bytes, flops_per_token, param_counts
from scratchlm.train.hardware import datasheet_peak, matmul_arithmetic, measure_matmul_flops
from scratchlm.train.precision import cpu_supports_bf16

GiB = 1024 ** 3
GPU_OVERHEAD = 1 * GiB  # CUDA context, cuBLAS workspace, allocator slack: rough, but never zero
COMPUTE_OPTIMAL_TOKENS_PER_PARAM = 20  # Chinchilla (Hoffmann et al. 2022); nanochat's d20 uses it


@dataclass(frozen=True)
class Accelerator:
    """A device to rent. Its peak FLOP/s come from `train/hardware.py`'s datasheet table (dense,
    no 2:4 sparsity), the same numbers the trainer reports MFU against."""
    key: str              # the name on the command line (--price KEY=USD)
    label: str            # matched against hardware.DATASHEET, as a GPU's name would be
    memory_gib: float     # what nvidia-smi reports as total, in GiB
    price: float | None   # USD per device-hour: a stated default, to override with --price

    def peak(self, arithmetic: str) -> float:
        found = datasheet_peak(self.label, arithmetic)
        if found is None:
            raise KeyError(f"{self.label} is not in scratchlm/train/hardware.py's DATASHEET")
        return found[0]


# Prices: A100 80GB from llm.c's run_gpt2_124M.sh ($14/h for 8), A100 40GB from llm.c's GPT-2
# (124M) post, H100 from nanochat's speedrun.sh ($3/GPU/h); H200, L4, 4090 are our assumptions.
ACCELERATORS: list[Accelerator] = [
    Accelerator("a100-40gb", "A100 40GB", 40, 1.29),
    Accelerator("a100-80gb", "A100 80GB", 80, 1.75),
    Accelerator("h100", "H100 SXM", 79.6, 3.00),
    Accelerator("h200", "H200 SXM", 140.4, 3.50),
    Accelerator("l4", "L4", 22.5, 0.80),
    Accelerator("rtx4090", "RTX 4090", 24, 0.40),
]
CPU_KEY = "cpu"


@dataclass
class DeviceMemory:
    """Bytes on one device during a training step."""
    weights: float
    gradients: float
    optimizer: float
    communication: float      # DDP's gradient buckets, or FSDP's gathered blocks
    activations: ActivationMemory
    overhead: float

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.communication
                + self.activations.total + self.overhead)


@dataclass
class Row:
    accelerator: Accelerator
    devices: int
    peak: float               # FLOP/s of one device
    peak_note: str
    memory: DeviceMemory
    fits: str                 # "yes", "tight" (over 90%), "no"
    seconds: float
    price: float | None

    @property
    def cost(self) -> float | None:
        return None if self.price is None else self.seconds / 3600 * self.devices * self.price


@dataclass
class Plan:
    name: str
    cfg: Config
    counts: ParamCounts
    flops_per_token: float
    tokens: float
    tokens_note: str
    devices: int
    parallel: str
    precision: str
    mfu: float
    checkpointing: bool
    micro_batch: int
    memory: DeviceMemory              # per GPU, as planned (with or without checkpointing)
    memory_other: DeviceMemory        # the same, the other way round
    rows: list[Row]
    warnings: list[str] = field(default_factory=list)

    @property
    def total_flops(self) -> float:
        return self.tokens * self.flops_per_token

    @property
    def steps(self) -> float:
        return self.tokens / (self.cfg.train.batch_size * self.cfg.model.context_length)


def device_memory(cfg: Config, counts: ParamCounts, micro_batch: int, devices: int, parallel: str,
                  precision: str, checkpointing: bool, overhead: float) -> DeviceMemory:
    """Per-device memory. The trainer keeps fp32 master weights (autocast computes in bf16):
    4 B weights + 4 B gradients + 8 B AdamW moments per parameter. DDP keeps all of it on every
    device, plus its gradient buckets (4 B, a copy of the gradients for the all-reduce); FSDP
    keeps 1/devices of it, plus the embeddings/head module gathered for the whole step and up
    to two blocks gathered at a time (the next one prefetched), in fp32, with their gradients."""
    n = counts.total
    shard = devices if parallel == "fsdp" and devices > 1 else 1
    if devices > 1 and parallel == "fsdp":
        gathered = counts.outside_blocks + 2 * counts.per_block
        communication = 4 * gathered + 4 * (counts.outside_blocks + counts.per_block)
    elif devices > 1:
        communication = 4 * n
    else:
        communication = 0
    # FSDP shards the head's weight, so the model takes the plain (logits-materialising) loss path there
    acts = activation_bytes(cfg.model, micro_batch * cfg.model.context_length, precision, checkpointing,
                            fused_head=shard == 1)
    # AdamW keeps two moments (8 B/param); Muon one momentum buffer (4 B) for the blocks' matrices
    muon = counts.n_layers * counts.block_matrices if cfg.train.optimizer == "muon" else 0
    optimizer = 8 * (n - muon) + 4 * muon
    return DeviceMemory(4 * n / shard, 4 * n / shard, optimizer / shard, communication, acts, overhead)


def _fits(total: float, memory_gib: float) -> str:
    if total > memory_gib * GiB:
        return "no"
    return "tight" if total > 0.9 * memory_gib * GiB else "yes"


def _cpu_accelerator(arithmetic: str, peak: float | None) -> tuple[Accelerator, float, str]:
    """This machine: its peak is measured (there is no datasheet for "this CPU"), its memory read."""
    if peak is None:
        peak = measure_matmul_flops(torch.device("cpu"), arithmetic)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    except (ValueError, OSError, AttributeError):
        ram = 0.0
    return Accelerator(CPU_KEY, "this CPU", ram, None), peak, f"measured, {arithmetic}"


def _batch_warning(batch: int, grad_accum: int, devices: int) -> str | None:
    split = grad_accum * devices
    if batch % split == 0:
        return None
    sizes = [s for s in ((batch // split) * split, (batch // split + 1) * split) if s > 0]
    accums = [g for g in range(1, 65) if batch % (g * devices) == 0][:6]
    hint = f", or train.grad_accum in {{{', '.join(map(str, accums))}}}" if accums else ""
    return (f"train.batch_size={batch} does not divide by train.grad_accum ({grad_accum}) x devices "
            f"({devices}) = {split}: the trainer will refuse it; use a batch size of "
            f"{' or '.join(map(str, sizes))}{hint}")


def make_plan(cfg: Config, *, tokens: float | None = None, compute_optimal: bool = False,
              devices: int = 1, parallel: str | None = None, mfu: float = 0.4,
              activation_checkpointing: bool = False, prices: dict[str, float] | None = None,
              cpu_peak: float | None = None, name: str = "") -> Plan:
    """Plan a run of `cfg` on `devices` GPUs of each kind, and on this CPU.

    tokens: how many to train on (default: the config's own run, train.max_tokens or
    max_steps x batch x context); compute_optimal: 20 tokens per parameter instead.
    prices: USD per device-hour by accelerator key; cpu_peak: this CPU's FLOP/s (default:
    measured now, ~0.3 s)."""
    cfg = copy.deepcopy(cfg)  # filling in vocab_size must not change the caller's config
    parallel = parallel or cfg.train.parallel
    prices = dict(prices or {})
    warnings = _check_inputs(cfg, devices, parallel, mfu, prices)
    tc, mc = cfg.train, cfg.model
    counts, fpt = param_counts(mc), flops_per_token(mc)
    tokens, note = _target_tokens(cfg, counts, tokens, compute_optimal)
    micro = max(1, tc.batch_size // (tc.grad_accum * devices))
    recompute = 4 / 3 if activation_checkpointing else 1.0  # every block's forward runs twice

    # The GPUs: bf16 autocast unless the config asks for fp32 (which may run as TF32).
    precision = "fp32" if tc.precision == "fp32" else "bf16"
    arithmetic = matmul_arithmetic(torch.device("cuda"), precision)
    memory, other = (device_memory(cfg, counts, micro, devices, parallel, precision, ckpt, GPU_OVERHEAD)
                     for ckpt in (activation_checkpointing, not activation_checkpointing))
    rows = []
    for acc in ACCELERATORS:
        seconds = tokens * fpt * recompute / (devices * acc.peak(arithmetic) * mfu)
        rows.append(Row(acc, devices, acc.peak(arithmetic), f"{arithmetic} dense", memory,
                        _fits(memory.total, acc.memory_gib), seconds, prices.get(acc.key, acc.price)))

    # This CPU: one process (more processes on one CPU add no FLOPs), so the whole micro-batch.
    cpu_precision = "fp32" if tc.precision == "fp32" or not cpu_supports_bf16() else "bf16"
    cpu, peak, peak_note = _cpu_accelerator(cpu_precision, cpu_peak)
    cpu_mem = device_memory(cfg, counts, max(1, tc.batch_size // tc.grad_accum), 1, parallel, cpu_precision,
                            activation_checkpointing, 0)
    rows.append(Row(cpu, 1, peak, peak_note, cpu_mem, _fits(cpu_mem.total, cpu.memory_gib) if cpu.memory_gib
                    else "?", tokens * fpt * recompute / (peak * mfu), prices.get(CPU_KEY)))

    plan = Plan(name, cfg, counts, fpt, tokens, note, devices, parallel, precision, mfu,
                activation_checkpointing, micro, memory, other, rows, warnings)
    plan.warnings += _plan_warnings(plan)
    return plan


def _check_inputs(cfg: Config, devices: int, parallel: str, mfu: float, prices: dict[str, float]) -> list[str]:
    """Refuse what cannot be planned; fill in a vocabulary the preset leaves to the tokenizer."""
    if parallel not in ("ddp", "fsdp"):
        raise UserError(f"--parallel must be ddp or fsdp, got {parallel!r}")
    if devices < 1:
        raise UserError(f"--devices must be at least 1, got {devices}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu is a fraction of the peak, in (0, 1], got {mfu} (e.g. 0.4 for 40%)")
    known = {a.key for a in ACCELERATORS} | {CPU_KEY}
    for key, value in prices.items():
        if key not in known:
            raise UserError(f"--price {key}=...: unknown accelerator; known: {', '.join(sorted(known))}")
        if value < 0:
            raise UserError(f"--price {key}={value}: a price cannot be negative")
    if cfg.train.batch_size < 1 or cfg.train.grad_accum < 1:
        raise UserError("train.batch_size and train.grad_accum must be at least 1")
    warnings = []
    if cfg.model.vocab_size == 0:  # the presets size the model from the tokenizer they train
        cfg.model.vocab_size = cfg.tokenizer.effective_vocab_size
        warnings.append(f"model.vocab_size is 0 (= the tokenizer's): planned with the {cfg.tokenizer.kind} "
                        f"tokenizer's {cfg.model.vocab_size} tokens")
    cfg.model.validate()
    return warnings


def _target_tokens(cfg: Config, counts: ParamCounts, tokens: float | None,
                   compute_optimal: bool) -> tuple[float, str]:
    tc = cfg.train
    if compute_optimal and tokens is not None:
        raise UserError("give --tokens or --compute-optimal, not both")
    if compute_optimal:
        return (float(COMPUTE_OPTIMAL_TOKENS_PER_PARAM * counts.total),
                f"compute-optimal: {COMPUTE_OPTIMAL_TOKENS_PER_PARAM} tokens per parameter (Chinchilla)")
    if tokens is not None:
        if tokens <= 0:
            raise UserError(f"--tokens must be positive, got {tokens:g}")
        return float(tokens), "as asked"
    if tc.max_tokens:
        return float(tc.max_tokens), "the config's train.max_tokens"
    return (float(tc.max_steps * tc.batch_size * cfg.model.context_length),
            f"the config's run: train.max_steps={tc.max_steps:,} x {tc.batch_size} sequences "
            f"x {cfg.model.context_length} tokens")


def _plan_warnings(plan: Plan) -> list[str]:
    """What would stop the run, or make the plan wrong."""
    tc, warnings = plan.cfg.train, []
    problem = _batch_warning(tc.batch_size, tc.grad_accum, plan.devices)
    if problem:
        warnings.append(problem)
    too_small = [r.accelerator.label for r in plan.rows[:-1] if r.fits == "no"]
    if too_small:
        fixes = [] if plan.checkpointing else ["--activation-checkpointing"]
        if plan.devices > 1 and plan.parallel == "ddp":
            fixes.insert(0, "--parallel fsdp")
        if plan.micro_batch > 1:
            fixes.append(f"a smaller micro-batch (raise train.grad_accum; now {plan.micro_batch} sequences "
                         f"per device)")
        fixes.append("more devices")
        warnings.append(f"needs ~{plan.memory.total / GiB:.1f} GiB per device: does not fit on "
                        f"{', '.join(too_small)}; try {', '.join(fixes)}")
    if tc.optimizer == "muon" and plan.parallel == "fsdp" and plan.devices > 1:
        warnings.append("train.optimizer=muon does not run under FSDP (the trainer refuses it): use --parallel ddp")
    if plan.checkpointing:
        warnings.append("activation checkpointing is planned here, but scratchlm's trainer does not "
                        "implement it yet: a real run needs the memory without it")
    if tc.max_minutes:
        capped = [r for r in plan.rows if r.seconds > tc.max_minutes * 60]
        if capped:
            reach = ", ".join(f"{r.accelerator.label} ~{_count(plan.tokens * tc.max_minutes * 60 / r.seconds)}"
                              for r in capped)
            warnings.append(f"train.max_minutes={tc.max_minutes:g} stops the run before {_count(plan.tokens)} "
                            f"tokens on: {reach} tokens at this MFU")
    if plan.devices > 8:
        warnings.append(f"{plan.devices} devices is several nodes: the MFU assumes the interconnect keeps up "
                        f"(across nodes without InfiniBand it usually does not)")
    return warnings


# --- printing -----------------------------------------------------------------------------------
def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.1f} s"


def _gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def render(plan: Plan) -> str:
    c, mc, tc = plan.counts, plan.cfg.model, plan.cfg.train
    out = []
    where = f"{plan.devices} device{'s' if plan.devices > 1 else ''}" + (
        f", {plan.parallel.upper()}" if plan.devices > 1 else "")
    out.append(f"plan: {plan.name or 'config'}, {_count(plan.tokens)} tokens on {where}, "
               f"{plan.precision}, MFU {plan.mfu:.0%}")
    emb = f"token table {_count(c.token_embedding)}"
    if c.position_embedding:
        emb += f", position table {_count(c.position_embedding)}"
    if c.output_head:
        emb += f", untied output head {_count(c.output_head)}"
    out.append(f"\nparameters  {_count(c.total)} total = {_count(c.non_embedding)} non-embedding + {emb}")
    out.append(f"            {_count(c.matmul)} in matmuls (N below: lookup tables cost no FLOPs; "
               f"{'a tied table counts once, as the output head' if c.tied else 'the head counts'})")
    attn = 12 * mc.n_layers * mc.d_model * mc.context_length
    out.append(f"FLOPs/token {_count(plan.flops_per_token)} = 6N ({_count(6 * c.matmul)}: forward 2N + backward 4N)"
               f" + 12 x layers x width x context ({_count(attn)}: attention scores and mix, PaLM appendix B)")
    out.append(f"tokens      {_count(plan.tokens)} ({plan.tokens_note}); {_count(plan.tokens / c.total)} per parameter")
    out.append(f"compute     {plan.total_flops:.3g} FLOPs; {plan.steps:,.0f} optimizer steps of {tc.batch_size} x "
               f"{mc.context_length} tokens; micro-batch {plan.micro_batch} sequences per device "
               f"(batch {tc.batch_size} / grad_accum {tc.grad_accum} / {plan.devices} devices)")

    with_ck, without = (plan.memory, plan.memory_other) if plan.checkpointing else (plan.memory_other, plan.memory)
    shard = f" / {plan.devices}" if plan.parallel == "fsdp" and plan.devices > 1 else ""
    comm = {"fsdp": "FSDP gathered blocks + grads", "ddp": "DDP gradient buckets"}[plan.parallel]
    out.append(f"\nmemory per GPU (GiB)                 {'without':>8} {'with activation checkpointing':>30}")
    lines = [(f"weights, fp32 (4 B/param{shard})", without.weights, with_ck.weights),
             (f"gradients, fp32 (4 B/param{shard})", without.gradients, with_ck.gradients),
             (f"AdamW moments (8 B/param{shard})" if tc.optimizer == "adamw" else
              f"Muon momentum (4 B/matrix param) + AdamW (8 B/other){shard}", without.optimizer, with_ck.optimizer),
             (comm if plan.devices > 1 else "(one device: no communication)", without.communication,
              with_ck.communication),
             ("bf16 weight copies (autocast)", without.activations.weight_copies, with_ck.activations.weight_copies),
             (f"activations ({plan.micro_batch} x {mc.context_length} tokens)", without.activations.saved,
              with_ck.activations.saved),
             ("logits + their gradient", without.activations.logits, with_ck.activations.logits),
             ("CUDA context, workspace (rough)", without.overhead, with_ck.overhead)]
    for label, a, b in lines:
        out.append(f"  {label:<35}{_gib(a):>8} {_gib(b):>30}")
    out.append(f"  {'total':<35}{_gib(without.total):>8} {_gib(with_ck.total):>30}")

    slow = " (x4/3: checkpointing recomputes each block's forward)" if plan.checkpointing else ""
    out.append(f"\ntime and cost at MFU {plan.mfu:.0%}{slow}")
    out.append(f"  {'accelerator':<16}{'peak TFLOP/s':>18} {'memory':>8} {'fits':>6} {'time':>14} "
               f"{'cost':>10}  $/device-h")
    for r in plan.rows:
        cost = f"${r.cost:,.0f}" if r.cost is not None and r.cost >= 10 else (
            f"${r.cost:,.2f}" if r.cost is not None else "-")
        price = f"{r.price:.2f}" if r.price is not None else "-"
        peak = f"{r.peak / 1e12:,.1f} {r.peak_note}"
        n = f"{r.devices} x " if r.devices > 1 else ""
        out.append(f"  {n + r.accelerator.label:<16}{peak:>18} {r.accelerator.memory_gib:>5.0f}GiB {r.fits:>6} "
                   f"{_duration(r.seconds):>14} {cost:>10}  {price}")
    out.append("  peaks: dense datasheet figures (scratchlm/train/hardware.py); prices: stated defaults, "
               "override with --price KEY=USD")
    if plan.rows[-1].accelerator.key == CPU_KEY:
        cpu = plan.rows[-1]
        out.append(f"  this CPU: one process, micro-batch {tc.batch_size // tc.grad_accum or 1}; "
                   f"needs {_gib(cpu.memory.total)} GiB of {cpu.accelerator.memory_gib:.0f} GiB RAM")
    for w in plan.warnings:
        out.append(f"warning: {w}")
    return "\n".join(out)
