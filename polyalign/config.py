"""Run configuration: typed dataclasses are the single source of truth; YAML is their serialised form.

`load_config(path, overrides)` reads YAML strictly (an unknown or mistyped key is an error that lists the
valid keys), applies dotted overrides (`--train.lr=1e-6`), then validates. The resolved config is written
next to every run as `config.yaml`. Imports no transformers.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ONLINE_ALGORITHMS = ("rloo", "reinforce", "vanilla_pg", "ppo", "raft", "copg")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA through peft: only the adapter trains; the reference is the base with the adapter disabled."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt, or "all-linear" (every linear layer but the output head)."""
    save: str = "adapter"
    """What checkpoints hold: adapter (adapter weights only) | merged (base + adapter folded in) | both."""


@dataclass(frozen=True)
class ModelConfig:
    policy: str = "stories260K"
    """Policy to train: a built-in short name, a local directory or a Hugging Face hub id."""
    reference: str | None = None
    """Reference model for the KL penalty; None = a frozen copy of the starting policy."""
    dtype: str = "float32"
    """float32 | bfloat16 | float16: the dtype the models are held in."""
    gradient_checkpointing: bool = False
    device: str = "cpu"
    threads: int = 0
    """torch.set_num_threads on CPU; 0 = leave torch's default."""
    parallel: str = "ddp"
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
    engine: str = "hf"
    """hf | vllm."""
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


@dataclass(frozen=True)
class AlgoConfig:
    name: str = "rloo"
    """rloo | reinforce | vanilla_pg | ppo | raft | copg."""
    kl_coef: float = 0.05
    """beta in r - beta * log(pi/pi_ref). 0 disables the reference model."""
    kl_estimator: str = "k1"
    """k1 (signed, the papers') | k2 | k3 | abs."""
    kl_aggregate: str = "sum"
    """sum over completion tokens (the papers') | mean."""
    logprob_aggregate: str = "sum"
    """Sequence log-prob in the policy loss: sum (the papers') | token_mean."""
    whiten_advantages: bool = False
    clip_eps: float | None = None
    """Sequence-level ratio clipping for the REINFORCE family; None = no ratio, no clip (the paper)."""
    updates_per_batch: int = 2
    """Gradient steps per rollout batch (the rollout is split into this many minibatches; paper: 2)."""
    baseline_momentum: float | None = None
    """reinforce: None = running mean of all past rewards (the paper); else an exponential moving average."""
    copg_form: str = "surrogate"
    """copg: surrogate | squared (same gradient)."""
    ppo_epochs: int = 4
    ppo_clip_eps: float = 0.2
    gae_lambda: float = 0.95
    gamma: float = 1.0
    value_coef: float = 0.1
    value_clip_eps: float | None = 0.2
    value_model: str | None = None
    """ppo: critic initialisation; None = the policy's weights with a fresh scalar head."""
    importance_correction: str = "none"
    """none | tis: multiply each completion's advantage by min(pi_train / pi_sampler, importance_cap), the
    sequence-level truncated importance weight that corrects a rollout engine whose log-probs differ from
    the trainer's (vLLM, bf16). The mismatch itself is logged every step either way."""
    importance_cap: float = 2.0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    """Rollout batches (online) to train on."""
    lr: float = 5e-5
    warmup_steps: int = 0
    schedule: str = "constant"
    """constant | linear | cosine (after warm-up)."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    micro_batch_size: int = 0
    """Rows per forward/backward; 0 = the whole minibatch. Gradients accumulate over micro-batches."""
    seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
    every: int = 25
    """Evaluate every N steps (and at the end); 0 = never."""
    num_prompts: int = 32
    max_new_tokens: int = 64


@dataclass(frozen=True)
class OutputConfig:
    run_dir: str = "runs/quickstart"
    checkpoint_every: int = 25
    keep_last: int = 2
    checkpoint_format: str = "full"
    """full: full weights (safetensors) + optimizer state, written by rank 0 (FSDP gathers them first) |
    sharded: torch.distributed.checkpoint, every process writes its own shards (no full copy anywhere: for
    models too big to gather on one machine). Either kind resumes on any process count."""
    sample_every: int = 25
    progress: bool = True
    report: bool = True


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


def check_choice(value: str, where: str, options: tuple[str, ...]) -> None:
    check(value in options, f"{where}: {value!r} not in {'|'.join(options)}")


def validate(cfg: RunConfig) -> None:
    a, r, t = cfg.algo, cfg.rollout, cfg.train
    check(
        a.name in ONLINE_ALGORITHMS,
        f"algo.name: unknown algorithm {a.name!r}; choose from {ONLINE_ALGORITHMS}",
    )
    if a.name in ("rloo", "copg", "raft"):
        check(
            r.samples_per_prompt >= 2,
            f"rollout.samples_per_prompt must be >= 2 for {a.name} (got {r.samples_per_prompt})",
        )
    check_choice(a.kl_estimator, "algo.kl_estimator", ("k1", "k2", "k3", "abs"))
    check_choice(a.kl_aggregate, "algo.kl_aggregate", ("sum", "mean"))
    check_choice(a.logprob_aggregate, "algo.logprob_aggregate", ("sum", "token_mean"))
    check_choice(a.copg_form, "algo.copg_form", ("surrogate", "squared"))
    check(a.kl_coef >= 0, "algo.kl_coef must be >= 0")
    batch = r.prompts_per_step * r.samples_per_prompt
    check(
        a.updates_per_batch >= 1 and r.prompts_per_step % a.updates_per_batch == 0,
        f"rollout.prompts_per_step ({r.prompts_per_step}) must be a multiple of algo.updates_per_batch "
        f"({a.updates_per_batch}) so every minibatch holds whole groups",
    )
    check_choice(r.engine, "rollout.engine", ("hf", "vllm"))
    check(
        r.max_new_tokens >= 1 and r.temperature >= 0 and 0 < r.top_p <= 1,
        "rollout: need max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1",
    )
    check_choice(t.schedule, "train.schedule", ("constant", "linear", "cosine"))
    check(t.steps >= 1 and t.lr > 0, "train: need steps >= 1 and lr > 0")
    check(0 <= t.micro_batch_size <= batch, f"train.micro_batch_size must be in 0..{batch}")
    check_choice(cfg.model.dtype, "model.dtype", ("float32", "bfloat16", "float16"))
    check(bool(cfg.reward.functions), "reward.functions: give at least one reward")
    check(
        a.importance_correction in ("none", "tis") and a.importance_cap >= 1.0,
        f"algo.importance_correction: {a.importance_correction!r} not in none|tis (importance_cap >= 1)",
    )
    check(
        0 < r.vllm.gpu_memory_utilization < 1 and r.vllm.max_model_len >= 0,
        "rollout.vllm: need 0 < gpu_memory_utilization < 1 and max_model_len >= 0",
    )
    validate_model(cfg.model)
    validate_output(cfg.output)


def validate_output(o: OutputConfig) -> None:
    check_choice(o.checkpoint_format, "output.checkpoint_format", ("full", "sharded"))


def validate_model(m: ModelConfig) -> None:
    """Checks shared by online and offline configs."""
    check_choice(m.parallel, "model.parallel", ("ddp", "fsdp"))
    if m.lora is not None:
        check(m.lora.r >= 1 and m.lora.alpha > 0, "model.lora: need r >= 1 and alpha > 0")
        check(0 <= m.lora.dropout < 1, f"model.lora.dropout must be in [0, 1), got {m.lora.dropout}")
        check_choice(m.lora.save, "model.lora.save", ("adapter", "merged", "both"))


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
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(
        f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r} ({type(value).__name__})"
    )


def to_dict(cfg: typing.Any) -> dict:
    return dataclasses.asdict(cfg)


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
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    apply_overrides(data, list(overrides))
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path or 'defaults'}: {e}") from None


def dump_yaml(cfg: typing.Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
