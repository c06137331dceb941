"""Run configuration: typed dataclasses are the single source of truth; YAML is their serialised form.

`load_config(path, overrides)` reads YAML strictly (an unknown or mistyped key is an error that lists the
valid keys), applies dotted overrides (`--train.lr=1e-6`), then validates. The resolved config is written
next to every run as `config.yaml`. Imports no transformers.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from polyalign.config_algo import AlgoConfig  # noqa: F401 (re-exported: the algo section)

SHIPPED = Path(__file__).parent / "configs"  # the configs that travel with the package
Schedule = Literal["constant", "linear", "cosine"]  # after warm-up


@dataclass(frozen=True)
class LoraConfig:
    """LoRA through peft: only the adapter trains; the reference is the base with the adapter disabled."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt, or "all-linear" (every linear layer but the output head)."""
    save: Literal["adapter", "merged", "both"] = "adapter"
    """What checkpoints hold: adapter (adapter weights only) | merged (base + adapter folded in) | both."""


@dataclass(frozen=True)
class ModelConfig:
    policy: str = "stories260K"
    """Policy to train: a built-in short name, a local directory or a Hugging Face hub id."""
    reference: str | None = None
    """Reference model for the KL penalty; None = a frozen copy of the starting policy."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The dtype the models are held in."""
    gradient_checkpointing: bool = False
    device: str = "cpu"
    threads: int = 0
    """CPU threads (torch.set_num_threads); 0 = the process's setting (the command's: docs/threads.md)."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun (more than one process): ddp (replicated weights, averaged gradients) | fsdp (FSDP2
    `fully_shard`: weights, gradients and optimizer state sharded across processes). Ignored in one process."""
    lora: LoraConfig | None = None
    """None = train every weight; a mapping (e.g. {r: 16}) = LoRA adapters through peft."""


@dataclass(frozen=True)
class DataConfig:
    prompts: str = "builtin:stories"
    """Prompt set: `builtin:stories`, or a JSONL/JSON/CSV file with a `prompt` column (extra columns are passed
    to reward functions)."""
    eval_prompts: str | None = "builtin:stories-eval"
    """Held-out prompts for periodic evaluation; None disables evaluation."""
    prompt_column: str = "prompt"
    max_prompt_tokens: int = 128
    """Prompts longer than this are an error (naming the row), never silently cut."""


@dataclass(frozen=True)
class VLLMConfig:
    gpu_memory_utilization: float = 0.3
    """Share of the GPU's memory vLLM may take (weights + KV cache); training uses the rest (colocated)."""
    enforce_eager: bool = False
    """True skips CUDA-graph capture (faster start, slower decode)."""
    max_model_len: int = 0
    """Longest prompt + completion vLLM plans for; 0 = the model's own context length."""
    sleep_mode: bool = False
    """Free vLLM's KV cache between rollouts (more memory for training, slower wake-up)."""
    attention_backend: str = ""
    """vLLM attention backend override, e.g. FLEX_ATTENTION for tiny head sizes; "" = vLLM's choice."""


@dataclass(frozen=True)
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"
    samples_per_prompt: int = 4
    """k: completions sampled per prompt (the group size)."""
    prompts_per_step: int = 16
    """Prompts per rollout batch; the batch holds prompts_per_step * samples_per_prompt completions."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_strings: list[str] = field(default_factory=list)
    vllm: VLLMConfig = field(default_factory=lambda: VLLMConfig())
    """Options of the vLLM engine (rollout.engine: vllm)."""


@dataclass(frozen=True)
class RewardConfig:
    functions: dict[str, float] = field(default_factory=lambda: {"model:stories260K-sentiment-rm": 1.0})
    """Reward specs and their weights: a built-in name, `module:function`, or `model:<name or path>`."""
    no_eos_penalty: float = 0.0
    """Subtracted from the score of a completion that never reached EOS (a guard against reward hacking)."""
    length_penalty: float = 0.0
    """Subtracted per completion token."""
    max_abs: float = 1e6
    """A reward function's score beyond +-max_abs is an error naming the function (a runaway reward swamps
    the loss: the whole batch would learn from one row, or the loss overflows)."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    """Rollout batches (online) to train on."""
    lr: float = 5e-5
    warmup_steps: int = 0
    schedule: Schedule = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    micro_batch_size: int = 0
    """Rows per forward/backward; 0 = the whole minibatch. Gradients accumulate over micro-batches."""
    seed: int = 0
    max_skipped_steps: int = 3
    """Updates with a non-finite loss or gradient norm are skipped; this many in a row stop the run with an
    error (the weights, checked finite after every update, are never saved non-finite)."""


@dataclass(frozen=True)
class EvalConfig:
    every: int = 25
    """Evaluate every N steps (and at the end); 0 = never."""
    num_prompts: int = 32
    max_new_tokens: int = 64
    scorer: str | None = None
    """A second reward spec for held-out completions: eval/scorer, monitor/scorer_corr (docs/monitors.md)."""


@dataclass(frozen=True)
class OutputConfig:
    run_dir: str = "runs/quickstart"
    checkpoint_every: int = 25
    keep_last: int = 2
    checkpoint_format: Literal["full", "sharded"] = "full"
    """full: weights (safetensors) + optimizer state, written by rank 0 (FSDP gathers them first) | sharded:
    torch.distributed.checkpoint, each process writes its shards (for models too big to gather at once)."""
    sample_every: int = 25
    progress: bool = True
    report: bool = True
    export: Literal["final", "best"] = "final"
    """Offline runs: run_dir/model holds final (the last step's weights) | best (best held-out accuracy's)."""


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        validate(self)


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclasses."""


def check(ok: bool, message: str) -> None:
    """The one validation step of every config module: raise ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)


# Numbers that must be > 0 (zero means nothing for them); every other number must be >= 0 unless SIGNED.
POSITIVE = tuple(
    """rollout.samples_per_prompt rollout.prompts_per_step rollout.max_new_tokens rollout.top_p
    rollout.vllm.gpu_memory_utilization algo.updates_per_batch algo.ppo_epochs algo.ppo_clip_eps train.steps
    eval.num_prompts eval.max_new_tokens data.max_prompt_tokens reward.max_abs""".split()
)
SHARED_POSITIVE = tuple(
    "train.lr train.max_skipped_steps output.keep_last model.lora.r model.lora.alpha".split()
)
SIGNED = ("reward.functions", "reward.no_eos_penalty", "reward.length_penalty", "train.seed")


def leaves(node: typing.Any, where: str = "", hint: typing.Any = None) -> typing.Iterator[tuple]:
    """(dotted key, value, type) of every setting in a config, nested sections and mappings included."""
    if dataclasses.is_dataclass(node):
        hints = typing.get_type_hints(type(node))
        for f in dataclasses.fields(node):
            yield from leaves(getattr(node, f.name), f"{where}.{f.name}".lstrip("."), hints[f.name])
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, f"{where}.{key}")
    else:
        yield where, node, hint


def check_settings(cfg: typing.Any, positive: tuple[str, ...]) -> None:
    """A choice (a Literal field) is one of its options. Every number is finite (`--train.lr=inf` would train
    on NaN weights); counts, sizes, rates and coefficients are >= 0, and > 0 where zero means nothing
    (`positive`): at load, before any model loads."""
    for where, value, hint in leaves(cfg):
        literal = next((h for h in (hint, *typing.get_args(hint)) if typing.get_origin(h) is Literal), None)
        options = typing.get_args(literal) if literal else ()  # a choice, or an optional one
        check(not options or value in options, f"{where}: {value!r} not in {'|'.join(options)}")
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        check(math.isfinite(value), f"{where} must be a finite number, got {value}")
        if where in positive + SHARED_POSITIVE:
            check(value > 0, f"{where} must be > 0, got {value}")
        elif not where.startswith(SIGNED):
            check(value >= 0, f"{where} must be >= 0, got {value}")


def validate_common(cfg: typing.Any, positive: tuple[str, ...], schedule_steps: int) -> None:
    """Checks shared by online and offline configs: choices, numbers, LoRA, schedule."""
    m, t = cfg.model, cfg.train
    check_settings(cfg, positive)
    if m.lora is not None:
        check(m.lora.dropout < 1, f"model.lora.dropout must be in [0, 1), got {m.lora.dropout}")
    check(
        t.schedule == "constant" or schedule_steps == 0 or schedule_steps > t.warmup_steps,
        f"train: the {t.schedule} schedule needs steps ({schedule_steps}) > warmup_steps ({t.warmup_steps})",
    )


def validate(cfg: RunConfig) -> None:
    a, r, t = cfg.algo, cfg.rollout, cfg.train
    validate_common(cfg, POSITIVE, t.steps)
    if a.name in ("rloo", "copg", "raft"):
        check(
            r.samples_per_prompt >= 2,
            f"rollout.samples_per_prompt must be >= 2 for {a.name} (got {r.samples_per_prompt})",
        )
    why = f"algo.preset {a.preset} applies to algo.name rloo only: set algo.name: rloo or algo.preset: paper"
    check(a.preset == "paper" or a.name == "rloo", why)
    check(
        a.ratio == "token" or (a.kl_in != "token_reward" and a.logprob_aggregate in ("sum", "token_mean")),
        f"algo: kl_in {a.kl_in} / logprob_aggregate {a.logprob_aggregate} act per token: set algo.ratio: token",
    )
    check(a.importance_cap >= 1.0, f"algo.importance_cap must be >= 1, got {a.importance_cap}")
    check(
        r.prompts_per_step % a.updates_per_batch == 0,
        f"rollout.prompts_per_step ({r.prompts_per_step}) must be a multiple of algo.updates_per_batch "
        f"({a.updates_per_batch}) so every minibatch holds whole groups",
    )
    check(r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}")
    check(r.vllm.gpu_memory_utilization < 1, "rollout.vllm.gpu_memory_utilization must be in (0, 1)")
    batch = r.prompts_per_step * r.samples_per_prompt
    check(t.micro_batch_size <= batch, f"train.micro_batch_size must be in 0..{batch}")
    check(bool(cfg.reward.functions), "reward.functions: give at least one reward")


# ---------------------------------------------------------------- YAML <-> dataclasses


def from_dict(cls: type, data: dict | None, where: str = "") -> typing.Any:
    """Build dataclass `cls` from a nested dict, strictly: unknown keys and wrong types are errors."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; valid keys: {names}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}".lstrip(".")) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: typing.Any, value: typing.Any, where: str) -> typing.Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: None is not allowed")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(args[0], k, where): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads "1e-6" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if origin is Literal:  # a choice: its options are checked with the other settings (`check_settings`)
        tp = type(args[0])
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(
        f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r} ({type(value).__name__})"
    )


def split_overrides(extra: list[str]) -> list[str]:
    """The command line's `--section.key=value` overrides; anything else ends the command with one line."""
    bad = [x for x in extra if not (x.startswith("--") and "=" in x)]
    if bad:
        raise SystemExit(
            f"polyalign: unrecognised arguments {bad}; config overrides look like --train.lr=1e-6"
        )
    return extra


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` / `--a.b=c` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.removeprefix("--").partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected --section.key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def load_config(
    path: str | Path | None = None, overrides: list[str] = (), cls: type = RunConfig
) -> typing.Any:
    """YAML file (or the built-in defaults when path is None) + dotted overrides -> validated config."""
    data: dict = {}
    if path is not None:
        path = find_config(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    apply_overrides(data, list(overrides))
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path or 'defaults'}: {e}") from None


def find_config(path: str | Path) -> Path:
    """An existing file, else a shipped config named by its path under polyalign/configs/, with or without a
    leading `configs/` and the `.yaml` suffix: `offline/dpo`, `configs/offline/dpo.yaml`, from any folder."""
    if Path(path).is_file():
        return Path(path)
    name = str(path).removeprefix("configs/").removesuffix(".yaml")
    shipped = SHIPPED / f"{name}.yaml"
    if not shipped.is_file() or ".." in Path(name).parts:
        raise ConfigError(f"config file not found: {path} (nor among the shipped ones: `polyalign configs`)")
    return shipped


def dump_yaml(cfg: typing.Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
