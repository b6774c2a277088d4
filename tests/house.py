"""The floor plan, measured: `python -m tests.house` prints it, tests/test_house.py holds it.

Read from the source alone (import statements and syntax trees, nothing is imported):

- the import graph of `builder` (module-level and function-level imports alike) and its
  cycles;
- which deliverable each module ships in (SIDES) and whether a shipped side imports
  anything but the standard library and the packages it may use;
- modules over MODULE_LINES lines, functions over FUNCTION_LINES lines;
- blocks of BLOCK_LINES or more lines repeated within `builder/` (the same lines after
  stripping indentation, blank lines and comments left out), named by the modules that
  hold them.

Every exception is listed in REASONS with a written reason (docs/design.md, "the house").
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "builder"
MODULE_LINES = 600
FUNCTION_LINES = 80
BLOCK_LINES = 6

# Where each module ships, by its dotted name's prefix (longest prefix wins). The rescue
# side is what the initramfs carries (builder/runner as `runner`); the host side what the
# bundle carries. A side may import the standard library and the packages listed.
SIDES = {
    "builder.runner": "rescue",
    "builder.fixtures": "tests",
    "builder.bench": "bench",
    "builder": "build-machine",
}
MAY_IMPORT = {
    "rescue": ("builder.runner",),
    "tests": ("builder",),
    "bench": ("builder",),
    "build-machine": ("builder",),
}

# Known exceptions, each with its reason: (kind, name) -> reason. tests/test_house.py fails
# on a new one and on one that is gone (so this table stays the truth).
_SPLIT = "to be split by concern (issue 18); until then one reader follows one job"
REASONS: dict[tuple[str, str], str] = {
    ("cycles", "builder.bench builder.bench_fleet builder.bench_rescue"):
        "bench's entry point runs its sections, which share its helpers; not shipped",
    ("crossings", "builder.runner.check (rescue) imports builder.freeze"):
        "host-only module still in runner/; it runs from the CLI and the bundle only, never "
        "in the rescue system (issue 18 moves it to the host side)",
    ("crossings", "builder.runner.refresh (rescue) imports builder.capture"):
        "host-only module still in runner/ (as check); refresh runs capture on the host",
    ("module", "builder.capture"): _SPLIT + ": freeze orchestration, spool, encoder",
    ("function", "builder.capture._capture"): _SPLIT + ": the capture's one ExitStack",
    ("module", "builder.runner.files_restore"): _SPLIT + ": planning, image making, writing",
    ("function", "builder.runner.files_restore._plan_files"):
        "the layout walk keeps its cursor and refusals in one place; " + _SPLIT,
    ("module", "builder.runner.manifest"):
        "the capture format's one schema: every record and its checked parser side by side",
    ("module", "builder.runner.install"): _SPLIT + ": systemd units, hooks, host.conf",
    ("function", "builder.runner.install.install"): _SPLIT,
    ("module", "builder.runner.plan"): _SPLIT + ": region plan and its msdos/GPT/EBR parts",
    ("function", "builder.runner.restore._restore"):
        "the one plan -> confirm -> write sequence of both paths; " + _SPLIT,
    ("module", "builder.verify"): "the independent judge keeps its own readers (FAT, cpio, "
        "ISO) beside its checks, so that it borrows nothing from the writers",
    ("module", "builder.kit"): "the kit's package table and its fetch; " + _SPLIT,
    ("function", "builder.build.build_one"): "one ISO's build, checked before it is named",
    ("function", "builder.cli.build_command"): "typer's option table is the signature",
    ("function", "builder.cli.verify_command"): "its JSON and table output still live in the "
        "CLI (an ISO's and a capture's); to move into verify.py (issue 18)",
    ("function", "builder.freeze.frozen"): "the freeze, its watchdog and its thaw belong "
        "together (safety rule 7)",
    ("function", "builder.inspect.describe"): "one line per manifest section, in order",
    ("function", "builder.iso.write_iso"): "the ISO's records in write order; " + _SPLIT,
    ("function", "builder.bmc.rescue"): "the rescue's steps, each with its undo registered "
        "in one ExitStack, so that a failure leaves nothing inserted or overridden",
    ("function", "builder.vm.Vm.argv"): "QEMU's command line, one device kind per branch",
    ("repeated", "builder.fixtures.install = builder.fixtures.rhel"):
        "test fixtures: the RHEL install VM runs its own script beside the shared one",
    ("repeated", "builder.grub = builder.netboot"):
        "two jinja2 environments with the project's settings; " + _SPLIT,
    ("repeated", "builder.runner.files_restore = builder.runner.restore"):
        "both paths' restore-complete lines; issue 18's one restore shape joins them",
}


@dataclass
class Module:
    name: str
    path: Path
    lines: int
    imports: set[str] = field(default_factory=set)
    functions: list[tuple[str, int]] = field(default_factory=list)  # (qualified name, lines)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    names = [f"{base}.{alias.name}" for alias in node.names]
    return [base, *names]


def read_modules() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        source = path.read_text()
        tree = ast.parse(source, filename=str(path))
        module = Module(name, path, len(source.splitlines()))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                module.imports.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                module.imports.update(_resolve(name, path.name == "__init__.py", node))
        for qualified, node in _functions(tree):
            assert node.end_lineno is not None
            module.functions.append((qualified, node.end_lineno - node.lineno + 1))
        modules[name] = module
    known = set(modules)
    for module in modules.values():
        # `from . import x` names a module when x is one; otherwise the package itself.
        module.imports = {imp for imp in module.imports if imp in known and imp != module.name}
    return modules


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield prefix + node.name, node
            yield from _functions(node, prefix + node.name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, prefix + node.name + ".")


def cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(name: str) -> None:
        nonlocal counter
        index[name] = low[name] = counter
        counter += 1
        stack.append(name)
        on_stack.add(name)
        for other in sorted(modules[name].imports):
            if other not in index:
                visit(other)
                low[name] = min(low[name], low[other])
            elif other in on_stack:
                low[name] = min(low[name], index[other])
        if low[name] == index[name]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == name:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for name in sorted(modules):
        if name not in index:
            visit(name)
    return sorted(found)


def side_of(name: str) -> str:
    best = max((prefix for prefix in SIDES if name == prefix or name.startswith(prefix + ".")
                or (prefix == "builder.bench" and name.startswith("builder.bench"))), key=len)
    return SIDES[best]


def crossings(modules: dict[str, Module]) -> list[str]:
    """Imports from a shipped side into a package it may not use."""
    found = []
    for module in modules.values():
        side = side_of(module.name)
        for imported in sorted(module.imports):
            if not any(imported == ok or imported.startswith(ok + ".")
                       for ok in MAY_IMPORT[side]):
                found.append(f"{module.name} ({side}) imports {imported}")
    return found


def oversized(modules: dict[str, Module]) -> list[tuple[str, str, int]]:
    found = []
    for module in modules.values():
        if module.lines > MODULE_LINES:
            found.append(("module", module.name, module.lines))
        for qualified, lines in module.functions:
            if lines > FUNCTION_LINES:
                found.append(("function", f"{module.name}.{qualified}", lines))
    return found


def _normalized(path: Path) -> list[tuple[int, str]]:
    kept = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if text and not text.startswith("#"):
            kept.append((number, text))
    return kept


def repeated_blocks(modules: dict[str, Module]) -> list[str]:
    """Places where BLOCK_LINES normalized lines repeat elsewhere in builder/ (imports and
    docstring-free trivia such as lone brackets excluded by requiring some substance)."""
    seen: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for module in modules.values():
        lines = _normalized(module.path)
        for at in range(len(lines) - BLOCK_LINES + 1):
            window = tuple(text for _, text in lines[at : at + BLOCK_LINES])
            if sum(len(text) for text in window) < 120 or any(
                    text.startswith(("import ", "from ")) for text in window):
                continue
            seen[window].append(module.name)
    found = set()
    for places in seen.values():
        if len(places) > 1:
            found.add(" = ".join(sorted(places)[:3]))
    return sorted(found)


def report() -> dict[str, list]:
    modules = read_modules()
    return {
        "cycles": cycles(modules),
        "crossings": crossings(modules),
        "oversized": oversized(modules),
        "repeated": repeated_blocks(modules),
        "packages": sorted((name, sum(m.lines for m in modules.values()
                                      if m.name == name or m.name.startswith(name + ".")))
                           for name in {m.name.rsplit(".", 1)[0] if m.path.name != "__init__.py"
                                        else m.name for m in modules.values()}),
    }


def main() -> int:
    found = report()
    print("lines per package:")
    for name, lines in found["packages"]:
        print(f"  {name:32} {lines:6}")
    for key in ("cycles", "crossings", "oversized", "repeated"):
        print(f"{key}: {len(found[key])}")
        for item in found[key]:
            reason = REASONS.get((key, str(item[1])) if key == "oversized" else (key, str(item)))
            print(f"  {item}" + (f"  -- {reason}" if reason else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
