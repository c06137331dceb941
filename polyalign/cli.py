"""The `polyalign` command: parse, build a config, call one function. No logic lives here.

polyalign train [CONFIG] [--resume|--overwrite] [--section.key=value ...]   online or offline training
polyalign train --print-config [CONFIG] [--section.key=value ...]    every key, its value and its doc
polyalign configs                                                     the shipped configs (CONFIG names)
polyalign repro copg-bandit [--epochs N] [--seed S] [--out DIR]      CoPG paper, Sec. 5 toy bandit
polyalign repro back-to-basics [--seeds 0 1 2] [--out DIR] ...       RLOO paper, Table 1 in miniature
polyalign eval CONFIG.yaml [--section.key=value ...]                  win-rate / harm rate / exact match
polyalign serve [--model NAME] [--port 8000]                          OpenAI-compatible chat server
polyalign plan [CONFIG.yaml] [--nproc N] [--gpu-memory GIB] [--json]   memory per process, no weights loaded

Any error ends the command with one line, `polyalign <command>: <what>` and a non-zero exit status; the
Python traceback is printed only with `--debug` (or POLYALIGN_DEBUG=1).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback


def _split_overrides(extra: list[str]) -> list[str]:
    bad = [x for x in extra if not (x.startswith("--") and "=" in x)]
    if bad:
        raise SystemExit(
            f"polyalign: unrecognised arguments {bad}; config overrides look like --train.lr=1e-6"
        )
    return extra


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    """Online when the config has an `algo:` section (or no config), offline when it has a `loss:` section."""
    from polyalign.config import load_config
    from polyalign.config_offline import is_offline_config, load_offline_config

    offline = args.config is not None and is_offline_config(args.config)
    cfg = (load_offline_config if offline else load_config)(args.config, _split_overrides(extra))
    if args.print_config:
        from polyalign.recipes.configs import config_lines

        print("\n".join(config_lines(cfg)))
        return 0
    if offline:
        from polyalign.train.offline import train_offline

        summary = train_offline(cfg, resume=args.resume, overwrite=args.overwrite)
        start, best, key = summary.get("eval_start"), summary.get("best_eval"), "eval/accuracy"
    else:
        from polyalign.train.online import train_online

        summary = train_online(cfg, resume=args.resume, overwrite=args.overwrite)
        start, best, key = summary.get("eval_start"), summary.get("best_eval"), "eval/reward"
    if cfg.output.report and int(os.environ.get("RANK", "0")) == 0:
        from polyalign.recipes.report import before_after, write_training_report

        summary["report"] = str(write_training_report(summary, cfg))
        for prompt, before, after in [] if offline else before_after(summary["run_dir"])[2]:
            print(f"\n{prompt}\n  before: {before.strip()}\n  after:  {after.strip()}")
    if start and best and key in start and key in best:
        print(
            f"held-out {key.split('/')[1]} {start[key]:.3f} -> best {best[key]:.3f}; report: {summary.get('report')}"
        )
    if summary.get("model_step") is not None:
        print(f"{summary['model']} holds the weights of step {summary['model_step']} (output.export)")
    return 0


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
    from polyalign.recipes.back_to_basics import cli_back_to_basics

    return cli_back_to_basics(
        seeds=args.seeds or [0, 1, 2],
        steps=args.steps,
        out=args.out or "runs/back-to-basics",
        overrides=_split_overrides(extra),
    )


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from polyalign.recipes.evaluate.run import cli_eval

    return cli_eval(args.config, _split_overrides(extra))


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    from polyalign.recipes.serve import cli_serve

    return cli_serve(args)


def cmd_synth(args: argparse.Namespace, extra: list[str]) -> int:
    from polyalign.synth.pipeline import cli_synth

    return cli_synth(args.config, _split_overrides(extra), args.force_stage)


def cmd_experiment(args: argparse.Namespace, extra: list[str]) -> int:
    from polyalign.recipes.experiment.run import cli_experiment

    return cli_experiment(args.config, _split_overrides(extra))


def cmd_plan(args: argparse.Namespace, extra: list[str]) -> int:
    from polyalign.recipes.plan import cli_plan

    return cli_plan(args.config, _split_overrides(extra), args.nproc, args.gpu_memory, args.json)


def _add_train_parser(sub) -> None:
    train = sub.add_parser(
        "train",
        help="online RL from a reward (RLOO, REINFORCE, vanilla PG, PPO, RAFT, CoPG) or, with a `loss:` "
        "config, offline from data (DPO, IPO, CoPG, SFT, reward model)",
        description="With no config: RLOO (k=4) on the built-in stories260K model against the "
        "built-in sentiment reward model. Overrides: --section.key=value.",
    )
    train.add_argument(
        "config",
        nargs="?",
        help="YAML file or shipped config (`polyalign configs`); omitted = the quickstart",
    )
    train.add_argument("--resume", action="store_true", help="continue the run in output.run_dir")
    train.add_argument(
        "--overwrite", action="store_true", help="start afresh in a used output.run_dir (its run is removed)"
    )
    train.add_argument("--print-config", action="store_true", help="print every key, value and doc; exit")
    train.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polyalign", description="Align language models with rewards and preferences."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    sub.add_parser("configs", help="list the shipped configs (polyalign train NAME runs one)").set_defaults(
        func=cmd_configs
    )
    repro = sub.add_parser("repro", help="the papers' experiments in miniature")
    repro.add_argument("name", choices=["copg-bandit", "back-to-basics", "copg-offline"])
    repro.add_argument("--epochs", type=int, default=100, help="copg-bandit: passes over the 10^4 pairs")
    repro.add_argument("--seed", type=int, default=0, help="copg-bandit: seed")
    repro.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="seeds (back-to-basics: 0 1 2; copg-offline: 0)"
    )
    repro.add_argument(
        "--steps", type=int, default=None, help="training steps per run (each repro has its default)"
    )
    repro.add_argument("--out", default=None, help="output directory")
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
    from polyalign.recipes.serve import add_serve_arguments  # argparse only: no model code at import

    add_serve_arguments(srv)
    srv.set_defaults(func=cmd_serve)
    return parser


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    names = set()
    for action in parser._actions:
        names.update(action.option_strings)
        for sub in (
            getattr(action, "choices", None).values()
            if isinstance(action, argparse._SubParsersAction)
            else ()
        ):
            names |= _option_strings(sub)
    return names


def _one_line(command: str, error: BaseException) -> str:
    """`polyalign <command>: <message>`; the exception's type is named when the message alone is not enough
    to tell what went wrong (errors that are not about the user's config, data, paths or endpoints)."""
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (ValueError, OSError, KeyError, ImportError, LookupError)):
        # Config, data, path, missing-extra and endpoint errors already name the file, line and field.
        if isinstance(error, FileNotFoundError) and error.filename and str(error.filename) not in message:
            message = f"{message}: {error.filename}"
        return f"polyalign {command}: {message}"
    return f"polyalign {command}: {type(error).__name__}: {message} (rerun with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("POLYALIGN_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    known = _option_strings(parser)
    # `--section.key=value` (and `--key=value` for top-level keys) are config overrides, taken out before
    # argparse, which would mistake a value with spaces (`--reward.functions={a: 1}`) for a positional.
    overrides = [a for a in argv if a.startswith("--") and "=" in a and a.split("=")[0] not in known]
    args, extra = parser.parse_known_args([a for a in argv if a not in overrides])
    try:
        return args.func(args, overrides + extra)
    except KeyboardInterrupt:
        print(f"polyalign {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the one place a user-facing error becomes a line, not a traceback
        if debug:
            traceback.print_exc()
        print(_one_line(args.command, error), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
