"""The package's layout budgets (docs/design.md "Layout", STYLE.md B.2 and B.8), read statically with `ast`:
nothing of polyalign is imported, so this runs in well under a second.

- every .py file <= 400 lines, every function or method <= 60 lines (decorators not counted);
- no import cycle between polyalign's modules; imports inside functions and under TYPE_CHECKING count;
- only `polyalign/cli.py`, `polyalign/train/` and the ring (`polyalign/recipes/`, `polyalign/synth/`) import
  `polyalign.train`;
- the core (the package without the ring) <= 9,500 lines, and it never imports the ring, except that
  `cli.py`, the entry point, dispatches commands to it.

Module names: `polyalign/data/chat.py` is `polyalign.data.chat`; a package's `__init__.py` is its own module
(`polyalign.data`). `from X import Y` depends on the module X.Y when there is one, else on X; `import X.Y`
on X.Y; relative imports resolve against the importing module's package. Every failure names the offenders
and ends with the measured numbers.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "polyalign"
RING = ("polyalign.recipes", "polyalign.synth")
TRAIN = "polyalign.train"
TRAIN_IMPORTERS = ("polyalign.cli", TRAIN, *RING)
RING_IMPORTERS = ("polyalign.cli",)
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_CORE_LINES = 9_500


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `module` is one of `prefixes` or inside one of them (a package prefix)."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@dataclass
class Module:
    name: str
    path: str  # relative to the repository root
    lines: int
    tree: ast.Module
    is_package: bool
    imports: dict[str, int] = field(default_factory=dict)  # imported polyalign module -> first line


@dataclass(frozen=True)
class Function:
    path: str
    qualname: str  # e.g. "Trainer.step" or "outer.inner"
    line: int
    lines: int


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: Module, node: ast.Import | ast.ImportFrom, known: dict[str, Module]) -> list[str]:
    """The polyalign modules one import statement depends on."""
    if isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.name.split(".")
            base = base if module.is_package else base[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        candidates = [f"{prefix}.{alias.name}" for alias in node.names]
        candidates = [name if name in known else prefix for name in candidates]
    targets = []
    for name in candidates:
        while name and name not in known:  # `import polyalign.data.chat as c` or an attribute of a module
            name = name.rpartition(".")[0]
        if name and name != module.name:
            targets.append(name)
    return targets


@functools.cache
def package() -> dict[str, Module]:
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        name = module_name(path)
        modules[name] = Module(
            name,
            str(path.relative_to(ROOT)),
            len(source.splitlines()),
            ast.parse(source, filename=str(path)),
            path.name == "__init__.py",
        )
    for module in modules.values():
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(module, node, modules):
                    module.imports[target] = min(node.lineno, module.imports.get(target, node.lineno))
    return modules


@functools.cache
def functions() -> tuple[Function, ...]:
    """Every function and method, nested ones included, with its length from `def` to its last line."""
    found = []

    def visit(node: ast.AST, path: str, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualname = f"{scope}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    found.append(Function(path, qualname, child.lineno, child.end_lineno - child.lineno + 1))
                visit(child, path, qualname + ".")
            else:
                visit(child, path, scope)

    for module in package().values():
        visit(module.tree, module.path, "")
    return tuple(found)


def import_cycles(modules: dict[str, Module]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in modules[v].imports:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in modules:
        if name not in index:
            connect(name)
    return sorted(cycles)


def core_lines(modules: dict[str, Module]) -> int:
    return sum(m.lines for m in modules.values() if not within(m.name, RING))


def measured() -> str:
    """The numbers the budgets are about, for every failure message."""
    modules = package()
    core = core_lines(modules)
    ring = sum(m.lines for m in modules.values()) - core
    largest = max(modules.values(), key=lambda m: m.lines)
    longest = max(functions(), key=lambda f: f.lines)
    edges = sum(len(m.imports) for m in modules.values())
    return (
        f"\nmeasured: core {core} lines (budget {MAX_CORE_LINES}), ring {ring} lines, {len(modules)} modules;"
        f" largest file {largest.path} {largest.lines} lines (budget {MAX_FILE_LINES});"
        f" longest function {longest.path}:{longest.line} {longest.qualname} {longest.lines} lines"
        f" (budget {MAX_FUNCTION_LINES}); {edges} import edges, {len(import_cycles(modules))} cycle(s)"
    )


def offending_imports(importer_ok: tuple[str, ...], target: tuple[str, ...]) -> list[str]:
    """'path:line module imports target' for every import of `target` by a module outside `importer_ok`."""
    return [
        f"{m.path}:{line} ({m.name}) imports {t}"
        for m in package().values()
        if not within(m.name, importer_ok)
        for t, line in sorted(m.imports.items())
        if within(t, target)
    ]


def test_the_scan_sees_the_package():
    modules = package()
    assert {"polyalign", "polyalign.cli", "polyalign.data.chat", "polyalign.train.loop"} <= set(modules)
    cli = modules["polyalign.cli"]
    assert any(within(t, RING) for t in cli.imports), "function-level imports must be found"


def test_resolution_of_relative_and_from_imports():
    modules = package()
    here = Module("polyalign.data.chat", "polyalign/data/chat.py", 0, ast.Module([], []), False)
    init = Module("polyalign.data", "polyalign/data/__init__.py", 0, ast.Module([], []), True)
    cases = [
        (here, "from . import io", ["polyalign.data.io"]),
        (here, "from .io import DataError", ["polyalign.data.io"]),
        (here, "from ..losses import dpo_loss", ["polyalign.losses"]),
        (init, "from .chat import render_prompt", ["polyalign.data.chat"]),
        (here, "from polyalign.data import preference", ["polyalign.data.preference"]),
        (here, "import polyalign.train.loop as loop", ["polyalign.train.loop"]),
        (here, "import torch", []),
    ]
    for module, statement, expected in cases:
        node = ast.parse(statement).body[0]
        assert _resolve(module, node, modules) == expected, statement


def test_files_within_budget():
    big = sorted((m for m in package().values() if m.lines > MAX_FILE_LINES), key=lambda m: -m.lines)
    assert not big, (
        f"files over {MAX_FILE_LINES} lines: " + ", ".join(f"{m.path} ({m.lines})" for m in big) + measured()
    )


def test_functions_within_budget():
    long = [f for f in functions() if f.lines > MAX_FUNCTION_LINES]
    assert not long, (
        f"functions over {MAX_FUNCTION_LINES} lines: "
        + ", ".join(
            f"{f.path}:{f.line} {f.qualname} ({f.lines})" for f in sorted(long, key=lambda f: -f.lines)
        )
        + measured()
    )


def test_no_import_cycles():
    modules = package()
    cycles = import_cycles(modules)
    described = []
    for cycle in cycles:
        edges = [
            f"{a} -> {b} ({modules[a].path}:{modules[a].imports[b]})"
            for a in cycle
            for b in sorted(modules[a].imports)
            if b in cycle
        ]
        described.append(f"[{', '.join(cycle)}] via " + "; ".join(edges))
    assert not cycles, (
        "import cycles (function-level imports count):\n  " + "\n  ".join(described) + measured()
    )


def test_only_cli_train_and_ring_import_train():
    bad = offending_imports(TRAIN_IMPORTERS, (TRAIN,))
    assert not bad, (
        "only cli.py, train/ and the ring may import polyalign.train:\n  " + "\n  ".join(bad) + measured()
    )


def test_core_within_budget():
    modules = package()
    lines = core_lines(modules)
    core = sorted((m for m in modules.values() if not within(m.name, RING)), key=lambda m: -m.lines)
    biggest = ", ".join(f"{m.path} ({m.lines})" for m in core[:8])
    assert lines <= MAX_CORE_LINES, (
        f"the core (polyalign/ without recipes/ and synth/) has {lines} lines, budget {MAX_CORE_LINES} "
        f"({lines - MAX_CORE_LINES} over); its largest files: {biggest}" + measured()
    )


def test_core_never_imports_the_ring():
    bad = offending_imports((*RING, *RING_IMPORTERS), RING)
    assert not bad, (
        "the core imports the ring (recipes/, synth/); only cli.py may dispatch to it:\n  "
        + "\n  ".join(bad)
        + measured()
    )
