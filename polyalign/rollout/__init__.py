"""Rollout engines: turn prompts into sampled completions (a `Rollout`).

An engine knows token ids and sampling, never rewards or losses. Backends are looked up by name in
`ENGINES` and imported only when built. Optional backends register themselves (`register_engine`): the vLLM
engine (GPU, extra `polyalign[vllm]`) lives in `polyalign.recipes.vllm`, which `polyalign train` imports when
`rollout.engine: vllm`.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

from polyalign.types import Rollout, Sampling

ENGINES: dict[str, str] = {"hf": "polyalign.rollout.hf:HFEngine"}  # name -> "module:Class"


def register_engine(name: str, target: str) -> None:
    """Make `rollout.engine: NAME` build `target` ("module:Class", imported when built)."""
    ENGINES[name] = target


@runtime_checkable
class Engine(Protocol):
    """What trainers need from a generation backend."""

    def generate(self, prompts: list[str], n: int, sampling: Sampling, extras: dict | None = None) -> Rollout:
        """Sample n completions per prompt; rows are group-major (prompt i at rows i*n .. i*n+n-1).

        `extras` maps column names to per-prompt lists (length P); the Rollout repeats each n times.
        """
        ...

    def load_weights(self, model: Any) -> None:
        """Sync the engine's weights with `model` after an optimizer step."""
        ...


def build_engine(name: str, model: Any, tokenizer: Any, **options: Any) -> Engine:
    """Build the engine registered under `name` (see ENGINES) for this model and tokenizer.

    `options` go to the engine's constructor (e.g. the fields of `rollout.vllm` for the vLLM engine). A
    backend's third-party package is imported by its constructor, which names the extra that provides it.
    """
    if name not in ENGINES:
        hint = " (import polyalign.recipes.vllm first; polyalign train does)" if name == "vllm" else ""
        raise ValueError(f"unknown rollout engine {name!r}{hint}; registered: {sorted(ENGINES)}")
    module_name, class_name = ENGINES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)(model, tokenizer, **options)
