"""Every command's CPU-thread setting is parsed and applied (torch.get_num_threads() once the command has
applied it, the job itself cut short), and the console script sets the OpenMP defaults before torch loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polyalign.config import load_config
from polyalign.threads import RUNTIME_DEFAULTS, apply_threads

REPO = Path(__file__).resolve().parent.parent


class Applied(Exception):
    """Raised by the first step after a command has applied its threads: the job stops there."""


@pytest.fixture
def stop_after_threads(monkeypatch):
    """stop(module, name): replace module.name by a function that records torch's threads and raises."""
    seen = []

    def stop(module, name):
        def record(*args, **kwargs):
            seen.append(torch.get_num_threads())
            raise Applied

        monkeypatch.setattr(module, name, record)

    yield stop, seen
    torch.set_num_threads(1)  # conftest's setting for the other tests


def test_apply_threads_sets_keeps_and_refuses():
    apply_threads(2)
    assert torch.get_num_threads() == 2
    apply_threads(0)  # 0 = keep the process's setting
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="threads: -1"):
        apply_threads(-1)
    torch.set_num_threads(1)


def _entry_report(env: dict) -> dict:
    code = (
        "import json, os, polyalign.cli as cli\n"
        "def main():\n"
        "    import torch\n"
        "    print(json.dumps({'threads': torch.get_num_threads(), 'spin': os.environ.get('GOMP_SPINCOUNT')}))\n"
        "    return 0\n"
        "cli.main = main\n"
        "cli.entry()\n"
    )
    keep = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env={**keep, "PYTHONPATH": str(REPO), **env},
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_console_script_sets_openmp_defaults_before_torch_and_the_user_wins():
    assert _entry_report({})["spin"] == RUNTIME_DEFAULTS["GOMP_SPINCOUNT"] == "3000"
    assert _entry_report({"OMP_NUM_THREADS": "1", "GOMP_SPINCOUNT": "50"}) == {"threads": 1, "spin": "50"}
    assert _entry_report({"OMP_WAIT_POLICY": "PASSIVE"})["spin"] is None  # the wait policy decides the spins


def test_train_applies_model_threads(tmp_path, stop_after_threads):
    from polyalign.train import loop

    stop, seen = stop_after_threads
    cfg = load_config(None, ["model.threads=2", f"output.run_dir={tmp_path}"])
    stop(loop.distributed, "join")
    with pytest.raises(Applied):
        loop.start(cfg, resume=False)
    assert seen == [2]


def test_eval_applies_threads(tmp_path, stop_after_threads):
    from polyalign.recipes.evaluate import run
    from polyalign.recipes.evaluate.config import EvalRunConfig

    stop, seen = stop_after_threads
    cfg = load_config(None, ["threads=2", f"out_dir={tmp_path}"], cls=EvalRunConfig)
    stop(run, "load_prompts")
    with pytest.raises(Applied):
        run.run_eval(cfg)
    assert seen == [2]


def test_synth_applies_threads(tmp_path, stop_after_threads):
    from polyalign.synth import pipeline
    from polyalign.synth.config import SynthConfig

    stop, seen = stop_after_threads
    cfg = load_config(None, ["threads=2", f"out_dir={tmp_path}"], cls=SynthConfig)
    stop(pipeline, "_prepare")
    with pytest.raises(Applied):
        pipeline.run_synth(cfg)
    assert seen == [2]


def test_experiment_applies_threads(tmp_path, stop_after_threads):
    from polyalign.recipes.experiment import run
    from polyalign.recipes.experiment.config import ExperimentConfig

    stop, seen = stop_after_threads
    overrides = ["threads=2", f"out_dir={tmp_path}", f"general.pairs={tmp_path / 'pairs.jsonl'}"]
    cfg = load_config(None, overrides, cls=ExperimentConfig)
    stop(run, "load_pairs")
    with pytest.raises(Applied):
        run.run_experiment(cfg)
    assert seen == [2]


def test_serve_applies_threads(stop_after_threads):
    from polyalign.cli import build_parser
    from polyalign.recipes import serve

    stop, seen = stop_after_threads
    args = build_parser().parse_args(["serve", "--threads", "2"])
    stop(serve, "serve")
    with pytest.raises(Applied):
        serve.cli_serve(args)
    assert seen == [2]


def test_a_negative_thread_count_is_one_clear_line(capsys):
    from polyalign.cli import main

    assert main(["serve", "--threads", "-1"]) == 1
    assert "polyalign serve: threads: -1 must be >= 0" in capsys.readouterr().err


def test_the_command_line_override_reaches_eval(tmp_path, stop_after_threads):
    from polyalign.cli import main
    from polyalign.recipes.evaluate import run

    stop, seen = stop_after_threads
    config = tmp_path / "eval.yaml"
    config.write_text(f"out_dir: {tmp_path / 'out'}\n")
    stop(run, "load_prompts")
    assert main(["eval", str(config), "--threads=2"]) == 1  # stopped right after the threads were applied
    assert seen == [2]
