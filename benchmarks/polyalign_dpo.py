"""polyalign's offline DPO trainer on the offline workload of BENCHMARKS.md; prints one JSON result line.

The step is polyalign's own: `polyalign.train.offline.train_step` on an `OfflineRun` built from the
benchmark's model, reference (a second `build_model` with the same seed, forwarded every step: no cached
reference log-probs, as TRL runs with precompute_ref_log_probs=False), tokenizer and pairs (tokenized by
`polyalign.data.chat.tokenize_preference`: no BOS, EOS appended to each completion, max length 128), with
the BENCHMARKS.md settings in an `OfflineRunConfig` (dpo, sigmoid loss, beta 0.1, 8 pairs per step in order,
AdamW 3e-4 constant, clip 1.0, fp32). Only the objects are passed in instead of loaded by name.

Phases (same names as the TRL side): `ref_forward` (reference log-probs of chosen and rejected, one
concatenated forward under no_grad), `policy_forward` (the policy's concatenated chosen + rejected
forward), `backward` (`Tensor.backward`), `optimizer` (`optimizer.step()`); `other` is the rest
(collation, loss, grad clipping).

Run (one run per process, so peak RSS is this run's):
    python benchmarks/polyalign_dpo.py --size tiny
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import workloads as wl  # noqa: E402


def build_config(run_dir: str, steps: int, threads: int):
    from polyalign.config import ModelConfig, OutputConfig
    from polyalign.config_offline import (
        LossConfig,
        OfflineDataConfig,
        OfflineEvalConfig,
        OfflineRunConfig,
        OfflineTrainConfig,
        ReferenceConfig,
    )

    return OfflineRunConfig(
        model=ModelConfig(policy="benchmark", dtype="float32", threads=threads),
        data=OfflineDataConfig(max_length=wl.DPO_MAX_LENGTH, max_prompt_length=wl.DPO_MAX_LENGTH - 1,
                               shuffle=False, use_chat_template=False),
        loss=LossConfig(name="dpo", beta=wl.DPO_BETA),
        reference=ReferenceConfig(precompute=False),
        train=OfflineTrainConfig(
            steps=steps, batch_size=wl.PAIRS_PER_STEP, micro_batch_size=0, lr=wl.LR, schedule="constant",
            weight_decay=wl.WEIGHT_DECAY, max_grad_norm=wl.MAX_GRAD_NORM, seed=wl.SEED,
        ),
        eval=OfflineEvalConfig(every=0),
        output=OutputConfig(run_dir=run_dir, checkpoint_every=0, progress=False, report=False),
    )  # fmt: skip


def build_run(size: str, steps: int, threads: int, run_dir: str):
    """A polyalign `OfflineRun` holding the benchmark objects; pairs are consumed in order."""
    import torch

    from polyalign.data.chat import tokenize_preference
    from polyalign.data.preference import PreferencePair
    from polyalign.train.logging import NullLogger, Progress
    from polyalign.train.loop import build_optimizer, seed_everything
    from polyalign.train.offline_data import PairSet
    from polyalign.train.offline_run import OfflineRun

    cfg = build_config(run_dir, steps, threads)
    torch.set_num_threads(threads)
    seed_everything(wl.SEED)
    tokenizer = wl.build_tokenizer()
    pairs = [
        PreferencePair(p["prompt"], p["chosen"], p["rejected"], None, "benchmarks/assets/dpo_pairs.jsonl", i)
        for i, p in enumerate(wl.dpo_pairs(wl.PAIRS_PER_STEP * steps))
    ]
    d = cfg.data
    tokenized = [
        tokenize_preference(tokenizer, p, d.max_length, d.max_prompt_length, use_chat_template=False)
        for p in pairs
    ]
    model = wl.build_model(size)
    ref = wl.build_model(size, verbose=False).eval().requires_grad_(False)
    optimizer = build_optimizer(model.named_parameters(), lr=wl.LR, weight_decay=wl.WEIGHT_DECAY)
    return OfflineRun(
        cfg, Path(run_dir), model, ref, tokenizer, PairSet(tokenized), None, optimizer, NullLogger(),
        Progress(total=steps, enabled=False), steps, {},
    )  # fmt: skip


def instrument(run, timer: common.PhaseTimer) -> None:
    """Time polyalign's own calls: the reference and policy log-prob forwards, backward, optimizer.step."""
    import torch

    from polyalign.train import offline

    policy_logprobs = offline.pair_logprobs

    def timed_policy(model, batch):
        timer.count("policy_forward_tokens", float(2 * batch.prompt_mask.sum() + batch.chosen_mask.sum())
                    + float(batch.rejected_mask.sum()))  # fmt: skip
        with timer.phase("policy_forward"):
            return policy_logprobs(model, batch)

    offline.pair_logprobs = timed_policy
    offline.reference_sequence_logprobs = timer.wrap(offline.reference_sequence_logprobs, "ref_forward")
    torch.Tensor.backward = timer.wrap(torch.Tensor.backward, "backward")
    run.optimizer.step = timer.wrap(run.optimizer.step, "optimizer")


def run_benchmark(size: str, steps: int, threads: int, profile_step: int | None) -> dict:

    from polyalign.train import offline

    timer = common.PhaseTimer()
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(size, steps, threads, tmp)
        instrument(run, timer)
        common.run_timed_steps(lambda step: offline.train_step(run, step), steps, timer, profile_step)
    summary = timer.summary(wl.WARMUP_STEPS)
    tokens = timer.median_count("policy_forward_tokens", wl.WARMUP_STEPS)
    return {
        "lib": "polyalign",
        "workload": "dpo",
        "size": size,
        **summary,
        "train_tokens_per_step": tokens,
        "train_tokens_per_s": round(tokens / summary["median_s_per_step"], 1),
        "gen_tokens_per_s": None,
        "threads": threads,
        "versions": common.versions("torch", "transformers", "tokenizers"),
    }


def main() -> None:
    args = wl.benchmark_args("polyalign DPO speed benchmark (BENCHMARKS.md workload)")
    common.emit(run_benchmark(args.size, args.steps, args.threads, args.torch_profile))


if __name__ == "__main__":
    main()
