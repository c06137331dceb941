"""The command-line wiring of the ring's applications: `polyalign configs|repro|eval|synth|experiment|plan|serve`.

`polyalign.cli` (the core's command) adds these subcommands with `add_commands`; each command imports its
application only when it runs, so `polyalign --help` stays light.
"""

from __future__ import annotations

import argparse

from polyalign.config import split_overrides
from polyalign.recipes.serve import add_serve_arguments


def cmd_configs(args: argparse.Namespace, extra: list[str]) -> int:
    from polyalign.recipes.configs import cli_configs

    return cli_configs()


def cmd_repro(args: argparse.Namespace, extra: list[str]) -> int:
    if args.name == "copg-offline":
        from polyalign.recipes.copg_offline import cli_copg_offline

        return cli_copg_offline(
            out=args.out or "runs/copg-offline", steps=args.steps, seeds=args.seeds or [0], betas=None
        )
    if args.name == "copg-bandit":
        from polyalign.recipes.copg_bandit import cli_copg_bandit

        return cli_copg_bandit(epochs=args.epochs, seed=args.seed, out=args.out or "runs/copg-bandit")
    if args.name == "semantics":
        from polyalign.recipes.semantics import cli_semantics

        out = args.out or "runs/semantics"
        return cli_semantics(args.seeds or [0, 1, 2], args.steps, out, split_overrides(extra), jobs=args.jobs)
    from polyalign.recipes.back_to_basics import cli_back_to_basics

    return cli_back_to_basics(
        seeds=args.seeds or [0, 1, 2],
        steps=args.steps,
        out=args.out or "runs/back-to-basics",
        overrides=split_overrides(extra),
    )


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from polyalign.recipes.evaluate.run import cli_eval

    return cli_eval(args.config, split_overrides(extra))


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    from polyalign.recipes.serve import cli_serve

    return cli_serve(args)


def cmd_synth(args: argparse.Namespace, extra: list[str]) -> int:
    from polyalign.synth.pipeline import cli_synth

    return cli_synth(args.config, split_overrides(extra), args.force_stage)


def cmd_experiment(args: argparse.Namespace, extra: list[str]) -> int:
    from polyalign.recipes.experiment.run import cli_experiment

    return cli_experiment(args.config, split_overrides(extra))


def cmd_plan(args: argparse.Namespace, extra: list[str]) -> int:
    from polyalign.recipes.plan import cli_plan

    return cli_plan(args.config, split_overrides(extra), args.nproc, args.gpu_memory, args.json)


def add_commands(sub) -> None:
    """Add the ring's subcommands to the `polyalign` parser's subparsers."""
    sub.add_parser("configs", help="list the shipped configs (polyalign train NAME runs one)").set_defaults(
        func=cmd_configs
    )
    repro = sub.add_parser("repro", help="the papers' experiments in miniature")
    repro.add_argument("name", choices=["copg-bandit", "back-to-basics", "copg-offline", "semantics"])
    repro.add_argument("--epochs", type=int, default=100, help="copg-bandit: passes over the 10^4 pairs")
    repro.add_argument("--seed", type=int, default=0, help="copg-bandit: seed")
    repro.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds (back-to-basics, semantics: 0 1 2; copg-offline: 0)",
    )
    repro.add_argument(
        "--steps", type=int, default=None, help="training steps per run (each repro has its default)"
    )
    repro.add_argument("--out", default=None, help="output directory")
    repro.add_argument("--jobs", type=int, default=1, help="semantics: runs at a time (one thread each)")
    repro.set_defaults(func=cmd_repro)
    ev = sub.add_parser(
        "eval", help="judge a model or completions file: win-rate, harm rate per language, exact match"
    )
    ev.add_argument("config", help="YAML eval config (see configs/eval/)")
    ev.set_defaults(func=cmd_eval)
    syn = sub.add_parser("synth", help="multilingual preference data: translate/generate/score/pair/filter")
    syn.add_argument("config", help="YAML synth config (see configs/synth/)")
    syn.add_argument("--force-stage", metavar="STAGE", help="redo this stage and the later ones")
    syn.set_defaults(func=cmd_synth)
    exp = sub.add_parser(
        "experiment", help="cross-lingual transfer: synth or data -> train -> evaluate per language"
    )
    exp.add_argument("config", help="YAML experiment config (see configs/experiment/)")
    exp.set_defaults(func=cmd_experiment)
    plan = sub.add_parser(
        "plan", help="memory planner: the models a run holds, their dtypes and the peak per process"
    )
    plan.add_argument("config", nargs="?", help="online or offline YAML config; omitted = the quickstart")
    plan.add_argument("--nproc", type=int, default=1, help="processes (torchrun --nproc-per-node x nodes)")
    plan.add_argument(
        "--gpu-memory", type=float, default=None, help="GiB per GPU: checks the fit, sizes vLLM"
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan)
    srv = sub.add_parser(
        "serve", help="an OpenAI-compatible /v1/chat/completions server over any loadable model"
    )
    add_serve_arguments(srv)
    srv.set_defaults(func=cmd_serve)
