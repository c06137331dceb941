"""Metrics logging, the progress bar and rank-0 printing.

Owns the run's `metrics.jsonl` (one JSON object per step: {"step", "time", **metrics}) and `samples.jsonl`
(one object per logged completion: {"step", "prompt", "completion", "reward"}), plus TensorBoard scalars when
`torch.utils.tensorboard` is importable. Knows nothing about which metrics a trainer produces.
`NullLogger` has the same methods and does nothing (the default for library calls and tests).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from polyalign.files import atomic_write_text
from polyalign.train.monitors import alarms

METRICS, SAMPLES = "metrics.jsonl", "samples.jsonl"


def get_rank() -> int:
    """Process rank: torch.distributed if initialised, else the RANK environment variable, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return get_rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """`print` on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs)


def cut_logs(run_dir: Path, step: int) -> None:
    """Cut a run's logs back to `step` (-1: empty them) before it resumes from that step's checkpoint, so that
    every step is logged exactly once: records past it in metrics.jsonl and samples.jsonl (and torn lines of
    a killed run) are dropped, and eval/step_*.json files past it removed."""
    for path in (run_dir / METRICS, run_dir / SAMPLES):
        if path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the half-written last line of a killed run
                    continue
                if (
                    isinstance(record, dict)
                    and isinstance(record.get("step"), int)
                    and record["step"] <= step
                ):
                    kept.append(line + "\n")
            atomic_write_text(path, "".join(kept))
    for path in (run_dir / "eval").glob("step_*.json"):
        if not path.stem.removeprefix("step_").isdigit() or int(path.stem.removeprefix("step_")) > step:
            path.unlink()


def _tensorboard_writer(run_dir: Path, use_tensorboard: bool | str) -> Any:
    if not use_tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if use_tensorboard is True:
            raise ImportError("MetricsLogger: use_tensorboard=True needs `pip install tensorboard`") from None
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


class MetricsLogger:
    """Append-only JSONL metrics (flushed per line) with optional TensorBoard mirroring.

    Args:
        run_dir: the run directory; files are `metrics.jsonl` and `samples.jsonl` inside it (on resume, the
            run directory's logs were cut back to the checkpoint first: `cut_logs`).
        use_tensorboard: True, False, or "auto" (on when torch.utils.tensorboard imports).
    """

    def __init__(self, run_dir: str | os.PathLike, use_tensorboard: bool | str = "auto") -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.run_dir / METRICS, "a", encoding="utf-8")
        self._samples = open(self.run_dir / SAMPLES, "a", encoding="utf-8")
        self._tb = _tensorboard_writer(self.run_dir, use_tensorboard)

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Write one line {"step", "time", **metrics} (plain numbers: trainers log floats). Returns the record."""
        record = {"step": int(step), "time": time.time(), **metrics}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, global_step=int(step))
        return record

    def log_samples(
        self,
        step: int,
        prompts: Sequence[str],
        completions: Sequence[str],
        rewards: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        """Write one line per completion: {"step", "prompt", "completion", "reward"}."""
        if rewards is None:
            rewards = [None] * len(completions)
        elif isinstance(rewards, torch.Tensor):
            rewards = rewards.detach().float().cpu().tolist()
        if not len(prompts) == len(completions) == len(rewards):
            raise ValueError(
                f"log_samples: lengths differ: {len(prompts)} prompts, {len(completions)} completions, "
                f"{len(rewards)} rewards (repeat each prompt once per completion)"
            )
        for prompt, completion, reward in zip(prompts, completions, rewards):
            row = {"step": int(step), "prompt": prompt, "completion": completion, "reward": reward}
            self._samples.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._samples.flush()

    def close(self) -> None:
        self._metrics.close()
        self._samples.close()
        if self._tb is not None:
            self._tb.close()


class NullLogger:
    """Same methods as MetricsLogger; records nothing (every process but rank 0)."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        return None

    def log_samples(self, step: int, *rows: Any) -> None:
        return None

    def close(self) -> None:
        return None


_LABELS = {"tokens_per_s": "tok/s", "s_per_step": "s/step"}


class ProgressLine:
    """Prints `<prefix>: <label> done/total (rate unit/s)` to stderr at most every `every_s` seconds while a
    phase runs, and once when it ends; a phase shorter than `every_s` prints nothing (nor a process other
    than rank 0). One helper for every long phase: reference precompute, eval generation and judging."""

    def __init__(
        self,
        label: str,
        total: int,
        unit: str,
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        prefix: str = "polyalign",
    ) -> None:
        self.label, self.total, self.unit, self.every_s, self.clock = label, total, unit, every_s, clock
        self.prefix, self.enabled = prefix, is_main_process()
        self.done, self.start = 0, clock()
        self.last = self.start

    def advance(self, n: int) -> bool:
        """Count `n` more done; True when a period ended (a line was due), e.g. to flush a cache then."""
        self.done += n
        now = self.clock()
        finished = self.done >= self.total and now - self.start >= self.every_s
        if not (now - self.last >= self.every_s or finished):
            return False
        if self.enabled:
            rate = self.done / max(now - self.start, 1e-9)
            line = f"{self.prefix}: {self.label} {self.done}/{self.total} ({rate:.1f} {self.unit}/s)"
            print(line, file=sys.stderr, flush=True)
        self.last = now
        return True


class Progress:
    """A rich progress bar showing step/total and selected metrics; silent when disabled.

    Shown only on rank 0 when stdout is a TTY and `enabled` is not False (log files and tests get no
    escape codes). When not shown and `print_every > 0`, prints a plain line every `print_every` steps.
    """

    def __init__(
        self,
        total: int,
        keys: Sequence[str] = ("reward", "kl", "length", "tokens_per_s"),
        enabled: bool | None = None,
        print_every: int = 0,
    ) -> None:
        self.total, self.keys, self.print_every = total, tuple(keys), print_every
        self.enabled = enabled is not False and sys.stdout.isatty() and is_main_process()
        self._last_time: float | None = None
        self._bar = None
        if self.enabled:
            import rich.progress as rp

            columns = (rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn())
            self._bar = rp.Progress(*columns, rp.TimeRemainingColumn(), transient=False)
            self._task = self._bar.add_task("", total=total)
            self._bar.start()

    def describe(self, metrics: dict[str, Any], s_per_step: float | None) -> str:
        """The text shown next to the bar, e.g. 'reward 0.512 kl 0.031 s/step 1.20 ! length x2.6'."""
        parts = []
        for key in self.keys:
            if key in metrics and metrics[key] is not None:
                parts.append(f"{_LABELS.get(key, key)} {float(metrics[key]):.4g}")
        if s_per_step is not None:
            parts.append(f"s/step {s_per_step:.3g}")
        return " ".join(parts + alarms(metrics))  # reward-hacking monitors past their thresholds

    def update(self, step: int, metrics: dict[str, Any] | None = None) -> str:
        """Mark `step` (1-based count of finished steps) done; returns the description text."""
        now = time.perf_counter()
        s_per_step = None if self._last_time is None else now - self._last_time
        self._last_time = now
        text = self.describe(metrics or {}, s_per_step)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, description=text)
        elif self.print_every > 0 and step % self.print_every == 0:
            print0(f"step {step}/{self.total} {text}", flush=True)
        return text

    def print(self, message: str) -> None:
        """Print a line (rank 0) without breaking the live bar."""
        if self._bar is not None:
            self._bar.console.print(message, markup=False, highlight=False)
        else:
            print0(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
