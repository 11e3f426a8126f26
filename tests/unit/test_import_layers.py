"""The package's layers: every import of a simpo_mcore module points down (or within its own layer), the
module graph has no cycle, and imports sit at the top of each module except in the entry points.

The layers, lowest first (docs/architecture.md draws them):

    config, cpu_mode, console -> checkpoint_info, schedule, output_dir, resume, preflight -> parallel -> microbatch
    -> data -> model -> convert -> logprobs_kernels -> logprobs, losses -> objective -> checkpoint, snapshot,
    optim, metrics_log -> plan -> runtime -> reference -> evaluate -> train -> cli

``microbatch`` (the typed micro-batch) is the contract between ``data`` (which makes it ready) and ``objective``
(which runs it): below both, so that the objective needs nothing from ``data``.

The second layer is what the launcher checks before any rank starts: no torch, no data libraries
(``test_the_preflight_imports_no_torch``).

``convert`` (HF <-> megatron files, model weights I/O) and ``checkpoint`` (training state) sit beside the
compute path: they know the model's architecture and nothing of the step.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "simpo_mcore"

LAYERS = [
    ("config", "cpu_mode", "console"),
    ("checkpoint_info", "schedule", "output_dir", "resume", "preflight"),
    ("parallel",),
    ("microbatch",),
    ("data",),
    ("model",),
    ("convert",),
    ("logprobs_kernels",),
    ("logprobs", "losses"),
    ("objective",),
    ("checkpoint", "snapshot", "optim", "metrics_log"),
    ("plan",),
    ("runtime",),
    ("reference",),
    ("evaluate",),
    ("train",),
    ("cli",),
]
"""Top-level modules or packages of simpo_mcore, lowest layer first."""

ENTRY_POINTS = {"simpo_mcore.cli", "simpo_mcore.convert.tool"}
"""May import simpo_mcore modules inside functions: each command imports its job only once the arguments
parsed, so ``--help`` and argument errors answer without importing torch / megatron."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)")


def is_module(dotted: str) -> bool:
    path = PACKAGE.parent / Path(*dotted.split("."))
    return path.with_suffix(".py").exists() or path.is_dir()


def simpo_imports(path: Path, text: str | None = None) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for each simpo_mcore import of ``path`` (or of ``text``
    as if it were that file)."""
    tree = ast.parse(path.read_text() if text is None else text)
    top_level = {id(node) for node in tree.body}
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            # `from simpo_mcore import checkpoint` imports the module simpo_mcore.checkpoint
            targets = [f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        for target in targets:
            if target == "simpo_mcore" or target.startswith("simpo_mcore."):
                out.append((target, node.lineno, id(node) in top_level))
    return out


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    for path in MODULES:
        if module_name(path) != "simpo_mcore":
            layer_of(module_name(path))


def check_module(path: Path, text: str | None = None) -> None:
    source = module_name(path)
    for target, line, top in simpo_imports(path, text):
        if target == "simpo_mcore":
            continue
        assert layer_of(target) <= layer_of(source), (
            f"{path.name}:{line}: {source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)}), "
            "which is above it")
        assert top or source in ENTRY_POINTS, f"{path.name}:{line}: import of {target} inside a function"


@pytest.mark.parametrize("path", [p for p in MODULES if module_name(p) != "simpo_mcore"], ids=module_name)
def test_imports_point_down_and_sit_at_the_top(path):
    check_module(path)


def test_no_import_cycle():
    graph = {module_name(p): {t for t, _, _ in simpo_imports(p) if t != "simpo_mcore"} for p in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_check_catches_what_it_guards_against():
    """A data module importing the objective (upward), and a model module importing inside a function."""
    padded = PACKAGE / "data" / "padded.py"
    with pytest.raises(AssertionError, match="which is above it"):
        check_module(padded, padded.read_text() + "\nfrom simpo_mcore.objective import loss_func\n")
    builder = PACKAGE / "model" / "builder.py"
    with pytest.raises(AssertionError, match="inside a function"):
        check_module(builder, builder.read_text() + "\ndef f():\n    from simpo_mcore.model import specs\n")


def test_the_objective_imports_nothing_from_data():
    """The micro-batch reaches the objective ready: nothing at forward time reaches back into data preparation."""
    path = PACKAGE / "objective.py"
    imported = [target for target, _, _ in simpo_imports(path)]
    assert "simpo_mcore.microbatch" in imported
    assert not [t for t in imported if t == "simpo_mcore.data" or t.startswith("simpo_mcore.data.")], imported


def test_the_preflight_imports_no_torch():
    """The launcher's checks (the second layer) import neither torch, megatron nor the data libraries: a user error
    comes within seconds of the command, before the ranks' imports (tens of seconds on a loaded CPU)."""
    code = ("import sys, simpo_mcore.preflight, simpo_mcore.console; "
            "print(sorted(m for m in ('torch', 'megatron', 'datasets', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr

