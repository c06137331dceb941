"""Config loading: strict keys, types, dotted overrides, validation, and every shipped YAML."""

import re
from pathlib import Path

import pytest
import yaml

from polyalign.config import ConfigError, RunConfig, dump_yaml, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_quickstart():
    cfg = load_config(None)
    assert cfg.algo.name == "rloo" and cfg.rollout.samples_per_prompt == 4
    assert cfg.model.policy == "stories260K"


def test_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lrate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "lrate" in str(e.value) and "'lr'" in str(e.value) and str(path) in str(e.value)


def test_unknown_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="trainer"):
        load_config(path)


def test_wrong_type_names_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: many\n")
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(path)


def test_dotted_overrides_and_yaml_float_strings():
    cfg = load_config(None, ["--train.lr=1e-6", "--algo.name=reinforce", "--rollout.stop_strings=['.']"])
    assert cfg.train.lr == 1e-6 and cfg.algo.name == "reinforce" and cfg.rollout.stop_strings == ["."]
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        load_config(None, ["--train.lr"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("--algo.name=dpo", "algo.name: 'dpo' not in rloo|reinforce"),
        ("--rollout.samples_per_prompt=1", "must be >= 2 for rloo"),
        ("--algo.kl_estimator=k9", "kl_estimator"),
        ("--rollout.prompts_per_step=3", "multiple of algo.updates_per_batch"),
    ],
)
def test_validation_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


ONLINE_BAD = [
    ("--train.lr=inf", "train.lr must be a finite number, got inf"),
    ("--algo.kl_coef=nan", "algo.kl_coef must be a finite number"),
    ("--reward.functions={a: .inf}", "reward.functions.a must be a finite number"),
    ("--algo.clip_eps=-.inf", "algo.clip_eps must be a finite number"),
    ("--rollout.prompts_per_step=0", "rollout.prompts_per_step must be > 0, got 0"),
    ("--output.keep_last=0", "output.keep_last must be > 0"),
    ("--eval.num_prompts=-1", "eval.num_prompts must be > 0, got -1"),
    ("--train.max_skipped_steps=0", "train.max_skipped_steps must be > 0"),
    ("--reward.max_abs=0", "reward.max_abs must be > 0"),
    ("--rollout.temperature=-1", "rollout.temperature must be >= 0"),
    ("--output.checkpoint_every=-2", "output.checkpoint_every must be >= 0"),
    ("--output.export=latest", "output.export: 'latest' not in final|best"),
]
OFFLINE_BAD = [
    ("--loss.beta=inf", "loss.beta must be a finite number"),
    ("--train.lr=nan", "train.lr must be a finite number"),
    ("--train.batch_size=0", "train.batch_size must be > 0"),
    ("--eval.max_pairs=-1", "eval.max_pairs must be >= 0"),
    ("--reference.batch_size=0", "reference.batch_size must be > 0"),
    ("--data.eval_fraction=-0.1", "data.eval_fraction must be >= 0"),
]


@pytest.mark.parametrize("override, message", ONLINE_BAD)
def test_non_finite_and_non_positive_settings_fail_at_load(override, message):
    """One line naming the key, at load (before any model loads); a negative reward weight stays allowed."""
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value)
    assert load_config(None, ["--reward.functions={lexicon_sentiment: -1.0}", "--train.seed=-1"])


@pytest.mark.parametrize("override, message", OFFLINE_BAD)
def test_offline_settings_fail_at_load(override, message):
    from polyalign.config_offline import load_offline_config

    with pytest.raises(ConfigError, match=message):
        load_offline_config(None, [override])


def test_shipped_configs_by_name_from_any_folder(tmp_path, monkeypatch):
    from polyalign.config_offline import is_offline_config, load_offline_config

    monkeypatch.chdir(tmp_path)
    for name in ("offline/dpo", "configs/offline/dpo.yaml", "offline/dpo.yaml"):
        assert is_offline_config(name) and load_offline_config(name).loss.name == "dpo"
    assert load_config("tiny-cpu/ppo").algo.name == "ppo"
    with pytest.raises(ConfigError, match="nor among the shipped ones: `polyalign configs`"):
        load_config("tiny-cpu/nothing")
    with pytest.raises(ConfigError, match="not found"):
        load_config("../polyalign/configs/tiny-cpu/ppo")


def test_reinforce_allows_one_sample():
    assert (
        load_config(
            None, ["--algo.name=vanilla_pg", "--rollout.samples_per_prompt=1"]
        ).rollout.samples_per_prompt
        == 1
    )


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["--algo.name=ppo", "--train.steps=7"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


def load_any(path: Path):
    """Each family of configs with its own loader: eval/, synth/, experiment/, offline (a `loss:` section),
    online (the rest)."""
    from polyalign.config_offline import is_offline_config, load_offline_config
    from polyalign.recipes.evaluate.config import EvalRunConfig
    from polyalign.recipes.experiment.config import ExperimentConfig
    from polyalign.synth.config import SynthConfig

    special = {"eval": EvalRunConfig, "synth": SynthConfig, "experiment": ExperimentConfig}
    if path.parent.name in special:
        return load_config(path, cls=special[path.parent.name])
    if is_offline_config(path):
        return load_offline_config(path)
    return load_config(path)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_every_shipped_config_loads(path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    cfg = load_any(path)
    assert type(cfg).__name__ in (
        "RunConfig",
        "OfflineRunConfig",
        "EvalRunConfig",
        "SynthConfig",
        "ExperimentConfig",
    )
    if isinstance(cfg, RunConfig):
        assert "loss" not in data


def test_quickstart_file_is_the_default():
    assert load_config(ROOT / "configs" / "quickstart.yaml") == load_config(None)
