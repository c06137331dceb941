"""TRL 1.16 `RLOOTrainer` on the online workload of BENCHMARKS.md; prints one JSON result line.

Per optimizer step: 4 prompts x 4 samples = 16 sequences (`per_device_train_batch_size=16` counts
completions in TRL, `gradient_accumulation_steps=1` makes one generation batch per optimizer step), 64 new
tokens at temperature 1, beta 0.05 against a reference copy, AdamW 3e-4 constant, fp32.
The step is split into phases by wrapping TRL's own calls: `generate` (policy.generate),
`old_logprob_forward` / `ref_forward` / `policy_forward` (`_get_per_token_logps_and_entropies` on the
policy without grad / on the reference / with grad), `backward` (accelerator.backward), `optimizer`
(optimizer.step); `other` is the rest (rewards, advantages, tokenisation, logging, grad clipping).

Run (one run per process, so peak RSS is this run's):
    python benchmarks/trl_rloo.py --size tiny
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import workloads as wl  # noqa: E402


def instrument(trainer, timer: common.PhaseTimer) -> None:
    """Wrap the generate / log-prob / backward calls of a built RLOOTrainer with phase timers."""
    policy = trainer.model
    generate = policy.generate

    def timed_generate(*args, **kwargs):
        with timer.phase("generate"):
            out = generate(*args, **kwargs)
        rows, new_tokens = out.shape[0], out.shape[1] - kwargs["input_ids"].shape[1]
        timer.count("generated_tokens", rows * new_tokens)
        return out

    def logprob_phase(model, *args, **kwargs) -> str:
        import torch

        if model is trainer.ref_model:
            return "ref_forward"
        return "policy_forward" if torch.is_grad_enabled() else "old_logprob_forward"

    policy.generate = timed_generate
    trainer._get_per_token_logps_and_entropies = timer.wrap(
        trainer._get_per_token_logps_and_entropies, logprob_phase
    )
    trainer.accelerator.backward = timer.wrap(trainer.accelerator.backward, "backward")


def run(size: str, steps: int, threads: int, profile_step: int | None = None) -> dict:
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer
    from trl_common import StepTimerCallback, TorchProfileCallback, common_args, save_model, setup_threads

    setup_threads(threads)
    timer = common.PhaseTimer()
    callbacks = [StepTimerCallback(timer)]
    if profile_step is not None:
        callbacks.append(TorchProfileCallback(profile_step))
    prompts = wl.rloo_prompts(wl.PROMPTS_PER_STEP * steps)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(size, f"{tmp}/model")
        config = RLOOConfig(
            **common_args(f"{tmp}/out", steps),
            per_device_train_batch_size=wl.PROMPTS_PER_STEP * wl.SAMPLES_PER_PROMPT,
            num_generations=wl.SAMPLES_PER_PROMPT,
            max_completion_length=wl.MAX_NEW_TOKENS,
            temperature=wl.TEMPERATURE,
            beta=wl.RLOO_BETA,
            num_iterations=1,
            shuffle_dataset=False,
        )
        assert config.generation_batch_size == 16 and config.steps_per_generation == 1, config
        trainer = RLOOTrainer(
            model=model_dir,
            reward_funcs=wl.reward_fn,
            args=config,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=wl.build_tokenizer(),
            callbacks=callbacks,
        )
        instrument(trainer, timer)
        trainer.train()
    summary = timer.summary(wl.WARMUP_STEPS)
    tokens = timer.median_count("generated_tokens", wl.WARMUP_STEPS)
    return {
        "lib": "trl",
        "workload": "rloo",
        "size": size,
        **summary,
        "generated_tokens_per_step": tokens,
        "gen_tokens_per_s": round(tokens / summary["median_s_per_step"], 1),
        "threads": threads,
        "versions": common.versions("torch", "transformers", "trl", "tokenizers"),
    }


def main() -> None:
    args = wl.benchmark_args("TRL RLOO speed benchmark (BENCHMARKS.md workload)")
    common.emit(run(args.size, args.steps, args.threads, args.torch_profile))


if __name__ == "__main__":
    main()
