"""Imports run one way: a module imports only from its own layer or the layers below it (DESIGN.md §5).

Every module under multitask/ is parsed with ``ast`` (imports inside functions and under TYPE_CHECKING count too:
they are knowledge of the layer all the same), so a back-edge fails here, naming the module and the import,
before it becomes a cycle. Code that two upper layers share belongs in the highest layer below both.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "multitask"

# From the ground up; each entry: (layer, why it sits there, the modules and packages in it).
LAYERS: list[tuple[str, str, tuple[str, ...]]] = [
    ("base", "settings (the prefix settings task files declare among them), errors, registries, file helpers, "
             "scores and report rendering: nothing here knows a task or a model",
     ("multitask", "multitask.errors", "multitask.registry", "multitask.config", "multitask.utils", "multitask.tuning",
      "multitask.metrics", "multitask.reporting", "multitask.prefix.config")),
    ("data", "records, readers, hub copies, the feature types and their cache, index batches: data, not tasks",
     ("multitask.data",)),
    ("tasks", "task types and heads turn records into features and logits into predictions; no model around them",
     ("multitask.tasks", "multitask.heads")),
    ("prefix", "the prefix and prompt banks and their injection into attention; they know no model",
     ("multitask.prefix", "multitask.prompt")),
    ("assembly", "a model from its parts, and what every user of a model shares: checkpoint files, device and "
                 "precision, the process group",
     ("multitask.backbone", "multitask.encoder_stages", "multitask.model", "multitask.experiment", "multitask.runtime",
      "multitask.validation", "multitask.checkpoint", "multitask.device", "multitask.precision", "multitask.parallel")),
    ("inference", "the engine and model loading: the one way a model turns inputs into predictions",
     ("multitask.inference",)),
    ("training", "trains and grows models; evaluates through the engine, grows a model inference loads",
     ("multitask.training",)),
    ("faces", "what people run: trained runs, the server, comparisons and the command line",
     ("multitask.run", "multitask.serve", "multitask.compare", "multitask.cli", "multitask.__main__")),
]

RANK = {pattern: rank for rank, (_, _, patterns) in enumerate(LAYERS) for pattern in patterns}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """The rank of the longest pattern naming ``module`` or a package above it (the root only names itself)."""
    matches = [p for p in RANK if module == p or (p != "multitask" and module.startswith(p + "."))]
    return RANK[max(matches, key=len)] if matches else None


def imported_modules(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, module) of every multitask module ``path`` imports, wherever the import statement is."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # ``from multitask import parallel`` imports the module multitask.parallel, not the package.
            found += [(node.lineno, f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
                      for alias in node.names]
    return [(line, name) for line, name in found if name == "multitask" or name.startswith("multitask.")]


def test_every_module_has_a_layer():
    unplaced = [m for m in MODULES if layer_of(m) is None]
    assert not unplaced, f"add to LAYERS: {unplaced}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_layer_above_it(module):
    rank = layer_of(module)
    upward = [f"{module} (layer {LAYERS[rank][0]}) imports {target} (layer {LAYERS[layer_of(target)][0]}) "
              f"at line {line}"
              for line, target in imported_modules(module, MODULES[module]) if layer_of(target) > rank]
    assert not upward, "\n".join(upward)


def test_the_server_never_imports_training_even_through_other_modules():
    graph = {m: {t for _, t in imported_modules(m, p)} for m, p in MODULES.items()}
    for start in (m for m in MODULES if m.startswith("multitask.serve")):
        parents, stack = {start: None}, [start]
        while stack:
            current = stack.pop()
            if current.startswith("multitask.training"):
                chain = [current]
                while parents[chain[-1]] is not None:
                    chain.append(parents[chain[-1]])
                pytest.fail(f"{start} reaches training: {' -> '.join(reversed(chain))}")
            for target in graph.get(current, ()):
                if target not in parents:
                    parents[target] = current
                    stack.append(target)
