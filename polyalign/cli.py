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


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    """Online when the config has an `algo:` section (or no config), offline when it has a `loss:` section."""
    from polyalign.config import load_config, split_overrides
    from polyalign.config_offline import is_offline_config, load_offline_config

    offline = args.config is not None and is_offline_config(args.config)
    cfg = (load_offline_config if offline else load_config)(args.config, split_overrides(extra))
    if args.print_config:
        from polyalign.recipes.configs import config_lines

        print("\n".join(config_lines(cfg)))
        return 0
    if not offline and cfg.rollout.engine == "vllm":
        import polyalign.recipes.vllm  # noqa: F401  (registers the optional vLLM engine)
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
    from polyalign.recipes.commands import add_commands  # the ring's commands (argparse only at import)

    add_commands(sub)
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


def entry() -> None:
    """The console script: under torchrun, leave without the interpreter's teardown, where gloo's threads
    can wait forever on a peer that has already exited (all output is flushed and files closed by then).
    First, before torch is imported, the OpenMP settings that keep a shared CPU from stalling (threads.py)."""
    from polyalign.threads import set_runtime_defaults

    set_runtime_defaults()
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
