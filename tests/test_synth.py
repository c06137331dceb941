"""Synthesis stages on 3 records with scripted backends and with the real local server; resume after a judge
failure and after kill -9; language checks; duplicate ids; config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from polyalign.config import ConfigError, load_config
from polyalign.data.io import DataError
from polyalign.synth import stages
from polyalign.synth.config import BackendConfig, SynthConfig, TranslateConfig
from polyalign.synth.langcheck import check_language
from polyalign.synth.pipeline import cli_synth, run_synth
from polyalign.synth.safety import load_redteam_prompts
from polyalign.synth.store import read_stage

ROOT = Path(__file__).resolve().parent.parent


class ScriptedGenerator:
    """Completion = a fixed text per prompt (dict) or "<name>: <prompt>"; records every call."""

    def __init__(self, name: str, replies: dict[str, str] | None = None, delay: float = 0.0) -> None:
        self.name, self.replies, self.delay, self.calls = name, replies or {}, delay, []

    def describe(self) -> str:
        return f"scripted {self.name}"

    def generate(self, prompts: list[str], seeds: list[int]) -> list[str]:
        time.sleep(self.delay)
        self.calls.append(list(prompts))
        self.seeds = [*getattr(self, "seeds", []), *seeds]
        return [self.replies.get(p, f"{self.name}: {p}") for p in prompts]


class ScriptedTranslator:
    name = "scripted-translator"

    def describe(self) -> str:
        return "scripted translator"

    def translate(self, texts, source_languages, target, seeds=None):
        words = {"fr": "bonjour", "ru": "привет", "zh": "你好世界"}
        return [f"{words[target]} {i}" for i, _ in enumerate(texts)]


class LengthScorer:
    """Score = completion length; optionally fails (like an endpoint outage) after `fail_after` calls."""

    name = "length-judge"

    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after, self.calls = fail_after, 0

    def describe(self) -> str:
        return "length"

    def score(self, prompts, completions, languages):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise ConnectionError("judge endpoint went away")
        return [(float(len(c)), "ok") for c in completions]


def sources3() -> list[dict]:
    return [
        stages.source_record(
            "p0", "Tell me a story about a cat.", "en", harm_category="x", global_or_local="global"
        ),
        stages.source_record("p1", "Write a poem about the sea.", "en"),
        stages.source_record("p2", "Explain why the sky is blue.", "en"),
    ]


def cfg_at(tmp_path: Path, **kw) -> SynthConfig:
    return SynthConfig(out_dir=str(tmp_path / "synth"), progress=False, batch_size=2, **kw)


def test_translate_stage_ids_provenance_and_language_check(tmp_path):
    out = tmp_path / "prompts.jsonl"
    stats = stages.translate_prompts(
        sources3(), ["fr", "ru", "en"], ScriptedTranslator(), out, 2, True, False
    )
    records = read_stage(out)
    assert stats["written"] == 9 and len(records) == 9  # 3 sources + 3 x fr + 3 x ru (en is the source's own)
    by_id = {r["id"]: r for r in records}
    ru = by_id["p0|ru"]
    assert (
        ru["language"] == "ru"
        and ru["source_prompt_id"] == "p0"
        and ru["translator"] == "scripted-translator"
    )
    assert (
        ru["origin"] == "translation" and ru["language_check"] == "ok" and ru["global_or_local"] == "global"
    )
    assert by_id["p1"]["origin"] == "source" and by_id["p1"]["language_check"] == "ok"
    again = stages.translate_prompts(sources3(), ["fr", "ru"], ScriptedTranslator(), out, 2, True, False)
    assert again["already_done"] == 9 and again["written"] == 0 and len(read_stage(out)) == 9


def test_generate_score_pair_filter_on_three_prompts(tmp_path):
    a = ScriptedGenerator("a", {"Write a poem about the sea.": ""})  # an empty generation
    b = ScriptedGenerator("b", {"Explain why the sky is blue.": "b: Explain why the sky is blue."})
    prompts = sources3()
    stages.generate_completions(prompts, [a, b], tmp_path / "c.jsonl", 2, False, {"a": 5, "b": 7})
    completions = read_stage(tmp_path / "c.jsonl")
    assert len(completions) == 6 and {c["generator"] for c in completions} == {"a", "b"}
    empty = [c for c in completions if c["status"] == "empty"]
    assert [c["id"] for c in empty] == ["p1|a"]
    assert all(c["source_prompt_id"] == c["prompt_id"] and c["language"] == "en" for c in completions)
    assert all(isinstance(c["seed"], int) for c in completions)
    stages.score_completions(completions, LengthScorer(), tmp_path / "s.jsonl", 2, False)
    scored = read_stage(tmp_path / "s.jsonl")
    assert len(scored) == 5 and all(s["judge"] == "length-judge" for s in scored)  # the empty one is skipped
    pairs, counts = stages.build_pairs(scored)
    # p0 and p2: "a: <prompt>" vs "b: <prompt>" have equal lengths -> ties; p1 has one scored completion
    assert counts["tie"] == 2 and counts["too_few_scored"] == 1 and pairs == []


def test_pairs_best_vs_worst_margin_and_filters():
    def row(pid, gen, score, text, lang="en", check="ok"):
        return {
            "id": f"{pid}|{gen}", "prompt_id": pid, "prompt": f"prompt {pid}", "language": lang,
            "source_prompt_id": pid, "generator": gen, "seed": 1, "completion": text, "judge": "j",
            "score": score, "prompt_language_check": "ok", "language_check": check,
        }  # fmt: skip

    scored = [
        row("p0", "a", 1.0, "worst"), row("p0", "b", 3.0, "best"), row("p0", "c", 2.0, "middle"),
        row("p1", "a", 1.0, "x"), row("p1", "b", 1.2, "y"),  # margin 0.2
        row("p2", "a", 0.0, "en text", "zh", "mismatch"), row("p2", "b", 5.0, "more en text", "zh", "mismatch"),
        row("p3", "a", 0.0, "same"), row("p3", "b", 1.0, "Same "),
        row("p4", "a", None, "unscored"), row("p4", "b", 1.0, "only one"),
    ]  # fmt: skip
    pairs, counts = stages.build_pairs(scored, min_margin=0.5)
    by_id = {p["id"]: p for p in pairs}
    assert set(by_id) == {"p0", "p2", "p3"} and counts["below_margin"] == 1 and counts["too_few_scored"] == 1
    p0 = by_id["p0"]
    assert (p0["chosen"], p0["rejected"], p0["margin"]) == ("best", "worst", 2.0)
    assert p0["scores"] == {"a": 1.0, "b": 3.0, "c": 2.0} and p0["chosen_generator"] == "b"
    kept, fc = stages.filter_pairs(pairs + [dict(p0, id="p0-copy")], "drop")
    assert [p["id"] for p in kept] == ["p0"]
    assert (
        fc["dropped_language_mismatch"] == 1 and fc["dropped_same_text"] == 1 and fc["dropped_duplicate"] == 1
    )
    kept, fc = stages.filter_pairs(pairs, "keep", dedupe=False)
    assert {p["id"] for p in kept} == {"p0", "p2"} and fc["language_mismatch"] == 1


def test_language_check_by_script():
    assert check_language("Привет, как дела?", "ru") == "ok"
    assert check_language("Hello, how are you?", "ru") == "mismatch"
    assert check_language("नमस्ते दुनिया", "hi") == "ok"
    assert check_language("你好世界", "ja") == "ok" and check_language("こんにちは", "zh") == "mismatch"
    assert check_language("123 !!", "en") == "unknown" and check_language("hello", "xx") == "unknown"


def test_pipeline_counts_language_mismatch_and_empty(tmp_path):
    sources = [
        stages.source_record("s0", "The cat sat on the mat.", "en"),
        stages.source_record("s1", "This is not Russian at all.", "ru"),  # declared ru, written in Latin
        stages.source_record("s2", "Кошка сидит на ковре.", "ru"),
    ]
    gens = [
        ScriptedGenerator("a", {"你好世界 0": "English words only", "The cat sat on the mat.": ""}),
        ScriptedGenerator("b", {"你好世界 0": "more English words here"}),
    ]
    cfg = cfg_at(tmp_path, translate=TranslateConfig(languages=["zh"]))
    summary = run_synth(cfg, gens, ScriptedTranslator(), LengthScorer(), sources)
    lm = summary["language_mismatch"]
    assert lm["source_prompts"] == {"ru": 1} and lm["translations"] == {}
    assert lm["completions"].get("zh", 0) >= 1 and summary["empty_completions"] == 1
    final = read_stage(Path(cfg.out_dir) / "final.jsonl")
    assert all(not p["language_mismatch"] for p in final)  # dropped by filter.language_mismatch: drop
    assert summary["stages"]["filter"]["dropped_language_mismatch"] >= 1


def test_duplicate_ids_and_bad_config_are_errors(tmp_path):
    dup = [stages.source_record("same", "a", "en"), stages.source_record("same", "b", "en")]
    with pytest.raises(DataError, match="duplicate id 'same'"):
        run_synth(
            cfg_at(tmp_path), [ScriptedGenerator("a"), ScriptedGenerator("b")], None, LengthScorer(), dup
        )
    path = tmp_path / "aya.jsonl"
    rows = [
        {
            "id": "r1",
            "prompt": "hola",
            "language": "Spanish",
            "harm_category": "Hate Speech",
            "global_or_local": "local",
        },
        {
            "id": "r1",
            "prompt": "hello",
            "language": "en",
            "harm_category": "Profanity",
            "global_or_local": "global",
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match="duplicate id 'r1'"):
        load_redteam_prompts(str(path))
    with pytest.raises(ConfigError, match="unknown language code 'xx'"):
        SynthConfig(translate=TranslateConfig(languages=["xx"]))
    with pytest.raises(ConfigError, match="two or more"):
        SynthConfig(generators=[BackendConfig(name="only")])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["--judge.kinds=lexicon"], cls=SynthConfig)


def test_aya_layout_labels_are_carried(tmp_path):
    path = tmp_path / "aya.jsonl"
    rows = [
        {
            "prompt": "¿Por qué insultas?",
            "language": "Spanish",
            "harm_category": "Hate Speech",
            "global_or_local": "local",
        },
        {
            "prompt": "Say something rude.",
            "language": "en",
            "harm_category": "Profanity",
            "global_or_local": "global",
        },
    ]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    records = load_redteam_prompts(str(path))
    assert [(r["id"], r["language"], r["global_or_local"]) for r in records] == [
        ("aya.jsonl:1", "es", "local"), ("aya.jsonl:2", "en", "global"),
    ]  # fmt: skip
    xs = load_redteam_prompts("xsafety", ["en", "ru"], ["Insult"], per_group=2)
    assert len(xs) == 4 and {r["harm_category"] for r in xs} == {"Insult"}


def test_judge_failure_midway_keeps_finished_records_and_resumes(tmp_path):
    cfg = cfg_at(tmp_path)
    gens = [ScriptedGenerator("a"), ScriptedGenerator("bb")]
    with pytest.raises(RuntimeError, match=r"stage 'score' failed: judge endpoint went away\. The 2 record"):
        run_synth(cfg, gens, None, LengthScorer(fail_after=1), sources3())
    scorer = LengthScorer()
    summary = run_synth(cfg, [ScriptedGenerator("a"), ScriptedGenerator("bb")], None, scorer, sources3())
    assert summary["stages"]["score"]["already_done"] == 2 and scorer.calls == 2  # 4 left, batch size 2
    assert summary["stages"]["generate"]["already_done"] == 6
    scored = read_stage(Path(cfg.out_dir) / "scored.jsonl")
    assert len(scored) == 6 and len({s["id"] for s in scored}) == 6
    final = read_stage(Path(cfg.out_dir) / "final.jsonl")
    assert len(final) == 3 and all(p["chosen_generator"] == "bb" for p in final)  # longer prefix wins


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from test_synth import ScriptedGenerator, LengthScorer, sources_n
    from polyalign.synth.config import SynthConfig
    from polyalign.synth.pipeline import run_synth
    cfg = SynthConfig(out_dir={out!r}, progress=False, batch_size=1)
    run_synth(cfg, [ScriptedGenerator("a", delay=0.05), ScriptedGenerator("b", delay=0.05)], None, LengthScorer(),
              sources_n(40))
    """
)


def sources_n(n: int) -> list[dict]:
    return [stages.source_record(f"q{i}", f"prompt number {i} " + "x" * (i % 5 + 1), "en") for i in range(n)]


def test_kill_9_mid_run_then_rerun_has_every_record_once(tmp_path):
    out = tmp_path / "synth"
    script = _KILL_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)})
    completions = out / "completions.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not completions.is_file() or len(read_stage(completions)) < 10):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(read_stage(completions))
    assert 10 <= done_before < 80, "the kill should land mid-stage"
    with completions.open("a") as f:
        f.write('{"id": "q39|b", "prompt_id": "q3')  # a torn last line, as a kill mid-write leaves
    cfg = SynthConfig(out_dir=str(out), progress=False, batch_size=4)
    summary = run_synth(
        cfg, [ScriptedGenerator("a"), ScriptedGenerator("b")], None, LengthScorer(), sources_n(40)
    )
    assert summary["stages"]["generate"]["already_done"] == done_before
    records = read_stage(completions)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == 80
    assert set(ids) == {f"q{i}|{g}" for i in range(40) for g in "ab"}
    assert all(r["completion"] == f"{r['generator']}: {r['prompt']}" for r in records)


def test_stages_with_the_real_local_server(tmp_path, stories):
    from polyalign.eval.backends import ChatClient, OpenAIChatBackend
    from polyalign.recipes.serve import serve

    model, tokenizer = stories
    server, _ = serve(model, tokenizer=tokenizer, model_id="stories260K")
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        gens = []
        for name, temp in (("cold", 0.0), ("warm", 1.0)):
            cfg = BackendConfig(name=name, kind="openai", model="stories260K", base_url=url, temperature=temp,
                                max_new_tokens=12, cache=str(tmp_path / f"{name}.jsonl"))  # fmt: skip
            client = ChatClient(OpenAIChatBackend("stories260K", url), cfg.cache, max_workers=2)
            from polyalign.synth.backends import ChatGenerator

            gens.append(ChatGenerator(client, cfg))
        from polyalign.eval.judges import LLMPointwiseJudge
        from polyalign.synth.backends import JudgeScorer

        judge = JudgeScorer(
            LLMPointwiseJudge(ChatClient(OpenAIChatBackend("stories260K", url)), "harm"), "served-harm"
        )
        summary = run_synth(cfg_at(tmp_path), gens, None, judge, sources3())
        assert server.model_server.requests >= 6 + 5  # 6 generations + one judge request per non-empty one
        completions = read_stage(tmp_path / "synth" / "completions.jsonl")
        assert len(completions) == 6 and sum(c["status"] == "ok" for c in completions) >= 5
        scored = read_stage(tmp_path / "synth" / "scored.jsonl")
        assert len(scored) == sum(c["status"] == "ok" for c in completions)
        # stories260K rarely answers yes/no: such verdicts are unparseable, counted, and never paired
        assert all(s["score"] in (0.0, 1.0) or s["score_status"] == "unparseable" for s in scored)
        assert sum(summary["unscored"].values()) == sum(s["score"] is None for s in scored)
        requests = server.model_server.requests
        run_synth(cfg_at(tmp_path), gens, None, judge, sources3())
        assert server.model_server.requests == requests  # a rerun asks nothing again
    finally:
        server.shutdown()
        server.server_close()


def test_cli_synth_with_local_models(tmp_path, capsys):
    code = cli_synth(
        str(ROOT / "configs/synth/stories-tiny.yaml"),
        [f"--out_dir={tmp_path}", "--source.limit=3", "--translate.languages=[fr]", "--progress=false"],
    )
    assert code == 0 and "polyalign synth: 6 prompts, 12 completions" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    final = read_stage(tmp_path / "final.jsonl")
    assert summary["stages"]["filter"]["kept"] == len(final) >= 1
    assert all(
        p["chosen_score"] > p["rejected_score"] and p["judge"].startswith("reward_model") for p in final
    )


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "synth").glob("*.yaml")), ids=lambda p: p.name)
def test_every_synth_config_loads(path):
    cfg = load_config(path, cls=SynthConfig)
    assert len(cfg.generators) >= 2
