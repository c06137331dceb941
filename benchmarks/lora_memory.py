"""Memory of one DPO training step: full fine-tune (policy + frozen reference copy + AdamW on every weight)
against LoRA (one model, the reference = the base with the adapter disabled, AdamW on the adapter only).

Model: the benchmark Llama of `workloads.build_model` (default "small": 27.8M parameters, fp32, tied
embeddings). Batch: 8 random preference pairs (prompt 24 tokens, chosen/rejected 64 tokens), so each step is
a reference forward of 16 rows under no_grad, a policy forward of 16 rows, `dpo_loss`, backward, AdamW step;
all log-probs come from `polyalign.logprobs.completion_logprobs`.

Each variant runs in a fresh process (`common.run_isolated`), reporting
- tensor bytes: unique storages of every parameter (policy and reference), gradient and optimizer-state
  tensor after the last step (deterministic);
- peak RSS (ru_maxrss) of the process (run with MALLOC_MMAP_THRESHOLD_=65536, so freed tensors leave the RSS), and its peak RSS once the libraries were imported (before any model
  was built) and once the models and optimizer were set up (before the first step): `peak - import` is what
  models + training add, `peak - setup` what the steps add (activations, gradients, AdamW state).

End to end (`--runs`): the same "small" model (random init, seed 0) and its benchmark tokenizer (vocab 8192;
the stories260K tokenizer has 512 tokens and does not fit this model) saved to a temporary folder, then each
case below run through `python -m polyalign.cli train` in a fresh child process, full vs `--model.lora={r: 16,
alpha: 32}`; the child's own peak RSS comes from `os.wait4`, its wall seconds from the clock and its s/step
from the run's metrics.jsonl:
- dpo (precompute): configs/offline/dpo.yaml, 3 steps, on the first 48 rows of the built-in English DPO demo;
  the reference log-probs are cached before training, from the policy itself (no reference model is held);
- dpo (live ref): the same with `--reference.precompute=false`: the full run holds a frozen deepcopy for
  the whole run, LoRA the adapter-disabled view of its one model;
- rloo: the online defaults (RLOO, k 4, 2 updates per batch), lexicon_sentiment reward, 2 steps of 8 prompts,
  32 new tokens.

Run (about 1 minute on one thread; `--runs` about 3 minutes):
    python benchmarks/lora_memory.py                  # both variants, table + results/lora_memory.json
    python benchmarks/lora_memory.py --variant lora   # one variant in this process: one JSON line
    python benchmarks/lora_memory.py --runs           # the trainers end to end: results/lora_memory_runs.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import workloads as wl  # noqa: E402

VARIANTS = ("full", "lora")
PAIRS, PROMPT_TOKENS, COMPLETION_TOKENS = 8, 24, 64
LORA_R, LORA_ALPHA = 16, 32.0
OUT = Path(__file__).resolve().parent / "results" / "lora_memory.json"
RUNS_OUT = OUT.with_name("lora_memory_runs.json")
MIB = 2**20
REPO = Path(__file__).resolve().parent.parent
LORA_OVERRIDE = f"--model.lora={{r: {LORA_R}, alpha: {LORA_ALPHA:g}}}"
DPO_ROWS = 48  # first rows of the built-in English DPO demo (300), to keep the reference pass short
COMMON_OVERRIDES = ["--eval.every=0", "--output.report=false", "--output.progress=false", "--model.threads=1"]
CASES = {  # name -> (config file or None for the online defaults, overrides)
    "dpo (precompute)": ("configs/offline/dpo.yaml", ["--train.steps=3", "--train.warmup_steps=0"]),
    "dpo (live ref)": (
        "configs/offline/dpo.yaml",
        ["--train.steps=3", "--train.warmup_steps=0", "--reference.precompute=false"],
    ),
    "rloo": (
        None,
        [
            "--reward.functions={lexicon_sentiment: 1.0}",
            "--train.steps=2",
            "--rollout.prompts_per_step=8",
            "--rollout.max_new_tokens=32",
        ],
    ),
}


def _batch(vocab_size: int, seed: int = wl.SEED):
    """Random pairs with right-padded completions of varying length: prompt (B, Tp), chosen/rejected (B, T)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab_size, (PAIRS, PROMPT_TOKENS), generator=g)
    sides = []
    for _ in range(2):
        ids = torch.randint(3, vocab_size, (PAIRS, COMPLETION_TOKENS), generator=g)
        lengths = torch.randint(COMPLETION_TOKENS // 2, COMPLETION_TOKENS + 1, (PAIRS,), generator=g)
        mask = (torch.arange(COMPLETION_TOKENS)[None, :] < lengths[:, None]).long()
        sides.append((ids.masked_fill(mask == 0, 0), mask))
    return prompt_ids, torch.ones_like(prompt_ids), sides


def _setup(variant: str, size: str):
    """(policy, reference, optimizer) for a variant."""
    import copy

    import torch

    from polyalign.config import LoraConfig
    from polyalign.lora import apply_lora, reference_view

    model = wl.build_model(size, verbose=False).train()
    if variant == "full":
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        policy = model
    else:
        policy = apply_lora(model, LoraConfig(r=LORA_R, alpha=LORA_ALPHA))
        reference = reference_view(policy)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=wl.LR, betas=wl.ADAM_BETAS, eps=wl.ADAM_EPS)
    return policy, reference, optimizer


def _pair_logprobs(model, prompt_ids, prompt_mask, sides):
    """Sequence log-probs (2B,) of [chosen; rejected] from one forward of 2B rows."""
    import torch

    from polyalign.logprobs import completion_logprobs

    ids = torch.cat([sides[0][0], sides[1][0]])
    mask = torch.cat([sides[0][1], sides[1][1]])
    two = (torch.cat([prompt_ids, prompt_ids]), torch.cat([prompt_mask, prompt_mask]))
    return completion_logprobs(model, *two, ids, mask).sum(-1)


def _train_step(policy, reference, optimizer, batch) -> float:
    import torch

    from polyalign.losses import dpo_loss

    prompt_ids, prompt_mask, sides = batch
    with torch.no_grad():
        ref = _pair_logprobs(reference, prompt_ids, prompt_mask, sides)
    logps = _pair_logprobs(policy, prompt_ids, prompt_mask, sides)
    loss, _ = dpo_loss(logps[:PAIRS], logps[PAIRS:], ref[:PAIRS], ref[PAIRS:], beta=wl.DPO_BETA)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _tensor_bytes(policy, reference, optimizer) -> dict[str, int]:
    """Bytes of unique storages: parameters (policy and reference; shared weights counted once), gradients
    and optimizer state."""
    seen: set[int] = set()

    def unique_bytes(tensors) -> int:
        total = 0
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    params = unique_bytes(list(policy.parameters()) + list(reference.parameters()))
    grads = unique_bytes(p.grad for p in policy.parameters() if p.grad is not None)
    state = unique_bytes(t for s in optimizer.state.values() for t in s.values() if hasattr(t, "nbytes"))
    return {"params": params, "grads": grads, "optimizer_state": state, "total": params + grads + state}


def run_variant(variant: str, size: str, steps: int, threads: int) -> dict:
    import torch

    import polyalign.lora  # noqa: F401  (imports peft, so the import baseline is the same for both)
    from polyalign.lora import trainable_summary

    torch.set_num_threads(threads)
    import_rss = common.peak_rss_mib()
    policy, reference, optimizer = _setup(variant, size)
    batch = _batch(policy.config.vocab_size)
    setup_rss = common.peak_rss_mib()
    start, losses = time.perf_counter(), []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=False)  # keep the gradients allocated: they are part of a step
        losses.append(_train_step(policy, reference, optimizer, batch))
    seconds = (time.perf_counter() - start) / steps
    return {
        "lib": "polyalign",
        "variant": variant,
        "size": size,
        "steps": steps,
        "threads": threads,
        "tensor_bytes": _tensor_bytes(policy, reference, optimizer),
        "params": trainable_summary(policy),
        "peak_rss_mib": round(common.peak_rss_mib(), 1),
        "import_rss_mib": round(import_rss, 1),
        "setup_rss_mib": round(setup_rss, 1),
        "s_per_step": round(seconds, 3),
        "losses": [round(x, 5) for x in losses],
    }


def _table(results: dict[str, dict]) -> str:
    full, lora = results["full"], results["lora"]
    rows = [("parameters (policy + ref)", "params"), ("gradients", "grads")]
    rows += [("AdamW state", "optimizer_state"), ("tensor total", "total")]
    lines = [f"{'MiB':<28}{'full':>10}{'lora':>10}{'lora/full':>11}"]
    for label, key in rows:
        a, b = full["tensor_bytes"][key] / MIB, lora["tensor_bytes"][key] / MIB
        lines.append(f"{label:<28}{a:>10.1f}{b:>10.1f}{(b / a if a else 0):>11.3f}")
    for label, fn in (
        ("peak RSS", lambda r: r["peak_rss_mib"]),
        ("peak RSS - after imports", lambda r: r["peak_rss_mib"] - r["import_rss_mib"]),
        ("peak RSS - after setup", lambda r: r["peak_rss_mib"] - r["setup_rss_mib"]),
    ):
        a, b = fn(full), fn(lora)
        lines.append(f"{label:<28}{a:>10.1f}{b:>10.1f}{b / a:>11.3f}")
    lines.append(f"{'trainable parameters':<28}{full['params']['trainable_params']:>10,}")
    lines[-1] += f"{lora['params']['trainable_params']:>10,}"
    lines.append(f"{'s/step':<28}{full['s_per_step']:>10.3f}{lora['s_per_step']:>10.3f}")
    return "\n".join(lines)


def save_model_dir(folder: Path, size: str) -> Path:
    """Save the benchmark model of `size` (random init, seed `wl.SEED`) and its tokenizer to `folder`."""
    model = wl.build_model(size, seed=wl.SEED, verbose=False)
    tokenizer = wl.build_tokenizer()
    if len(tokenizer) != model.config.vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, model vocab {model.config.vocab_size}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _dpo_subset(path: Path) -> Path:
    from polyalign.data.preference import BUILTIN

    rows = json.loads(Path(BUILTIN["builtin:dpo-demo-en"][0]).read_text(encoding="utf-8"))
    path.write_text(json.dumps(rows[:DPO_ROWS], ensure_ascii=False), encoding="utf-8")
    return path


# Runs `-m MODULE ARGS` or `-c CODE` and prints the process's own peak RSS (VmHWM) at exit. A child's
# ru_maxrss starts at its parent's RSS at fork, which hid the imports-only baseline under this script's own.
_REPORT_PEAK = """
import atexit, runpy, sys
def peak():
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM"))
    print("VMHWM_KB", line.split()[1], flush=True)
atexit.register(peak)
flag, target = sys.argv[1], sys.argv[2]
sys.argv = [target, *sys.argv[3:]]
runpy.run_module(target, run_name="__main__") if flag == "-m" else exec(target)
"""


def measure_child(argv: list[str], log: Path) -> dict:
    """Run `argv` (`python -m MODULE ARGS` or `python -c CODE`) in a fresh child (output to `log`); its own
    peak RSS (VmHWM, MiB) and wall seconds."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    start = time.perf_counter()
    with log.open("w") as out:
        command = [argv[0], "-c", _REPORT_PEAK, *argv[1:]]
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    peak_kb = [int(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("VMHWM_KB")]
    return {"peak_rss_mib": round(peak_kb[-1] / 1024, 1), "wall_s": round(time.perf_counter() - start, 1)}


def _s_per_step(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    times = sorted(r["time/step"] for r in rows if "time/step" in r)
    return round(times[len(times) // 2], 3)


def run_case(case: str, variant: str, model_dir: Path, data: Path, work: Path) -> dict:
    config, overrides = CASES[case]
    slug = "".join(ch if ch.isalnum() else "-" for ch in case)
    run_dir = work / f"{slug}-{variant}"
    argv = [sys.executable, "-m", "polyalign.cli", "train", *([config] if config else [])]
    argv += [f"--model.policy={model_dir}", f"--output.run_dir={run_dir}", *COMMON_OVERRIDES, *overrides]
    argv += [f"--data.train={data}"] if config else []
    argv += [LORA_OVERRIDE] if variant == "lora" else []
    result = measure_child(argv, work / f"{run_dir.name}.log")
    shown = [a.replace(str(work), "<tmp>") for a in argv[3:]]
    return {**result, "s_per_step": _s_per_step(run_dir), "argv": shown}


def run_end_to_end(size: str, out: Path) -> dict:
    """Every case x variant through the CLI; prints the table and writes `out`."""
    with tempfile.TemporaryDirectory(prefix="lora_memory_") as tmp:
        work = Path(tmp)
        model_dir = save_model_dir(work / f"model-{size}", size)
        data = _dpo_subset(work / "dpo_pairs.json")
        imports = [
            sys.executable,
            "-c",
            "import polyalign.train.offline, polyalign.train.online, polyalign.lora",
        ]
        baseline = measure_child(imports, work / "imports.log")
        results = {c: {v: run_case(c, v, model_dir, data, work) for v in VARIANTS} for c in CASES}
    print(_runs_table(results, baseline["peak_rss_mib"]))
    summary = {
        "workload": f"polyalign train on the {size} benchmark Llama ({wl.EXPECTED_PARAMS[size]:,} parameters)",
        "dpo_data": f"first {DPO_ROWS} rows of builtin:dpo-demo-en",
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "override": LORA_OVERRIDE},
        "threads": 1,
        "versions": common.versions("torch", "transformers", "peft"),
        "malloc_mmap_threshold": str(64 * 1024),
        "import_peak_rss_mib": baseline["peak_rss_mib"],
        "load_1min_at_end": round(os.getloadavg()[0], 2),
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")
    return summary


def _runs_table(results: dict[str, dict], import_mib: float) -> str:
    head = f"{'run':<18}{'RSS full':>10}{'RSS lora':>10}{'lora/full':>10}{'above imports':>16}"
    lines = [head + f"{'wall s':>14}{'s/step':>14}", f"(imports alone: {import_mib:.1f} MiB peak RSS)"]
    for case, r in results.items():
        full, lora = r["full"], r["lora"]
        a, b = full["peak_rss_mib"], lora["peak_rss_mib"]
        above = f"{a - import_mib:.0f} / {b - import_mib:.0f}"
        wall = "{:.1f} / {:.1f}".format(full["wall_s"], lora["wall_s"])
        step = "{:.2f} / {:.2f}".format(full["s_per_step"], lora["s_per_step"])
        lines.append(f"{case:<18}{a:>10.1f}{b:>10.1f}{b / a:>10.3f}{above:>16}{wall:>14}{step:>14}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process")
    parser.add_argument("--size", choices=sorted(wl.MODEL_SIZES), default="small")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", action="store_true", help="the trainers end to end (polyalign train)")
    parser.add_argument("--out", type=Path, help=f"default {OUT.name}, or {RUNS_OUT.name} with --runs")
    args = parser.parse_args()
    if args.runs:
        run_end_to_end(args.size, args.out or RUNS_OUT)
        return
    args.out = args.out or OUT
    if args.variant:
        common.emit(run_variant(args.variant, args.size, args.steps, args.threads))
        return
    common_args = ["--size", args.size, "--steps", str(args.steps), "--threads", str(args.threads)]
    # glibc serves allocations >= 64 KiB by mmap and unmaps them on free, so RSS follows live tensor memory
    # instead of keeping freed activations in its heap (measured here: RSS peaks then repeat within a few MiB).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    results = {v: common.run_isolated(__file__, ["--variant", v, *common_args]) for v in VARIANTS}
    print(_table(results))
    summary = {
        "workload": f"DPO step, {PAIRS} pairs, prompt {PROMPT_TOKENS} + completion <= {COMPLETION_TOKENS} tokens",
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "target_modules": "all-linear"},
        "versions": common.versions("torch", "transformers", "peft"),
        "malloc_mmap_threshold": os.environ["MALLOC_MMAP_THRESHOLD_"],
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
