"""Paths named inside a config resolve relative to that config file, so `polyalign synth configs/synth/x.yaml`
and `polyalign experiment configs/experiment/y.yaml` work from any folder.

`load_config_at(path, overrides, cls, fields)` is `polyalign.config.load_config` plus that rule for the dotted
`fields` that hold input paths (prompt files, data files, nested configs). A relative value is joined to the
config file's folder when it exists there or looks like a file (a known suffix); anything else is left as
written: absolute paths, built-in names (`builtin:stories`, `xsafety`, anything with a ":"), hub ids
(`CohereForAI/aya_redteaming`, no file suffix, not a file next to the config). Command-line overrides are
relative to the current folder, as a user typing them expects; overrides written inside another config
(an experiment's `synth_overrides`) are relative to that config (`resolve_override` with its folder).
Output folders (`out_dir`) are not inputs and stay relative to the current folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from polyalign.config import load_config

FILE_SUFFIXES = (".yaml", ".yml", ".jsonl", ".json", ".ndjson", ".csv", ".tsv", ".parquet", ".txt")
SYNTH_PATHS = ("source.path",)


def resolve_path(value: Any, base: Path | None) -> Any:
    """`value` joined to `base` (module docstring rule); unchanged when it is not a relative file path."""
    if base is None or not isinstance(value, str) or not value or ":" in value or Path(value).is_absolute():
        return value
    candidate = base / value
    if candidate.exists() or Path(value).suffix.lower() in FILE_SUFFIXES:
        return os.path.normpath(candidate)
    return value


def resolve_override(item: str, fields: tuple[str, ...], base: Path | None) -> str:
    """A `key=value` override with a path `value` of one of `fields` resolved against `base`."""
    key, sep, raw = item.removeprefix("--").partition("=")
    if base is None or not sep or key not in fields:
        return item
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return item  # load_config reports it
    resolved = resolve_path(value, base)
    return item if resolved == value else f"{key}={json.dumps(resolved)}"


def _file_values(path: str | Path, fields: tuple[str, ...]) -> dict[str, Any]:
    """{field: value} of the `fields` set in the YAML file; {} when it cannot be read (load_config says why)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    out = {}
    for key in fields:
        node = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            out[key] = node
    return out


def load_config_at(path: str | Path | None, overrides: list[str], cls: type, fields: tuple[str, ...]) -> Any:
    """`load_config(path, overrides, cls)` with the path `fields` written in the file resolved relative to it."""
    if path is None:
        return load_config(None, list(overrides), cls=cls)
    base = Path(path).parent
    fixed = [
        f"{key}={json.dumps(resolve_path(value, base))}"
        for key, value in _file_values(path, fields).items()
        if resolve_path(value, base) != value
    ]
    return load_config(path, [*fixed, *overrides], cls=cls)
