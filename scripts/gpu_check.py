"""The GPU check of the rollout engines, in one run on a lent GPU (H100/H200), under about 8 minutes.

    python scripts/gpu_check.py             # results under $OUT if set, else ./gpu_results
    python scripts/gpu_check.py --cpu-smoke # everything but vLLM, tiny shapes, on CPU (tests/ runs it)

vLLM is optional: `pip install -e '.[vllm]'` beforehand adds its stages; without it they are reported as
"skipped (vllm not installed)" and the rest runs. This script installs nothing.

Stages, in order of importance, each in its own process (one failure or crash does not stop the rest, and
every vLLM engine starts clean) and each under a time limit within an overall budget:
1. device: torch / CUDA / vLLM / transformers versions and the GPU.
2. pytest -m gpu tests/test_gpu_decode.py: the CUDA-graph decode equals the eager one (float32, bfloat16).
3. speed: completion tokens per second of transformers' `model.generate` against `HFEngine` eager (the
   dynamic loop) and graphed (static shapes, one CUDA graph per step) at 64 and 256 rows, on random-init
   ~0.5B-shaped Llama and Qwen2 models in bfloat16; and the engine/trainer log-prob mismatch
   (`polyalign.rollout.mismatch`) against the trainer's forward in bfloat16 and in float32.
4. train: bf16 RLOO steps (polyalign.train.online) with the HF engine, graphed and eager.
5. vLLM (when installed): pytest -m gpu tests/test_vllm.py; HF engine vs vLLM engine on stories260K and the
   Llama (tokens/s, log-prob mismatch); RLOO steps with the vLLM engine.
Writes results.json, results.md (tables) and stages.tar.gz (one log and JSON per stage).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
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
    ("pytest", ["--tests=gpu_decode"], 120),
    ("speed", ["--model=llama"], 90),
    ("speed", ["--model=qwen2"], 90),
    ("train", ["--engine=hf"], 70),
    ("train", ["--engine=hf-eager"], 60),
    ("pytest", ["--tests=vllm"], 170),
    ("probe", ["--model=stories", "--dtype=bfloat16", "--speed=1", "--eager=1"], 80),
    ("probe", ["--model=big", "--dtype=bfloat16", "--speed=1", "--eager=0"], 160),
    ("train", ["--engine=vllm"], 110),
    ("probe", ["--model=stories", "--dtype=float32", "--speed=0", "--eager=1"], 60),
    ("probe", ["--model=big", "--dtype=float32", "--speed=0", "--eager=1"], 80),
]
NEEDS_VLLM = ("pytest_vllm", "probe", "train_vllm")  # stage labels (prefixes) that need vLLM
NOT_ON_CPU = ("pytest", "probe", "train_hf-eager")  # GPU-only or vLLM-only: a CPU smoke run skips them
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
QWEN2 = dict(  # Qwen2-0.5B's layers (GQA 14/2, q/k/v biases), the stories260K vocabulary
    BIG, hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2
)
QWEN2_TINY = dict(TINY, num_attention_heads=4, num_key_value_heads=1)


# ---------------------------------------------------------------- helpers used inside stages


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _model(name: str, dtype: str, device: str, cpu: bool):
    """(policy, tokenizer, vLLM attention backend) for `stories` or a locally built random-init model:
    `big` / `llama` (the Llama) or `qwen2`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from polyalign.models import DTYPES, load_policy, load_tokenizer

    if name == "stories":  # head size 8: FlexAttention is the vLLM backend that takes it in every version
        policy, tokenizer = load_policy("stories260K", dtype=dtype, device=device)
        return policy.eval(), tokenizer, os.environ.get("POLYALIGN_VLLM_TEST_BACKEND", "FLEX_ATTENTION")
    torch.manual_seed(0)
    if name == "qwen2":
        policy = Qwen2ForCausalLM(Qwen2Config(**(QWEN2_TINY if cpu else QWEN2)))
    else:
        policy = LlamaForCausalLM(LlamaConfig(**(TINY if cpu else BIG)))
    return policy.to(DTYPES[dtype]).to(device).eval(), load_tokenizer("stories260K"), ""


def _hf_generate(policy, tokenizer, prompts: list[str], n: int, tokens: int, device: str) -> dict:
    """transformers' own `model.generate` (sampling at temperature 1, no top-k): completion tokens per
    second, counting each row up to its first EOS."""
    import torch

    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = policy.generate(
            **batch, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=tokens,
            num_return_sequences=n, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    _sync(device)
    seconds = time.perf_counter() - start
    new = out[:, batch["input_ids"].shape[1] :]
    eos = new == policy.config.eos_token_id
    generated = int((eos.long().cumsum(1) - eos.long() == 0).sum())  # tokens up to the first EOS
    return {"seconds": round(seconds, 3), "tokens": generated, "tokens_per_s": round(generated / seconds, 1)}


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
    test_file = f"tests/test_{args.tests}.py"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", test_file, "-q", "-rA", "-p", "no:cacheprovider"]
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


def stage_speed(args) -> dict:
    """model.generate vs HFEngine eager vs graphed, completion tokens/s at 64 and 256 rows (4 per prompt);
    then the graphed engine's log-prob mismatch against the trainer's forward (bf16 and float32)."""
    import torch

    from polyalign.data.prompts import load_prompts
    from polyalign.rollout.hf import HFEngine

    device = "cpu" if args.cpu else "cuda"
    policy, tokenizer, _ = _model(args.model, "float32" if args.cpu else "bfloat16", device, args.cpu)
    prompts = load_prompts("builtin:stories").prompts
    tokens, row_counts = (8, (8, 16)) if args.cpu else (128, (64, 256))
    engines = {
        "engine_eager": HFEngine(policy, tokenizer, static_decode=False),
        "engine_graph": HFEngine(policy, tokenizer, static_decode=True),
    }
    result: dict = {"model": args.model, "parameters": sum(p.numel() for p in policy.parameters())}
    result["dtype"], result["new_tokens"] = str(policy.dtype).removeprefix("torch."), tokens
    for engine in engines.values():
        _timed(engine, prompts[:2], 2, 8, device)  # warm-up (kernels, allocator)
    _hf_generate(policy, tokenizer, prompts[:2], 2, 8, device)
    for rows in row_counts:
        batch = prompts[: rows // 4]
        speeds = {"hf_generate": _hf_generate(policy, tokenizer, batch, 4, tokens, device)}
        speeds |= {name: _timed(engine, batch, 4, tokens, device) for name, engine in engines.items()}
        result[f"rows_{rows}"] = speeds
        print(rows, speeds, flush=True)
    reference = policy if args.cpu else copy.deepcopy(policy).float()
    result["mismatch_engine_graph"] = _mismatch(
        engines["engine_graph"], policy, reference, prompts[: 2 if args.cpu else 16]
    )
    print(result["mismatch_engine_graph"], flush=True)
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
        steps = 1 if args.cpu else 4
        overrides = [
            f"--model.policy={tmp}/policy",
            f"--model.dtype={'float32' if args.cpu else 'bfloat16'}",
            f"--model.device={device}",
            f"--rollout.engine={args.engine.removesuffix('-eager')}",
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
        if args.engine == "hf-eager":  # the dynamic loop instead of the CUDA graph
            os.environ["POLYALIGN_STATIC_DECODE"] = "0"
        start = time.perf_counter()
        train_online(load_config(None, overrides))
        total = time.perf_counter() - start
        records = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
    keep = ("time/generate", "time/update", "time/step", "tokens_per_s", "reward", "length")
    steps_out = [
        {k: round(v, 4) for k, v in rec.items() if k in keep or k.startswith("mismatch/")} for rec in records
    ]
    timed = [r["time/step"] for r in records[1:]] or [r["time/step"] for r in records]  # first: warm-up
    steps_per_s = round(len(timed) / sum(timed), 3)
    return {
        "engine": args.engine,
        "steps": steps_out,
        "steps_per_s": steps_per_s,
        "total_with_setup_s": round(total, 1),
    }


STAGES = {
    "device": stage_device,
    "pytest": stage_pytest,
    "speed": stage_speed,
    "probe": stage_probe,
    "train": stage_train,
}


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
        if cpu:  # the smoke run: in this process (one import of torch), no time limit
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                status = "ok" if _run_here(_parser().parse_args(cmd[2:])) == 0 else "failed"
        else:
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
    lines = ["# Rollout engines GPU check", "", f"device: `{json.dumps(results.get('device', {}))}`", ""]
    lines += ["| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} |" for s in results["stages"]]
    lines += ["", "## HF generate vs HFEngine (completion tokens/s, 4 per prompt)", ""]
    lines += ["| model | dtype | rows | new tokens | HF generate | engine eager | engine graph | graph/HF |"]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for s in results["stages"]:
        r = s["result"]
        for rows in [k for k in r if k.startswith("rows_")] if s["stage"].startswith("speed") else []:
            speed = {name: v["tokens_per_s"] for name, v in r[rows].items()}
            ratio = speed["engine_graph"] / max(speed["hf_generate"], 1e-9)
            lines.append(
                f"| {r['model']} | {r['dtype']} | {rows[5:]} | {r['new_tokens']} | {speed['hf_generate']} | "
                f"{speed['engine_eager']} | {speed['engine_graph']} | {ratio:.2f} |"
            )
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
    speeds = [dict(s["result"], model=f"{s['result']['model']} (graph)") for s in results["stages"]
              if s["stage"].startswith("speed") and s["result"]]  # fmt: skip
    for p in probes + speeds:
        for sampler in ("hf", "vllm", "engine_graph"):
            for trainer, m in p.get(f"mismatch_{sampler}", {}).items():
                values = " | ".join(str(m[k]) for k in sorted(m, key=_MISMATCH_ORDER.index))
                lines.append(f"| {p['model']} | {p['dtype']} | {sampler} | {trainer} | {values} |")
    lines += [
        "",
        "## RLOO steps (bf16, the Llama): seconds per step",
        "",
        "| engine | steps/s (after the first) | steps |",
        "|---|---|---|",
    ]
    for s in results["stages"]:
        if s["stage"].startswith("train") and s["result"]:
            steps = [
                f"gen {r.get('time/generate')} / upd {r.get('time/update')}" for r in s["result"]["steps"]
            ]
            lines.append(
                f"| {s['result']['engine']} | {s['result'].get('steps_per_s')} | {'; '.join(steps)} |"
            )
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
    has_vllm = importlib.util.find_spec("vllm") is not None
    for name, extra, limit in PLAN:
        label = "_".join([name] + [a.split("=")[1] for a in extra])
        remaining = deadline - time.time()
        skip = None
        if cpu and label.startswith(NOT_ON_CPU):
            skip = "skipped (needs a GPU)"
        elif label.startswith(NEEDS_VLLM) and (cpu or not has_vllm):
            skip = "skipped (vllm not installed)" if not has_vllm else "skipped (needs a GPU)"
        elif remaining < 30:
            skip = "skipped (budget)"
        if skip:
            print(f"--- {label}: {skip}", flush=True)
            results["stages"].append({"stage": label, "status": skip, "seconds": 0, "result": {}})
            continue
        results["stages"].append(_run_stage(name, extra, min(limit, remaining), work, cpu))
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text(_markdown(results))
        _pack(work, out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(_markdown(results))
    print("\n" + _markdown(results), flush=True)
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cpu-smoke", "--cpu", dest="cpu", action="store_true", help="on CPU: tiny sizes, no vLLM, no pytest"
    )
    parser.add_argument("--budget", type=float, default=460, help="seconds for all stages together")
    parser.add_argument("--out", default=None, help="results folder (default: $OUT, else ./gpu_results)")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    for option in ("--model", "--dtype", "--engine", "--tests"):
        parser.add_argument(option, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--speed", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--eager", type=int, default=1, help=argparse.SUPPRESS)
    return parser


def _run_here(args) -> int:
    """Run one stage in this process and write its JSON; 0 when it succeeded."""
    import torch

    torch.set_num_threads(1 if args.cpu else 8)
    try:
        result = STAGES[args.stage](args)
    except Exception:
        traceback.print_exc()
        return 1
    Path(args.result).write_text(json.dumps(result, indent=1))
    return 0


def main() -> None:
    args = _parser().parse_args()
    if args.stage is None:
        drive(args.cpu, args.budget, Path(args.out or os.environ.get("OUT") or "gpu_results"))
        return
    sys.exit(_run_here(args))


if __name__ == "__main__":
    main()
