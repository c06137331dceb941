"""TRL 1.16 `DPOTrainer` on the offline workload of BENCHMARKS.md; prints one JSON result line.

Per optimizer step: 8 chosen/rejected pairs (each side 55-91 tokens with EOS, mean 73), max length 128,
sigmoid loss, beta 0.1, reference forward every step (no precomputed reference log-probs), AdamW 3e-4
constant, fp32. Phases come from forward hooks on the policy and reference models (`policy_forward`,
`ref_forward`), a wrapper around accelerator.backward (`backward`) and the optimizer callbacks
(`optimizer`); `other` is collation, loss maths, logging and grad clipping.

Run (one run per process, so peak RSS is this run's):
    python benchmarks/trl_dpo.py --size tiny
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import workloads as wl  # noqa: E402


def time_forwards(module, name: str, timer: common.PhaseTimer) -> None:
    """Time every forward of `module` under `name` and count the non-padding tokens it sees."""
    starts: list[float] = []

    def pre_hook(mod, args, kwargs):
        starts.append(time.perf_counter())
        mask = kwargs.get("attention_mask")
        if mask is not None:
            timer.count(f"{name}_tokens", float(mask.sum()))

    def post_hook(mod, args, kwargs, output):
        timer.add(name, time.perf_counter() - starts.pop())

    module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    module.register_forward_hook(post_hook, with_kwargs=True)


def run(size: str, steps: int, threads: int, profile_step: int | None = None) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl_common import StepTimerCallback, TorchProfileCallback, common_args, save_model, setup_threads

    setup_threads(threads)
    timer = common.PhaseTimer()
    callbacks = [StepTimerCallback(timer)]
    if profile_step is not None:
        callbacks.append(TorchProfileCallback(profile_step))
    pairs = wl.dpo_pairs(wl.PAIRS_PER_STEP * steps)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(size, f"{tmp}/model")
        config = DPOConfig(
            **common_args(f"{tmp}/out", steps),
            per_device_train_batch_size=wl.PAIRS_PER_STEP,
            max_length=wl.DPO_MAX_LENGTH,
            beta=wl.DPO_BETA,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=False,
        )
        trainer = DPOTrainer(
            model=model_dir,
            args=config,
            train_dataset=Dataset.from_list(pairs),
            processing_class=wl.build_tokenizer(),
            callbacks=callbacks,
        )
        time_forwards(trainer.model, "policy_forward", timer)
        time_forwards(trainer.ref_model, "ref_forward", timer)
        trainer.accelerator.backward = timer.wrap(trainer.accelerator.backward, "backward")
        trainer.train()
    summary = timer.summary(wl.WARMUP_STEPS)
    tokens = timer.median_count("policy_forward_tokens", wl.WARMUP_STEPS)
    return {
        "lib": "trl",
        "workload": "dpo",
        "size": size,
        **summary,
        "train_tokens_per_step": tokens,
        "train_tokens_per_s": round(tokens / summary["median_s_per_step"], 1),
        "gen_tokens_per_s": None,
        "threads": threads,
        "versions": common.versions("torch", "transformers", "trl", "tokenizers"),
    }


def main() -> None:
    args = wl.benchmark_args("TRL DPO speed benchmark (BENCHMARKS.md workload)")
    common.emit(run(args.size, args.steps, args.threads, args.torch_profile))


if __name__ == "__main__":
    main()
