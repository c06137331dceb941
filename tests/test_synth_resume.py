"""Synth reruns: settings fingerprints (a changed setting refuses, --force-stage redoes that stage and the later
ones only), a torn last line redone with the seed an uninterrupted run gives it, and kill -9 at random points
of a run (several kills, each resumed) ending with every record once and the same records as an uninterrupted
run."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from polyalign.synth import stages
from polyalign.synth.config import BackendConfig, JudgeConfig, SynthConfig, TranslateConfig
from polyalign.synth.fingerprints import SettingsChanged
from polyalign.synth.pipeline import cli_synth, run_synth
from polyalign.synth.store import read_stage

ROOT = Path(__file__).resolve().parent.parent
STAGE_FILES = ("prompts.jsonl", "completions.jsonl", "scored.jsonl")


class Generator:
    """Completion = "<name> <seed % 97>: <prompt>", so a record's text shows the seed it was made with."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name, self.delay, self.seeds = name, delay, []

    def describe(self) -> str:
        return self.name

    def generate(self, prompts, seeds):
        time.sleep(self.delay)
        self.seeds += seeds
        return [f"{self.name} {s % 97}: {p}" for p, s in zip(prompts, seeds)]


class Translator:
    name = "word-translator"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay, self.calls = delay, 0

    def describe(self) -> str:
        return self.name

    def translate(self, texts, source_languages, target, seeds=None):
        time.sleep(self.delay)
        self.calls += 1
        return [f"bonjour {t} {s % 89}" for t, s in zip(texts, seeds)]


class Scorer:
    name = "length"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay, self.calls = delay, 0

    def describe(self) -> str:
        return self.name

    def score(self, prompts, completions, languages):
        time.sleep(self.delay)
        self.calls += 1
        return [(float(len(c) % 7), "ok") for c in completions]


def sources(n: int) -> list[dict]:
    return [stages.source_record(f"q{i}", f"prompt number {i} " + "x" * (i % 5), "en") for i in range(n)]


def config(out: Path, batch_size: int = 2, temperature: float = 0.7) -> SynthConfig:
    return SynthConfig(
        out_dir=str(out),
        progress=False,
        batch_size=batch_size,
        translate=TranslateConfig(languages=["fr"]),
        generators=[
            BackendConfig(name="a", temperature=temperature, seed=1),
            BackendConfig(name="b", temperature=1.0, seed=2),
        ],
        judge=JudgeConfig(kind="lexicon"),
    )


def run(cfg: SynthConfig, n: int = 6, **kw) -> tuple[dict, list[Generator], Translator, Scorer]:
    gens, translator, scorer = [Generator("a"), Generator("b")], Translator(), Scorer()
    return run_synth(cfg, gens, translator, scorer, sources(n), **kw), gens, translator, scorer


def records(out: Path) -> dict[str, dict[str, dict]]:
    """{stage file: {id: record}}, checking that every id is there once."""
    result = {}
    for name in STAGE_FILES:
        rows = read_stage(out / name)
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)), f"{name}: an id written twice"
        result[name] = {r["id"]: r for r in rows}
    return result


def test_every_stage_record_carries_its_settings_fingerprint(tmp_path):
    run(config(tmp_path))
    got = records(tmp_path)
    translate = {r["fingerprint"] for r in got["prompts.jsonl"].values()}
    by_generator = lambda name: {
        g: {r["fingerprint"] for r in got[name].values() if r["generator"] == g} for g in "ab"
    }
    assert len(translate) == 1 and None not in translate
    generate, score = by_generator("completions.jsonl"), by_generator("scored.jsonl")
    assert all(len(v) == 1 for v in (*generate.values(), *score.values()))
    assert generate["a"] != generate["b"] and score["a"] != score["b"] and generate["a"] != score["a"]
    registry = json.loads((tmp_path / "fingerprints.json").read_text())
    assert registry[next(iter(generate["a"]))]["generators[a]"]["temperature"] == 0.7


def test_changed_temperature_refuses_naming_the_stage_and_key(tmp_path):
    run(config(tmp_path))
    before = {name: (tmp_path / name).read_bytes() for name in (*STAGE_FILES, "config.yaml")}
    with pytest.raises(SettingsChanged) as err:
        run(config(tmp_path, temperature=0.9))
    message = str(err.value)
    assert "\n" not in message and message.startswith("synth stage 'generate': 12 record(s)")
    assert "generators[a].temperature: 0.7 -> 0.9" in message and "--force-stage generate" in message
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # nothing touched
    run(config(tmp_path, batch_size=5))  # the batch size is no setting of any record: reused as is


def test_cli_refuses_a_changed_translator_with_one_line(tmp_path):
    path = tmp_path / "synth.yaml"
    path.write_text(
        f"out_dir: {tmp_path / 'out'}\nprogress: false\ntranslate: {{languages: [fr]}}\n"
        "judge: {kind: lexicon}\n"
    )
    from polyalign.config import load_config

    run_synth(load_config(path, cls=SynthConfig), [Generator("stories-t0.7"), Generator("stories-t1.2")],
              Translator(), Scorer(), sources(3))  # fmt: skip
    with pytest.raises(SystemExit) as err:
        cli_synth(str(path), ["--translate.translator.temperature=0.5"])
    assert str(err.value).startswith("polyalign synth: synth stage 'translate': 6 record(s)")
    assert "translate.translator.temperature: 0.0 -> 0.5" in str(err.value)
    with pytest.raises(SystemExit, match="--force-stage 'sample': not a synth stage"):
        cli_synth(str(path), [], "sample")


def test_force_stage_redoes_that_stage_and_later_ones_only(tmp_path):
    run(config(tmp_path))
    first = records(tmp_path)
    prompts_bytes = (tmp_path / "prompts.jsonl").read_bytes()
    summary, gens, translator, scorer = run(config(tmp_path, temperature=0.9), force_stage="generate")
    assert translator.calls == 0 and (tmp_path / "prompts.jsonl").read_bytes() == prompts_bytes
    assert summary["stages"]["generate"]["already_done"] == 0 and len(gens[0].seeds) == 12
    assert summary["stages"]["score"]["already_done"] == 0 and summary["stages"]["score"]["written"] == 24
    again = records(tmp_path)
    for name in ("completions.jsonl", "scored.jsonl"):
        old = {r["fingerprint"] for r in first[name].values() if r["generator"] == "a"}
        new = {r["fingerprint"] for r in again[name].values() if r["generator"] == "a"}
        assert old.isdisjoint(new)
    # forcing the last resumable stage leaves the earlier ones alone
    summary, gens, translator, scorer = run(config(tmp_path, temperature=0.9), force_stage="score")
    assert translator.calls == 0 and gens[0].seeds == [] and scorer.calls == 12  # 24 completions, batch 2
    assert records(tmp_path)["completions.jsonl"] == again["completions.jsonl"]


def test_torn_last_line_is_redone_with_the_seed_of_an_uninterrupted_run(tmp_path):
    whole = tmp_path / "whole"
    run(config(whole))
    expected = records(whole)
    cut = tmp_path / "cut"
    run(config(cut))
    lines = (cut / "completions.jsonl").read_text().splitlines(keepends=True)
    torn = json.loads(lines[-4])
    (cut / "completions.jsonl").write_text("".join(lines[:-4]) + lines[-4][:25])  # killed mid-write
    (cut / "scored.jsonl").unlink()
    summary, gens, _, _ = run(config(cut, batch_size=3))  # another batch size: seeds do not move
    assert (
        summary["stages"]["generate"]["already_done"] == 20 and summary["stages"]["generate"]["written"] == 4
    )
    redone = [s for g in gens for s in g.seeds]
    assert torn["seed"] in redone and sorted(redone) == sorted(
        r["seed"]
        for r in expected["completions.jsonl"].values()
        if r["id"] in {json.loads(x)["id"] for x in lines[-4:]}
    )
    assert records(cut) == expected
    assert read_stage(cut / "final.jsonl") == read_stage(whole / "final.jsonl")


_RUN = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from pathlib import Path
    from test_synth_resume import Generator, Scorer, Translator, config, sources
    from polyalign.synth.pipeline import run_synth
    run_synth(config(Path({out!r}), batch_size=2), [Generator("a", 0.02), Generator("b", 0.02)], Translator(0.02),
              Scorer(0.02), sources(12))
    """
)


def _written(out: Path) -> int:
    return sum(len(read_stage(out / name)) for name in STAGE_FILES)


def test_kill_9_at_random_points_then_resume_gives_the_uninterrupted_records(tmp_path):
    """12 sources + 12 translations, 48 completions, 48 scores: 120 records. Three kills at random record
    counts (seeded, one in each stage), each followed by a rerun, then a rerun to the end."""
    whole = tmp_path / "whole"
    run_synth(config(whole), [Generator("a"), Generator("b")], Translator(), Scorer(), sources(12))
    out = tmp_path / "killed"
    script = _RUN.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(out))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(7)
    points = [rng.randrange(4, 24), rng.randrange(24, 72), rng.randrange(72, 118)]  # in each stage
    seen = []
    for point in points:
        proc = subprocess.Popen([sys.executable, "-c", script], env=env)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and _written(out) < point:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        seen.append(_written(out))
    assert seen == sorted(seen) and seen[-1] < 120, f"every kill should land mid-run: {seen}"
    done = subprocess.run([sys.executable, "-c", script], env=env, timeout=300)
    assert done.returncode == 0
    assert records(out) == records(whole)
    assert read_stage(out / "final.jsonl") == read_stage(whole / "final.jsonl")


@pytest.mark.parametrize("field", ["system", "max_new_tokens", "model"])
def test_any_generator_setting_is_part_of_the_fingerprint(tmp_path, field):
    run(config(tmp_path))
    base = config(tmp_path)
    value = {"system": "be safe", "max_new_tokens": 7, "model": "other"}[field]
    changed = dataclasses.replace(
        base, generators=[dataclasses.replace(base.generators[0], **{field: value}), base.generators[1]]
    )
    with pytest.raises(SettingsChanged, match=rf"generators\[a\]\.{field}:"):
        run(changed)
    transport = dataclasses.replace(
        base, generators=[dataclasses.replace(base.generators[0], max_workers=9), base.generators[1]]
    )
    run(transport)  # transport settings do not change what a backend says
