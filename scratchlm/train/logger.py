"""Progress on the terminal, metrics in a JSONL file (one JSON object per line), training speed."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from scratchlm.atomic import write_text
from scratchlm.errors import UserError


def format_seconds(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self.tb = None  # an optional TensorBoard SummaryWriter

    def truncate_after(self, step: int) -> None:
        """On resume: drop records past the checkpoint, so the log reads as one clean run."""
        if not self.enabled or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        write_text(self.path, "".join(ln + "\n" for ln in keep))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            group = "eval" if record.get("type") == "eval" else "train"
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"{group}/{key}", value, record["step"])

    def add_tensorboard(self, log_dir: Path, purge_step: int | None = None) -> None:
        """Mirror every numeric metric to TensorBoard event files (the JSONL stays the record).
        `purge_step` drops events a resumed run is about to redo, as the JSONL truncation does."""
        if not self.enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
        self.tb = SummaryWriter(str(log_dir), purge_step=purge_step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


class Progress:
    """A one-line progress bar: step, loss, tokens/s, MFU, ETA. Plain lines when not a terminal."""

    def __init__(self, total: int, enabled: bool = True, stream=sys.stderr):
        self.total, self.enabled, self.stream = total, enabled, stream
        self.tty = stream.isatty()
        self.start = time.time()

    def update(self, step: int, loss: float, tok_s: float, mfu: float, lr: float, eta_s: float) -> None:
        if not self.enabled:
            return
        frac = step / max(self.total, 1)
        bar = "#" * int(frac * 20) + "-" * (20 - int(frac * 20))
        line = (f"[{bar}] step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s "
                f"MFU {mfu * 100:.1f}% ETA {format_seconds(eta_s)}")
        if self.tty:
            self.stream.write("\r" + line.ljust(110))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + " " * 110 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()


class Speed:
    """Tokens per second over training steps only: not evaluation or checkpoint time, and not the
    first step of a session (torch.compile and allocator warm-up) once there are others."""

    def __init__(self):
        self.steps, self.tokens, self.seconds = 0, 0, 0.0
        self.first: tuple[int, float] | None = None

    def add(self, tokens: int, seconds: float) -> None:
        self.steps += 1
        if self.first is None:
            self.first = (tokens, seconds)
        else:
            self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds

    def tokens_per_s(self) -> float:
        tokens, seconds = (self.tokens, self.seconds) if self.steps > 1 else (self.first or (0, 0.0))
        return tokens / max(seconds, 1e-9)

    def eta(self, steps_left: int) -> float:
        per_step = self.seconds / (self.steps - 1) if self.steps > 1 else (self.first or (0, 0.0))[1]
        return steps_left * per_step
