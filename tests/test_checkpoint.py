"""Tests for polyalign.train.checkpoint: exact resume, crash safety, pruning, tied weights."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from polyalign.files import atomic_write_json, atomic_write_text
from polyalign.train.checkpoint import (
    best_checkpoint,
    claim_run_dir,
    latest_checkpoint,
    load_checkpoint,
    mark_best,
    save_checkpoint,
)
from polyalign.train.optim import build_optimizer, step_optimizer

STORIES = Path(__file__).resolve().parents[1] / "polyalign" / "assets" / "stories260K"


def _tiny():
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _train_step(model, opt):
    """One step on freshly drawn data, so the result depends on the torch RNG as well as the weights."""
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    nn.functional.mse_loss(model(x), y).backward()
    step_optimizer(model.parameters(), opt, max_grad_norm=1.0)


def test_round_trip_continues_exactly_like_an_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    model = _tiny()
    opt = build_optimizer(model.named_parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        _train_step(model, opt)
    random.seed(7)
    np.random.seed(7)
    state = {"data_position": 48, "baseline": torch.tensor(0.25), "best": {"reward": 1.5, "step": 2}}
    save_checkpoint(tmp_path, 3, {"policy": model}, opt, state)

    # Uninterrupted: draw from every RNG, then take one more step.
    draws = (random.random(), np.random.rand(), torch.rand(2))
    _train_step(model, opt)
    expected = [p.detach().clone() for p in model.parameters()]

    # Resumed: a differently initialised model and a fresh optimizer, restored from disk.
    torch.manual_seed(123)
    random.seed(123)
    resumed = _tiny()
    resumed_opt = build_optimizer(resumed.named_parameters(), lr=1e-2, weight_decay=0.1)
    loaded = load_checkpoint(tmp_path, {"policy": resumed}, resumed_opt)
    assert loaded["step"] == 3
    assert loaded["trainer_state"] == {
        "data_position": 48,
        "baseline": 0.25,
        "best": {"reward": 1.5, "step": 2},
    }
    resumed_draws = (random.random(), np.random.rand(), torch.rand(2))
    assert (
        draws[0] == resumed_draws[0]
        and draws[1] == resumed_draws[1]
        and torch.equal(draws[2], resumed_draws[2])
    )
    _train_step(resumed, resumed_opt)
    for a, b in zip(expected, resumed.parameters()):
        assert torch.equal(a, b)


def test_without_optimizer_state_the_next_step_differs(tmp_path):
    """Guards the round-trip test: Adam moments matter, so forgetting them would be detected."""
    torch.manual_seed(0)
    model = _tiny()
    opt = build_optimizer(model.parameters(), lr=1e-2)
    for _ in range(3):
        _train_step(model, opt)
    save_checkpoint(tmp_path, 3, {"policy": model}, opt)
    _train_step(model, opt)
    resumed = _tiny()
    fresh_opt = build_optimizer(resumed.parameters(), lr=1e-2)
    load_checkpoint(tmp_path, {"policy": resumed})  # weights + RNG only
    _train_step(resumed, fresh_opt)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


def test_layout_and_pointer(tmp_path):
    model = _tiny()
    path = save_checkpoint(tmp_path, 5, {"policy": model, "value": nn.Linear(2, 1)}, trainer_state={"a": 1})
    assert path == tmp_path / "checkpoints" / "step_000005"
    names = sorted(p.name for p in path.iterdir())
    assert names == ["COMPLETE", "policy.safetensors", "rng.pt", "state.json", "value.safetensors"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000005"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert json.loads((path / "state.json").read_text())["models"] == ["policy", "value"]


def test_incomplete_checkpoints_are_ignored(tmp_path):
    model = _tiny()
    good = save_checkpoint(tmp_path, 2, {"policy": model})
    root = tmp_path / "checkpoints"
    # A crash mid-write leaves a .tmp- dir; a step dir without COMPLETE must not be trusted either.
    crashed = root / ".tmp-step_000004"
    crashed.mkdir()
    (crashed / "policy.safetensors").write_bytes(b"partial")
    (root / "step_000003").mkdir()
    (root / "step_000003" / "state.json").write_text("{}")
    (root / "latest").unlink()  # force the directory scan
    assert latest_checkpoint(tmp_path) == good
    (root / "latest").write_text("step_000003\n")  # a pointer to an incomplete dir is not followed
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        load_checkpoint(root / "step_000003", {"policy": model})
    save_checkpoint(tmp_path, 5, {"policy": model})  # the next save clears the crash leftovers
    assert not crashed.exists()


def test_latest_checkpoint_empty_run_dir(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_checkpoint(tmp_path, {"policy": _tiny()})


def test_keep_last_pruning_never_removes_best(tmp_path):
    model = _tiny()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"policy": model}, keep_last=2)
        if step == 2:
            mark_best(tmp_path, 2)
    remaining = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert remaining == ["step_000002", "step_000004", "step_000005"]
    assert best_checkpoint(tmp_path).name == "step_000002"
    assert latest_checkpoint(tmp_path).name == "step_000005"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint for step 3"):
        mark_best(tmp_path, 3)


def test_resaving_an_earlier_step_drops_the_abandoned_timeline(tmp_path):
    model = _tiny()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"policy": model}, keep_last=3)
    with torch.no_grad():
        model[0].weight.fill_(0.5)
    save_checkpoint(tmp_path, 2, {"policy": model}, keep_last=3)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert names == ["step_000001", "step_000002"]
    fresh = _tiny()
    assert load_checkpoint(tmp_path, {"policy": fresh})["step"] == 2
    assert torch.all(fresh[0].weight == 0.5)


def test_load_errors_name_the_problem(tmp_path):
    save_checkpoint(tmp_path, 1, {"policy": _tiny()})
    with pytest.raises(FileNotFoundError, match="no model 'value'"):
        load_checkpoint(tmp_path, {"value": _tiny()})
    with pytest.raises(FileNotFoundError, match="without an optimizer"):
        model = _tiny()
        load_checkpoint(tmp_path, {"policy": model}, build_optimizer(model.parameters(), 1e-3))
    with pytest.raises(RuntimeError, match="size mismatch|Missing|Unexpected"):
        load_checkpoint(tmp_path, {"policy": nn.Linear(4, 1)})
    with pytest.raises(ValueError, match="model name"):
        save_checkpoint(tmp_path, 2, {"../evil": _tiny()})
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 2, {"policy": _tiny()}, keep_last=0)


def test_tied_weights_round_trip_for_stories260k(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(STORIES)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the shipped model ties embeddings
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # differ from the shipped weights
    save_checkpoint(tmp_path, 1, {"policy": model})
    restored = AutoModelForCausalLM.from_pretrained(STORIES)
    load_checkpoint(tmp_path, {"policy": restored})
    assert restored.lm_head.weight is restored.model.embed_tokens.weight
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.tensor([[1, 50, 60, 70]])
    assert torch.equal(model(ids).logits, restored(ids).logits)


def test_atomic_write_helpers(tmp_path):
    target = atomic_write_json(tmp_path / "sub" / "x.json", {"t": torch.tensor([1.0, 2.0]), "n": np.int64(3)})
    assert json.loads(target.read_text()) == {"t": [1.0, 2.0], "n": 3}
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.json"]
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        atomic_write_json(tmp_path / "y.json", {"bad": object()})
    assert not (tmp_path / "y.json").exists()


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from polyalign.train.checkpoint import save_checkpoint
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 64))
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        save_checkpoint(sys.argv[1], step, {"policy": model}, trainer_state={"step_value": step}, keep_last=2)
    """
)


def test_kill_9_during_saves_leaves_a_loadable_consistent_checkpoint(tmp_path):
    """SIGKILL a process that saves checkpoints in a tight loop; every kill point must leave a good one."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for delay in (0.05, 0.2):  # each save takes ~30 ms: these land mid-save and mid-prune
        run_dir = tmp_path / f"run{delay}"
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(run_dir)], env=env)
        try:
            deadline = time.time() + 60
            while not (run_dir / "checkpoints" / "latest").exists():
                assert proc.poll() is None and time.time() < deadline, "writer died or never saved"
                time.sleep(0.01)
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        model = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 64))
        state = load_checkpoint(run_dir, {"policy": model})
        step = state["step"]
        assert state["trainer_state"] == {"step_value": step}
        assert all(torch.all(p == float(step)) for p in model.parameters())


def test_claim_run_dir_fresh_overwrite_and_resume(tmp_path):
    """A fresh run refuses a used folder (naming --resume and --overwrite); --overwrite removes the previous
    run's outputs only; --resume cuts the logs back to the latest checkpoint (no checkpoint: empties them)."""
    run = tmp_path / "run"
    assert claim_run_dir(run, resume=False) == run and run.is_dir()  # new and empty: fine
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    (run / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        claim_run_dir(run, resume=False)
    claim_run_dir(run, resume=True)  # no checkpoint: from step 0, logs emptied
    assert (run / "metrics.jsonl").read_text() == ""
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    save_checkpoint(run, 2, {"policy": _tiny()})
    claim_run_dir(run, resume=True)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    with pytest.raises(ValueError, match="pass one"):
        claim_run_dir(run, resume=True, overwrite=True)
    claim_run_dir(run, resume=False, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
