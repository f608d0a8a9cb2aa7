"""The package's shape, kept true: no import cycle between modules (imports inside functions
count, so none can hide one), and every import goes to the same or an earlier layer of the
tree (README "Layout"). Reads the source with ast; imports nothing of fastdiff."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"fastdiff": REPO / "fastdiff", "fastdiff.kernels": REPO / "kernels"}

#: Layers in order: a module may import its own layer and the ones before it, never a later one.
#: ``fastdiff`` (the package itself: lazy public names) and the leaves come first or last as noted.
LAYERS = [
    ("leaves", ["fastdiff.presets", "fastdiff.pause", "fastdiff.files", "fastdiff.images", "fastdiff.moved"]),
    ("kernels", ["fastdiff.kernels"]),
    ("ops", ["fastdiff.ops"]),
    ("schedulers", ["fastdiff.schedulers"]),
    ("models", ["fastdiff.models"]),
    ("engines", ["fastdiff.engines"]),
    ("integrations", ["fastdiff.integrations"]),
    ("sampling", ["fastdiff.sampling"]),
    ("scale", ["fastdiff.scale"]),
    ("training", ["fastdiff.training"]),
    ("bench", ["fastdiff.bench"]),
    ("cli", ["fastdiff.commands", "fastdiff.cli"]),
]


def module_name(prefix: str, root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([prefix, *parts])


def modules() -> dict[str, Path]:
    return {module_name(prefix, root, p): p for prefix, root in ROOTS.items() for p in sorted(root.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The fastdiff modules ``name`` imports anywhere in its source (top level or in a function)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


GRAPH = {name: imports(name, path, set(modules())) for name, path in modules().items()}


def layer_of(name: str) -> int | None:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    return None  # the top package, fastdiff/__init__.py


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walk_finds_the_tree():
    assert {"fastdiff.sampling.sampler", "fastdiff.schedulers.dpmsolver", "fastdiff.kernels.attention"} <= set(GRAPH)
    assert "fastdiff.schedulers.schedules" in GRAPH["fastdiff.schedulers.dpmsolver"]


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_every_module_has_a_layer():
    assert [name for name in GRAPH if name != "fastdiff" and layer_of(name) is None] == []


def test_imports_go_to_earlier_layers_only():
    back_edges = [
        f"{name} ({LAYERS[layer_of(name)][0]}) -> {target} ({LAYERS[layer_of(target)][0]})"
        for name in sorted(GRAPH) if name != "fastdiff"
        for target in sorted(GRAPH[name]) if target != "fastdiff" and layer_of(target) > layer_of(name)
    ]
    assert back_edges == []


def test_the_layer_check_sees_a_back_edge():
    assert layer_of("fastdiff.ops.step") < layer_of("fastdiff.sampling.sampler") < layer_of("fastdiff.commands.sample")
