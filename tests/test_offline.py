"""Offline trainer: every loss trains, cached reference == on-the-fly reference, the trainer's DPO loss equals a
hand computation from separately computed log-probs, resume reproduces the uninterrupted run, bad data fails
naming file/line/field (or is skipped and counted), a reward model learns a separable toy set, and every
shipped offline config loads. Tiny settings on the shipped stories260K model."""

import json
from pathlib import Path

import pytest
import torch

from polyalign import losses
from polyalign.config import ConfigError
from polyalign.config_offline import is_offline_config, load_offline_config
from polyalign.data.chat import collate_pairs
from polyalign.data.io import DataError
from polyalign.logprobs import sequence_logprobs
from polyalign.models import load_policy
from polyalign.recipes.report import write_training_report
from polyalign.train.offline import train_loop, train_offline
from polyalign.train.offline_data import batch_indices, split_by_prompt
from polyalign.train.offline_run import setup_offline_run

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--data.max_length=48",
    "--data.max_prompt_length=24",
    "--train.steps=2",
    "--train.batch_size=4",
    "--output.progress=false",
    "--output.report=false",
    "--eval.batch_size=8",
    "--data.eval_fraction=0.25",
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def toy_rows(n: int = 24) -> list[dict]:
    """Trivially separable pairs: chosen says good things, rejected bad ones; two languages; scored."""
    return [
        {
            "prompt": f"Story {i}: once upon a time, Tom",
            "chosen": " was good and happy and kind.",
            "rejected": " was bad and sad and mean.",
            "language": ("en", "de")[i % 2],
            "chosen_score": 1.0 + 0.1 * (i % 3),
            "rejected_score": -1.0,
        }
        for i in range(n)
    ]


@pytest.fixture
def toy(tmp_path) -> Path:
    return write_jsonl(tmp_path / "toy.jsonl", toy_rows())


def tiny_cfg(tmp_path, data: Path, *extra, name: str = "run"):
    return load_offline_config(
        None, [*TINY, f"--data.train={data}", f"--output.run_dir={tmp_path / name}", *extra]
    )


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


@pytest.mark.parametrize(
    "name, extra",
    [
        ("dpo", []),
        ("ipo", ["--loss.length_normalize=true"]),
        ("copg", []),
        ("sft", []),
        ("sft", ["--loss.sft_target=random"]),
        ("reward_model", []),
    ],
    ids=["dpo", "ipo", "copg", "sft", "sft-random", "reward_model"],
)
def test_every_loss_trains_and_changes_every_parameter(tmp_path, toy, name, extra):
    cfg = tiny_cfg(tmp_path, toy, f"--loss.name={name}", "--train.lr=1e-2", *extra)
    run = setup_offline_run(cfg)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    train_loop(run)
    rows = train_losses(cfg.output.run_dir)
    assert sorted(rows) == [1, 2] and all(torch.isfinite(torch.tensor(v)) for v in rows.values())
    changed = [k for k, v in run.model.state_dict().items() if not torch.equal(v, before[k])]
    assert set(changed) == set(before), f"{name}: parameters left unchanged: {set(before) - set(changed)}"
    final = [m for m in metrics(cfg.output.run_dir) if "eval/accuracy" in m][-1]
    assert {"eval/accuracy/en", "eval/accuracy/de", "eval/loss"} <= set(final)


def test_cached_reference_equals_on_the_fly(tmp_path, toy):
    runs = {}
    for precompute in (True, False):
        cfg = tiny_cfg(
            tmp_path, toy, f"--reference.precompute={precompute}", "--train.lr=1e-2", name=f"p{precompute}"
        )
        runs[precompute] = train_offline(cfg)
    cached, live = (train_losses(tmp_path / f"p{p}") for p in (True, False))
    assert cached[1] == pytest.approx(live[1], rel=1e-5) and cached[2] == pytest.approx(live[2], rel=1e-5)
    assert cached[2] != pytest.approx(cached[1], rel=1e-6), "the second step must see an updated policy"
    a, b = runs[True]["eval_final"], runs[False]["eval_final"]
    assert a["eval/loss"] == pytest.approx(b["eval/loss"], rel=1e-5)


def perturbed_reference(path: Path) -> Path:
    """A copy of stories260K with noisy weights, so that policy != reference and DPO's loss is not log 2."""
    model, tokenizer = load_policy("stories260K")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_dpo_loss_equals_hand_computation(tmp_path, toy):
    ref_path = perturbed_reference(tmp_path / "ref")
    cfg = tiny_cfg(
        tmp_path,
        toy,
        "--train.steps=1",
        "--loss.beta=0.3",
        f"--model.reference={ref_path}",
        "--train.micro_batch_size=3",
    )
    run = setup_offline_run(cfg)
    rows = batch_indices(len(run.train_set), 0, cfg.train.batch_size, cfg.train.seed)
    batch = collate_pairs([run.train_set.pairs[i] for i in rows], pad_id=0)
    policy, _ = load_policy("stories260K")
    reference, _ = load_policy(str(ref_path))
    with torch.no_grad():
        logps = {
            (name, side): sequence_logprobs(
                model,
                batch.prompt_ids,
                batch.prompt_mask,
                getattr(batch, f"{side}_ids"),
                getattr(batch, f"{side}_mask"),
            )
            for name, model in (("policy", policy.eval()), ("ref", reference.eval()))
            for side in ("chosen", "rejected")
        }
    expected, _ = losses.dpo_loss(
        logps["policy", "chosen"],
        logps["policy", "rejected"],
        logps["ref", "chosen"],
        logps["ref", "rejected"],
        beta=0.3,
    )
    assert abs(float(expected) - 0.6931) > 1e-3, "the perturbed reference must move the loss off log 2"
    train_loop(run)
    assert train_losses(cfg.output.run_dir)[1] == pytest.approx(float(expected), rel=1e-5)


def test_micro_batches_accumulate_to_the_full_batch(tmp_path, toy):
    """With plain SGD at lr 1 and no clipping the update is -grad: 4 x 1 micro-batches must give 1 x 4's."""
    deltas = {}
    for micro in (0, 1):
        cfg = tiny_cfg(
            tmp_path,
            toy,
            "--train.steps=1",
            f"--train.micro_batch_size={micro}",
            "--train.lr=1.0",
            "--train.max_grad_norm=0",
            name=f"m{micro}",
        )
        run = setup_offline_run(cfg)
        run.optimizer = torch.optim.SGD(run.model.parameters(), lr=1.0)
        before = torch.cat([p.detach().flatten() for p in run.model.parameters()])
        train_loop(run)
        deltas[micro] = torch.cat([p.detach().flatten() for p in run.model.parameters()]) - before
    assert deltas[0].abs().max() > 1e-4
    assert torch.allclose(deltas[0], deltas[1], rtol=1e-4, atol=2e-6)  # param rounding ~1e-7


def test_resume_reproduces_the_uninterrupted_run(tmp_path, toy):
    common = [
        "--train.steps=4",
        "--output.checkpoint_every=2",
        "--train.lr=1e-2",
        "--loss.name=sft",
        "--loss.sft_target=random",
        "--train.batch_size=7",
    ]  # batches straddle epochs (18 train pairs)
    train_offline(tiny_cfg(tmp_path, toy, *common, name="full"))
    half = tiny_cfg(tmp_path, toy, *common, name="half")
    run = setup_offline_run(half)
    run.total_steps = 2  # stop after step 2's checkpoint, as if killed right after it
    train_loop(run)
    train_offline(half, resume=True)
    full, resumed = train_losses(tmp_path / "full"), train_losses(tmp_path / "half")
    assert sorted(resumed) == [1, 2, 3, 4], "resume must not duplicate or drop metric lines"
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5)


BAD_LINES = {
    "missing": ({"prompt": "Tom ran.", "chosen": " He was fast."}, r"line 2: field 'rejected': missing"),
    "identical": (
        {"prompt": "Tom ran.", "chosen": " Same.", "rejected": " Same."},
        r"line 2: field 'chosen'.*identical",
    ),
    "malformed": ('{"prompt": "Tom ran.", "chosen": " He', r"line 2: malformed JSON"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_input_names_file_line_and_field(tmp_path, toy, kind):
    bad, pattern = BAD_LINES[kind]
    rows = toy_rows()
    path = write_jsonl(tmp_path / "bad.jsonl", [rows[0], bad, *rows[1:]])
    with pytest.raises(DataError, match=pattern) as info:
        train_offline(tiny_cfg(tmp_path, path))
    assert "bad.jsonl" in str(info.value)


def test_skip_policy_reports_the_number_skipped(tmp_path):
    rows = toy_rows()
    path = write_jsonl(tmp_path / "bad.jsonl", [rows[0], *(bad for bad, _ in BAD_LINES.values()), *rows[1:]])
    summary = train_offline(tiny_cfg(tmp_path, path, "--data.on_error=skip", "--train.steps=1"))
    train = summary["data"]["train"]
    assert train["skipped"] == {"missing_field": 1, "chosen_equals_rejected": 1, "malformed_json": 1}
    assert train["rows"] == 26 and train["loaded"] == 24 and train["pairs"] == 18  # 6 held out
    saved = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert saved["train"]["skipped"] == train["skipped"]


def test_copg_without_scores_says_how_to_get_them(tmp_path):
    rows = [{k: v for k, v in r.items() if "score" not in k} for r in toy_rows()]
    with pytest.raises(DataError, match="rescore_with"):
        train_offline(tiny_cfg(tmp_path, write_jsonl(tmp_path / "p.jsonl", rows), "--loss.name=copg"))


def test_reward_model_learns_a_separable_toy_set(tmp_path, toy):
    cfg = tiny_cfg(
        tmp_path,
        toy,
        "--loss.name=reward_model",
        "--train.steps=12",
        "--train.batch_size=8",
        "--train.lr=3e-3",
        "--eval.every=4",
        "--output.report=true",
    )
    summary = train_offline(cfg)
    final = summary["eval_final"]
    assert (
        final["eval/accuracy"] > 0.5 and final["eval/accuracy/en"] > 0.5 and final["eval/accuracy/de"] > 0.5
    )
    assert final["eval/margin"] > summary["eval_start"]["eval/margin"]
    assert final["eval/loss"] < 0.5 * summary["eval_start"]["eval/loss"]  # learned, not a lucky random head
    assert (tmp_path / "run" / "checkpoints" / "best").is_file()
    assert write_training_report(summary, cfg).is_file()
    from polyalign.rewards.model import RewardModelScorer

    scorer = RewardModelScorer(summary["model"])  # the exported model loads as a reward function
    good, bad = scorer(
        ["Story 99: once upon a time, Tom"] * 2,
        [" was good and happy and kind.", " was bad and sad and mean."],
    )
    assert good > bad


def test_split_by_prompt_and_batch_order():
    from polyalign.data.preference import PreferencePair

    pairs = [PreferencePair(f"p{i // 2}", "a", "b", None, "s", i) for i in range(20)]
    train, held = split_by_prompt(pairs, 0.25, seed=0)
    assert len(held) == 6 and not {p.prompt for p in train} & {p.prompt for p in held}
    epoch = [r for s in range(5) for r in batch_indices(10, s, 2, seed=3)]
    assert sorted(epoch) == list(range(10)) and epoch != list(range(10))
    assert batch_indices(10, 7, 3, seed=3) == batch_indices(10, 7, 3, seed=3)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "offline").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_offline_config_loads(path):
    assert is_offline_config(path)
    cfg = load_offline_config(path)
    assert cfg.loss.name == path.stem and cfg.data.max_length <= 192


def test_config_errors_and_dispatch(tmp_path):
    with pytest.raises(ConfigError, match="loss.name"):
        load_offline_config(None, ["--loss.name=kto"])
    with pytest.raises(ConfigError, match="steps .1. > warmup_steps .4."):
        load_offline_config(ROOT / "configs" / "offline" / "dpo.yaml", ["--train.steps=1"])
    with pytest.raises(ConfigError, match="data.columns"):
        load_offline_config(None, ["--data.columns={answer: a}"])
    assert not is_offline_config(ROOT / "configs" / "quickstart.yaml")


@pytest.mark.parametrize(
    "name",
    [
        "dpo",
        "ipo",
        "sft",
        "reward_model",
        pytest.param("copg", marks=pytest.mark.slow),
    ],  # copg re-scores 300 pairs
)
def test_shipped_offline_config_runs_one_step(tmp_path, name):
    cfg = load_offline_config(
        ROOT / "configs" / "offline" / f"{name}.yaml",
        [
            "--train.steps=1",
            "--train.warmup_steps=0",
            "--eval.max_pairs=4",
            f"--output.run_dir={tmp_path}",
            "--output.progress=false",
        ],
    )
    summary = train_offline(cfg)
    assert summary["data"]["train"]["pairs"] == 270 and summary["eval_final"]["eval/loss"] > 0
    assert "eval/loss" in write_training_report(summary, cfg).read_text()


def test_ties_count_half_and_the_export_names_its_step(tmp_path, toy, monkeypatch):
    """At step 0 the policy is its reference: every DPO margin is exactly 0, a tie, which counts half
    (accuracy 0.5, not 0). output.export: best exports the best checkpoint's weights and the summary names
    its step (here the first evaluation is made the best); final exports the last step's."""
    from polyalign.train import offline
    from polyalign.train.checkpoint import load_checkpoint

    first_is_best = offline.loop.Trainer(
        offline.train_step, offline.evaluate, lambda result, best: best is None, offline.summary
    )
    monkeypatch.setattr(offline, "TRAINER", first_is_best)
    common = ["--loss.name=dpo", "--train.steps=3", "--train.lr=1e-2", "--eval.every=1"]
    best = train_offline(tiny_cfg(tmp_path, toy, *common, "--output.export=best", name="best"))
    assert best["eval_start"]["eval/accuracy"] == 0.5 and best["eval_start"]["eval/margin"] == 0.0
    assert best["best_eval"]["step"] == 1 and best["model_step"] == 1
    exported, checkpoint = load_policy(best["model"])[0], load_policy("stories260K")[0]
    load_checkpoint(
        tmp_path / "best" / "checkpoints" / "step_000001", {"policy": checkpoint}, restore_rng=False
    )
    final_weights = load_policy("stories260K")[0]
    load_checkpoint(tmp_path / "best", {"policy": final_weights}, restore_rng=False)  # the latest: step 3
    for name, weight in checkpoint.state_dict().items():
        assert torch.equal(exported.state_dict()[name], weight), name
    assert any(not torch.equal(b, c) for b, c in zip(checkpoint.parameters(), final_weights.parameters()))
    final = train_offline(tiny_cfg(tmp_path, toy, *common, name="final"))  # export: final, the default
    assert final["model_step"] == 3
