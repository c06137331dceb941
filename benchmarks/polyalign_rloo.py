"""polyalign's online RLOO trainer on the online workload of BENCHMARKS.md; prints one JSON result line.

The step is polyalign's own: `polyalign.train.online.train_step` on a `Run` built from the benchmark's
model, reference (a second `build_model` with the same seed), tokenizer, prompts and reward function,
with the BENCHMARKS.md settings in a `RunConfig` (rloo, k=4, 4 prompts per step, 64 new tokens,
temperature 1, beta 0.05, AdamW 3e-4 constant, one optimizer step per rollout batch, clip 1.0, fp32).
Only two things differ from `setup_run`: the objects are passed in instead of loaded by name, and step i
takes prompts [4i, 4i+4) in order (as TRL does with shuffle_dataset=False) instead of a seeded permutation.

Phases (same names as the TRL side): `generate` (generate_phase), `ref_forward` (the reference
log-prob forward), `policy_forward` (the policy log-prob forward with grad), `backward`
(`Tensor.backward`), `optimizer` (`optimizer.step()`); `other` is the rest (reward, KL, advantages, loss,
grad clipping). There is no `old_logprob_forward`: on-policy, the sampler's log-probs are used.

Run (one run per process, so peak RSS is this run's):
    python benchmarks/polyalign_rloo.py --size tiny
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import workloads as wl  # noqa: E402


def build_config(run_dir: str, steps: int, threads: int, engine_path: str):
    from polyalign.config import (
        AlgoConfig,
        EvalConfig,
        ModelConfig,
        OutputConfig,
        RewardConfig,
        RolloutConfig,
        RunConfig,
        TrainConfig,
    )

    return RunConfig(
        model=ModelConfig(policy="benchmark", dtype="float32", threads=threads),
        rollout=RolloutConfig(
            engine="hf",
            samples_per_prompt=wl.SAMPLES_PER_PROMPT,
            prompts_per_step=wl.PROMPTS_PER_STEP,
            max_new_tokens=wl.MAX_NEW_TOKENS,
            temperature=wl.TEMPERATURE,
        ),
        reward=RewardConfig(functions={"benchmark": 1.0}),
        algo=AlgoConfig(name="rloo", kl_coef=wl.RLOO_BETA, updates_per_batch=1),
        train=TrainConfig(
            steps=steps, lr=wl.LR, schedule="constant", weight_decay=wl.WEIGHT_DECAY,
            max_grad_norm=wl.MAX_GRAD_NORM, micro_batch_size=0, seed=wl.SEED,
        ),
        eval=EvalConfig(every=0),
        output=OutputConfig(run_dir=run_dir, checkpoint_every=0, sample_every=0, progress=False, report=False),
    )  # fmt: skip


def build_run(size: str, steps: int, threads: int, run_dir: str, engine_path: str):
    """A polyalign `Run` holding the benchmark objects; prompts are consumed in order."""
    import torch

    from polyalign.data.prompts import PromptSet
    from polyalign.rollout.hf import HFEngine
    from polyalign.train.logging import NullLogger, Progress
    from polyalign.train.loop import build_optimizer, seed_everything
    from polyalign.train.run import Run

    class OrderedRun(Run):
        def next_prompts(self, step: int) -> tuple[list[str], dict]:
            n = self.cfg.rollout.prompts_per_step
            return self.prompts.prompts[step * n : (step + 1) * n], {}

    def reward(prompts, completions, **columns):
        return torch.tensor(wl.reward_fn(prompts, completions, **columns), dtype=torch.float32)

    cfg = build_config(run_dir, steps, threads, engine_path)
    torch.set_num_threads(threads)
    seed_everything(wl.SEED)
    tokenizer = wl.build_tokenizer()
    policy = wl.build_model(size)
    ref = wl.build_model(size, verbose=False).eval().requires_grad_(False)
    prompts = PromptSet(wl.rloo_prompts(wl.PROMPTS_PER_STEP * steps, tokenizer=tokenizer))
    optimizer = build_optimizer(list(policy.parameters()), lr=wl.LR, weight_decay=wl.WEIGHT_DECAY)
    engine = HFEngine(policy, tokenizer, add_special_tokens=False, fast_decode=engine_path == "fast")
    progress = Progress(total=steps, enabled=False)
    return OrderedRun(
        cfg, Path(run_dir), policy, ref, tokenizer, engine, {"benchmark": reward}, prompts, None,
        optimizer, NullLogger(), progress,
    )  # fmt: skip


def instrument(run, timer: common.PhaseTimer) -> None:
    """Time polyalign's own calls: generate_phase, the log-prob forwards, backward and optimizer.step."""
    import torch

    from polyalign.train import online

    generate = online.generate_phase

    def timed_generate(run_, step):
        with timer.phase("generate"):
            rollout = generate(run_, step)
        timer.count("generated_tokens", float(rollout.completion_mask.sum()))
        return rollout

    def logprob_phase(model, *args, **kwargs) -> str:
        return "ref_forward" if model is run.ref else "policy_forward"

    online.generate_phase = timed_generate
    online.completion_logprobs = timer.wrap(online.completion_logprobs, logprob_phase)
    torch.Tensor.backward = timer.wrap(torch.Tensor.backward, "backward")
    run.optimizer.step = timer.wrap(run.optimizer.step, "optimizer")


def run_benchmark(size: str, steps: int, threads: int, engine_path: str, profile_step: int | None) -> dict:

    from polyalign.train import online

    timer = common.PhaseTimer()
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(size, steps, threads, tmp, engine_path)
        instrument(run, timer)
        common.run_timed_steps(lambda step: online.train_step(run, step), steps, timer, profile_step)
    summary = timer.summary(wl.WARMUP_STEPS)
    tokens = timer.median_count("generated_tokens", wl.WARMUP_STEPS)
    return {
        "lib": "polyalign",
        "workload": "rloo",
        "size": size,
        **summary,
        "generated_tokens_per_step": tokens,
        "gen_tokens_per_s": round(tokens / summary["median_s_per_step"], 1),
        "threads": threads,
        "decode_path": engine_path,
        "versions": common.versions("torch", "transformers", "tokenizers"),
    }


def main() -> None:
    args = wl.benchmark_args(
        "polyalign RLOO speed benchmark (BENCHMARKS.md workload)",
        lambda p: p.add_argument(
            "--decode", choices=("fast", "hf"), default="fast", help="decode path of HFEngine"
        ),
    )
    common.emit(run_benchmark(args.size, args.steps, args.threads, args.decode, args.torch_profile))


if __name__ == "__main__":
    main()
