"""TRL-side plumbing shared by `trl_rloo.py` and `trl_dpo.py`: the step-timing callback, the common
`TrainingArguments` overrides that make TRL run the BENCHMARKS.md settings (fp32, no gradient
checkpointing, AdamW at a constant lr) and saving the random-init model where TRL can load it and its
reference copy. Imports TRL and transformers, so the polyalign side never imports this file.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import workloads as wl
from common import PhaseTimer
from transformers import TrainerCallback


class StepTimerCallback(TrainerCallback):
    """Brackets each optimizer step with `timer.begin_step()` / `end_step()` and times `optimizer.step()`."""

    def __init__(self, timer: PhaseTimer) -> None:
        self.timer = timer
        self._optimizer_start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.timer.begin_step()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._optimizer_start = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.timer.add("optimizer", time.perf_counter() - self._optimizer_start)

    def on_step_end(self, args, state, control, **kwargs):
        self.timer.end_step()


class TorchProfileCallback(TrainerCallback):
    """Runs `torch.profiler` over one optimizer step and prints the top operators by self CPU time to stderr."""

    def __init__(self, step: int, rows: int = 20) -> None:
        self.step, self.rows, self._profiler = step, rows, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            table = self._profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=self.rows)
            print(f"torch.profiler, optimizer step {self.step}:\n{table}", file=sys.stderr)
            self._profiler = None


def common_args(output_dir: str, steps: int) -> dict:
    """TrainingArguments shared by both TRL workloads; fp32 and no checkpointing set explicitly."""
    return dict(
        output_dir=output_dir,
        max_steps=steps,
        learning_rate=wl.LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=wl.WEIGHT_DECAY,
        adam_beta1=wl.ADAM_BETAS[0],
        adam_beta2=wl.ADAM_BETAS[1],
        adam_epsilon=wl.ADAM_EPS,
        max_grad_norm=wl.MAX_GRAD_NORM,
        gradient_accumulation_steps=1,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=5,
        disable_tqdm=True,
        seed=wl.SEED,
        model_init_kwargs={"dtype": torch.float32},
    )


def save_model(size: str, directory: str) -> str:
    """Build the benchmark model and tokenizer and save them to `directory` (TRL loads policy and reference
    from the same path, so both start from identical weights)."""
    wl.build_model(size).save_pretrained(directory)
    wl.build_tokenizer().save_pretrained(directory)
    return str(Path(directory))


def setup_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(wl.SEED)
