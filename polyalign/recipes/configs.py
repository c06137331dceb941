"""The shipped configs and a config's every key: `polyalign configs` and `polyalign train --print-config`.

    polyalign configs                                  name and first comment line of every shipped YAML
    polyalign train --print-config [offline/dpo] [--loss.beta=0.2]   key: value  # doc, one line per key

The docs are the dataclass fields' attribute docstrings (config.py, config_offline.py), read from the source,
so that they are written once.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import typing
from typing import Any, Literal

from polyalign.config import SHIPPED


def shipped_configs() -> list[tuple[str, str]]:
    """(name, description) of every YAML under polyalign/configs/: the name `polyalign train NAME` takes and
    the file's first comment line."""
    out = []
    for path in sorted(SHIPPED.rglob("*.yaml")):
        comments = [x[1:].strip() for x in path.read_text(encoding="utf-8").splitlines() if x.startswith("#")]
        out.append((path.relative_to(SHIPPED).with_suffix("").as_posix(), comments[0] if comments else ""))
    return out


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its attribute docstring (the string right below the field), on one line."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        doc = getattr(after, "value", None) if isinstance(after, ast.Expr) else None
        if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Constant) and isinstance(doc.value, str):
            docs[node.target.id] = " ".join(doc.value.split())
    return docs


def config_lines(cfg: Any, prefix: str = "") -> list[str]:
    """`section.key: value  # doc` for every key of a config; values in JSON (which is YAML, so that a line
    becomes an override: --section.key=value)."""
    lines, docs, hints = [], field_docs(type(cfg)), typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            lines += config_lines(value, key + ".")
        else:
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
            doc = " ".join(["|".join(choices) + ("." if choices else ""), docs.get(f.name, "")]).strip()
            lines.append(f"{key}: {json.dumps(value, ensure_ascii=False)}" + (f"  # {doc}" if doc else ""))
    return lines


def cli_configs() -> int:
    names = shipped_configs()
    width = max(len(name) for name, _ in names)
    for name, description in names:
        print(f"{name:<{width}}  {description}")
    print(f"\n{len(names)} shipped configs ({SHIPPED}); run one: polyalign train|eval|synth|experiment NAME")
    return 0
