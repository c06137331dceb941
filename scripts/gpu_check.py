"""The GPU check of the vLLM rollout engine, in one run on a lent GPU (H100/H200), under about 8 minutes.

    pip install -e '.[vllm]'          # beforehand, on the GPU machine (this script installs nothing)
    python scripts/gpu_check.py       # results under $OUT if set, else ./gpu_results
    python scripts/gpu_check.py --cpu # a dry run of everything that does not need vLLM, tiny, on CPU

Stages, in order of importance, each in its own process (one failure or crash does not stop the rest, and
every vLLM engine starts clean) and each under a time limit within an overall budget:
1. device: torch / CUDA / vLLM / transformers versions and the GPU.
2. pytest -m gpu tests/test_vllm.py: the engine's contract, seeds and split independence, log-probs against
   the trainer's, weights pushed after an optimizer step.
3. probe: HF engine vs vLLM engine on the same prompts (builtin:stories, k=4, 64 and 256 new tokens):
   completion tokens per second; and the log-prob mismatch of each engine against the trainer's forward in
   the model's dtype and in float32. On stories260K (bf16, fp32) and on a random-init ~280M-parameter Llama
   built locally (bf16, with CUDA graphs).
4. train: wall-clock of bf16 RLOO steps (polyalign.train.online) with each engine on the ~280M Llama.
Writes results.json, results.md (tables) and stages.tar.gz (one log and JSON per stage).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (stage, its arguments, time limit in seconds); on CPU the same stages run tiny and without vLLM.
PLAN = [
    ("pytest", [], 170),
    ("probe", ["--model=stories", "--dtype=bfloat16", "--speed=1", "--eager=1"], 80),
    ("probe", ["--model=big", "--dtype=bfloat16", "--speed=1", "--eager=0"], 160),
    ("probe", ["--model=stories", "--dtype=float32", "--speed=0", "--eager=1"], 60),
    ("train", ["--engine=hf"], 70),
    ("train", ["--engine=vllm"], 110),
    ("probe", ["--model=big", "--dtype=float32", "--speed=0", "--eager=1"], 80),
]
BIG = dict(  # ~280M parameters; the stories260K tokenizer's vocabulary, so every sampled id decodes
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=8,
    vocab_size=512,
    max_position_embeddings=2048,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
TINY = dict(
    BIG,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


# ---------------------------------------------------------------- helpers used inside stages


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _model(name: str, dtype: str, device: str, cpu: bool):
    """(policy, tokenizer, vLLM attention backend) for `stories` or the locally built `big` Llama."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from polyalign.models import DTYPES, load_policy, load_tokenizer

    if name == "stories":  # head size 8: FlexAttention is the vLLM backend that takes it in every version
        policy, tokenizer = load_policy("stories260K", dtype=dtype, device=device)
        return policy.eval(), tokenizer, os.environ.get("POLYALIGN_VLLM_TEST_BACKEND", "FLEX_ATTENTION")
    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(**(TINY if cpu else BIG))).to(DTYPES[dtype]).to(device)
    return policy.eval(), load_tokenizer("stories260K"), ""


def _timed(engine, prompts: list[str], n: int, tokens: int, device: str) -> dict:
    from polyalign.types import Sampling

    _sync(device)
    start = time.perf_counter()
    rollout = engine.generate(prompts, n, Sampling(max_new_tokens=tokens, temperature=1.0, seed=0))
    _sync(device)
    seconds = time.perf_counter() - start
    generated = int(rollout.completion_mask.sum())
    return {"seconds": round(seconds, 3), "tokens": generated, "tokens_per_s": round(generated / seconds, 1)}


def _mismatch(engine, policy, reference, prompts: list[str]) -> dict:
    """Sampler log-probs against the trainer's forward in the policy's dtype and in float32."""
    import torch

    from polyalign.logprobs import completion_logprobs
    from polyalign.rollout.mismatch import logprob_mismatch
    from polyalign.types import Sampling

    r = engine.generate(prompts, 4, Sampling(max_new_tokens=64, temperature=1.0, seed=1))
    out = {}
    for label, model in (("trainer_same_dtype", policy), ("trainer_float32", reference)):
        with torch.no_grad():
            trainer = completion_logprobs(
                model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask
            )
        out[label] = {
            k: round(v, 6) for k, v in logprob_mismatch(r.logprobs, trainer, r.completion_mask).items()
        }
    return out


# ---------------------------------------------------------------- stages (each runs in its own process)


def stage_device(args) -> dict:
    import importlib.metadata as md

    import torch

    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    for package in ("vllm", "transformers", "polyalign"):
        with contextlib.suppress(md.PackageNotFoundError):
            info[package] = md.version(package)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    info["commit"] = commit.stdout.strip()
    return info


def stage_pytest(args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "tests/test_vllm.py",
        "-q",
        "-rA",
        "-p",
        "no:cacheprovider",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout[-20000:], proc.stderr[-5000:])
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else "", "ok": proc.returncode == 0}


def stage_probe(args) -> dict:
    import torch

    from polyalign.data.prompts import load_prompts
    from polyalign.rollout.hf import HFEngine

    device = "cpu" if args.cpu else "cuda"
    policy, tokenizer, backend = _model(args.model, args.dtype, device, args.cpu)
    params = sum(p.numel() for p in policy.parameters())
    prompts = load_prompts("builtin:stories").prompts[: 4 if args.cpu else 64]
    lengths = (8, 16) if args.cpu else (64, 256)
    reference = policy if args.dtype == "float32" else copy.deepcopy(policy).float()
    engines = {"hf": HFEngine(policy, tokenizer)}
    result: dict = {"model": args.model, "dtype": args.dtype, "parameters": params, "prompts": len(prompts)}
    if not args.cpu:
        from polyalign.recipes.vllm.engine import VLLMEngine

        start = time.perf_counter()
        engines["vllm"] = VLLMEngine(
            policy, tokenizer, gpu_memory_utilization=0.3, enforce_eager=bool(args.eager),
            max_model_len=min(1024, policy.config.max_position_embeddings), attention_backend=backend,
        )  # fmt: skip
        result["vllm_start_s"] = round(time.perf_counter() - start, 1)
    for name, engine in engines.items():
        if args.speed:
            _timed(engine, prompts[:2], 2, 8, device)  # warm-up (kernels, graphs, allocator)
            result[f"speed_{name}"] = {str(t): _timed(engine, prompts, 4, t, device) for t in lengths}
            print(name, result[f"speed_{name}"], flush=True)
        result[f"mismatch_{name}"] = _mismatch(engine, policy, reference, prompts[:16])
        print(name, result[f"mismatch_{name}"], flush=True)
    if "vllm" in engines:
        engines["vllm"].close()
    del reference
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def stage_train(args) -> dict:
    from polyalign.config import load_config
    from polyalign.train.online import train_online

    device = "cpu" if args.cpu else "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        policy, tokenizer, _ = _model("big", "bfloat16", device, args.cpu)
        policy.save_pretrained(f"{tmp}/policy")
        tokenizer.save_pretrained(f"{tmp}/policy")
        del policy
        steps = 1 if args.cpu else 3
        overrides = [
            f"--model.policy={tmp}/policy",
            f"--model.dtype={'float32' if args.cpu else 'bfloat16'}",
            f"--model.device={device}",
            f"--rollout.engine={args.engine}",
            f"--rollout.prompts_per_step={2 if args.cpu else 16}",
            "--rollout.samples_per_prompt=4",
            f"--rollout.max_new_tokens={8 if args.cpu else 128}",
            "--rollout.vllm.enforce_eager=true",
            f"--train.steps={steps}",
            "--train.lr=1e-6",
            "--eval.every=0",
            "--data.eval_prompts=null",
            f"--output.run_dir={tmp}/run",
            "--output.report=false",
            "--output.progress=false",
            "--output.sample_every=0",
            "--output.checkpoint_every=0",
        ]
        start = time.perf_counter()
        train_online(load_config(None, overrides))
        total = time.perf_counter() - start
        records = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
    keep = ("time/generate", "time/update", "time/step", "tokens_per_s", "reward", "length")
    steps_out = [
        {k: round(v, 4) for k, v in rec.items() if k in keep or k.startswith("mismatch/")} for rec in records
    ]
    return {"engine": args.engine, "steps": steps_out, "total_with_setup_s": round(total, 1)}


STAGES = {"device": stage_device, "pytest": stage_pytest, "probe": stage_probe, "train": stage_train}


# ---------------------------------------------------------------- the driver


def _run_stage(name: str, extra: list[str], limit: float, out: Path, cpu: bool) -> dict:
    label = "_".join([name] + [a.split("=")[1] for a in extra])
    result_file = out / f"{label}.json"
    cmd = [sys.executable, __file__, f"--stage={name}", f"--result={result_file}", *extra] + (
        ["--cpu"] if cpu else []
    )
    print(f"\n=== {label} (limit {limit:.0f}s)", flush=True)
    start = time.perf_counter()
    with open(out / f"{label}.log", "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f}s"
    seconds = round(time.perf_counter() - start, 1)
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    tail = (out / f"{label}.log").read_text()[-1500:]
    print(f"--- {label}: {status} in {seconds}s\n{json.dumps(result)[:1500]}", flush=True)
    if status != "ok":
        print(tail, flush=True)
    return {"stage": label, "status": status, "seconds": seconds, "result": result} | (
        {"log_tail": tail} if status != "ok" else {}
    )


def _markdown(results: dict) -> str:
    lines = ["# vLLM engine GPU check", "", f"device: `{json.dumps(results.get('device', {}))}`", ""]
    lines += ["| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} |" for s in results["stages"]]
    lines += [
        "",
        "## Speed (completion tokens/s, k=4)",
        "",
        "| model | dtype | new tokens | HF | vLLM | vLLM/HF |",
    ]
    lines += ["|---|---|---|---|---|---|"]
    probes = [s["result"] for s in results["stages"] if s["stage"].startswith("probe") and s["result"]]
    for p in probes:
        for t, hf in p.get("speed_hf", {}).items():
            v = p.get("speed_vllm", {}).get(t, {}).get("tokens_per_s")
            ratio = f"{v / hf['tokens_per_s']:.2f}" if v else "-"
            lines.append(
                f"| {p['model']} | {p['dtype']} | {t} | {hf['tokens_per_s']} | {v or '-'} | {ratio} |"
            )
    lines += [
        "",
        "## Log-prob mismatch vs the trainer (mean abs / max abs per token, mean seq log-ratio, frac |D|>1)",
    ]
    lines += ["", "| model | dtype | sampler | trainer | mean abs | max abs | seq log-ratio | frac>1 |"]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for p in probes:
        for sampler in ("hf", "vllm"):
            for trainer, m in p.get(f"mismatch_{sampler}", {}).items():
                values = " | ".join(str(m[k]) for k in sorted(m, key=_MISMATCH_ORDER.index))
                lines.append(f"| {p['model']} | {p['dtype']} | {sampler} | {trainer} | {values} |")
    lines += [
        "",
        "## RLOO steps (bf16, ~280M Llama): seconds per step",
        "",
        "| engine | steps |",
        "|---|---|",
    ]
    for s in results["stages"]:
        if s["stage"].startswith("train") and s["result"]:
            steps = [
                f"gen {r.get('time/generate')} / upd {r.get('time/update')}" for r in s["result"]["steps"]
            ]
            lines.append(f"| {s['result']['engine']} | {'; '.join(steps)} |")
    return "\n".join(lines) + "\n"


_MISMATCH_ORDER = [
    "mismatch/token_abs_mean",
    "mismatch/token_abs_max",
    "mismatch/seq_log_ratio_mean",
    "mismatch/seq_frac_abs_gt_1",
]


def _pack(work: Path, out: Path) -> None:
    """The stages' logs and JSON as one archive: the device tool brings back at most 8 files from $OUT."""
    tmp = out / "stages.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as archive:
        archive.add(work, arcname="stages")
    os.replace(tmp, out / "stages.tar.gz")


def drive(cpu: bool, budget: float, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))  # per-stage files; packed into out/stages.tar.gz
    deadline = time.time() + budget
    results: dict = {"cpu_dry_run": cpu, "device": stage_device(None), "stages": []}
    print(json.dumps(results["device"]), flush=True)
    for name, extra, limit in PLAN:
        if name == "train" and cpu and "--engine=vllm" in extra:
            continue
        remaining = deadline - time.time()
        if remaining < 30:
            results["stages"].append(
                {"stage": name, "status": "skipped (budget)", "seconds": 0, "result": {}}
            )
            continue
        results["stages"].append(_run_stage(name, extra, min(limit, remaining), work, cpu))
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text(_markdown(results))
        _pack(work, out)
    print("\n" + _markdown(results), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="dry run on CPU: tiny sizes, no vLLM")
    parser.add_argument("--budget", type=float, default=460, help="seconds for all stages together")
    parser.add_argument("--out", default=None, help="results folder (default: $OUT, else ./gpu_results)")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    for option in ("--model", "--dtype", "--engine"):
        parser.add_argument(option, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--speed", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--eager", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage is None:
        drive(args.cpu, args.budget, Path(args.out or os.environ.get("OUT") or "gpu_results"))
        return
    import torch

    torch.set_num_threads(1 if args.cpu else 8)
    try:
        result = STAGES[args.stage](args)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    Path(args.result).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
