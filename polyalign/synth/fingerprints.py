"""Settings fingerprints of the resumable synth stages, so that a rerun never mixes records made with other
settings into a run whose config.yaml says otherwise.

Every record of translate / generate / score carries `fingerprint`: a hash of the settings that made it, its
stage's own and, through their fingerprints, those of the stages it reads from:
    translate   source.language / layout / columns, translate.template, translate.translator (one per stage)
    generate    generators[<name>] (one per generator; adding a generator leaves the others' records valid)
                + the translate fingerprint
    score       judge + the fingerprint of the completion's generator
Transport settings (base_url, api_key_env, max_workers, retries, timeouts, cache) are left out: they do not
change what a backend says. `source.path` is left out too: records are keyed by ids that name their file.

Before a stage runs, `check_stage` compares its file's fingerprints with the current ones and, on a
difference, refuses with one line naming the stage and the changed keys (the settings of every fingerprint
ever written in out_dir are kept in out_dir/fingerprints.json, so old values can be named). `force_stage`
(`polyalign synth CONFIG --force-stage NAME`) removes the files of that stage and of every later one, so they
are redone; the pure stages pair and filter are rewritten on every run anyway.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from polyalign.files import atomic_write_json
from polyalign.synth.config import SynthConfig
from polyalign.synth.store import read_stage

STAGES = ("translate", "generate", "score", "pair", "filter")
FILES = {"translate": "prompts.jsonl", "generate": "completions.jsonl", "score": "scored.jsonl"}
REGISTRY = "fingerprints.json"
_TRANSPORT = {"base_url", "api_key_env", "max_workers", "max_retries", "timeout_s", "backoff_s", "cache"}


class SettingsChanged(ValueError):
    """A stage file holds records made with other settings than the config's."""


def fingerprint(settings: Any) -> str:
    text = json.dumps(settings, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _content(section: Any) -> dict:
    return {k: v for k, v in asdict(section).items() if k not in _TRANSPORT}


def stage_settings(cfg: SynthConfig) -> dict[str, dict[str, dict]]:
    """{stage: {group: settings}}; the group is "" for translate and the generator name for generate/score."""
    s, t = cfg.source, cfg.translate
    translate = {
        "source": {"language": s.language, "layout": s.layout, "columns": dict(s.columns)},
        "translate": {"template": t.template, "translator": _content(t.translator)},
    }
    generate = {
        g.label: {f"generators[{g.label}]": _content(g), "translate": fingerprint(translate)}
        for g in cfg.generators
    }
    score = {
        name: {"judge": _content(cfg.judge), "generate": fingerprint(settings)}
        for name, settings in generate.items()
    }
    return {"translate": {"": translate}, "generate": generate, "score": score}


def stage_fingerprints(settings: dict[str, dict[str, dict]]) -> dict[str, dict[str, str]]:
    return {stage: {g: fingerprint(v) for g, v in groups.items()} for stage, groups in settings.items()}


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, as "key: old -> new"."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += changed_keys(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    short = lambda v: repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
    return [] if old == new else [f"{prefix}: {short(old)} -> {short(new)}"]


def update_registry(out_dir: Path, settings: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Add the current settings to out_dir/fingerprints.json ({fingerprint: settings}); returns the old one."""
    path = out_dir / REGISTRY
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    new = dict(old)
    for groups in settings.values():
        new.update({fingerprint(v): v for v in groups.values()})
    if new != old:
        atomic_write_json(path, new)
    return old


def check_stage(stage: str, path: Path, settings: dict[str, dict], registry: dict[str, dict]) -> None:
    """SettingsChanged when a record of `path` has another fingerprint than its group's current one."""
    want = {group: fingerprint(v) for group, v in settings.items()}
    group_of = (lambda r: "") if stage == "translate" else (lambda r: r.get("generator"))
    stale = [r for r in read_stage(path) if r.get("fingerprint") != want.get(group_of(r))]
    if not stale:
        return
    changes: list[str] = []
    for group, fp in dict.fromkeys((group_of(r), r.get("fingerprint")) for r in stale):
        if group not in settings:
            found = [f"generator {group!r} is no longer in the config"]
        elif fp not in registry:
            found = ["records without a known settings fingerprint (an older polyalign or another out_dir)"]
        else:
            found = changed_keys(registry[fp], settings[group]) or ["upstream records changed"]
        changes += [c for c in found if c not in changes]
    raise SettingsChanged(
        f"synth stage {stage!r}: {len(stale)} record(s) in {path} were made with other settings "
        f"({'; '.join(changes)}); rerun with --force-stage {stage} to redo it and the stages after it, "
        "or use a new out_dir"
    )


def force_stage(out_dir: Path, name: str) -> list[Path]:
    """Remove the files of stage `name` and of every later resumable stage; returns the removed paths."""
    if name not in STAGES:
        raise SettingsChanged(f"--force-stage {name!r}: not a synth stage; stages: {', '.join(STAGES)}")
    later = STAGES[STAGES.index(name) :]
    removed = [out_dir / FILES[s] for s in later if s in FILES and (out_dir / FILES[s]).is_file()]
    for path in removed:
        path.unlink()
    return removed
