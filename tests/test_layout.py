"""The package's shape, drawn from its own imports: no import cycle between files, layers that only look down.

Every import counts: top-level, inside functions and under ``TYPE_CHECKING`` (a type-only cycle is still two
files that cannot be read apart), and a name taken from a lazily exporting package counts as an import of the
file that defines it."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "pluribus"

# Inside a system's folder, a layer may import only the layers listed after it (and itself).
SUBLAYERS = {
    "pluribus.federated": ("flower", "studies", "core"),
    "pluribus.fusion": ("flower", "studies", "core", "privacy"),
}


def module_files(root: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def lazy_exports(path: Path) -> dict[str, str]:
    """A package's ``_EXPORTS`` table (name -> submodule, relative), if it has one."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> Iterator[str]:
    """The package's own modules that ``name`` (at ``path``) imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [(base, a.name) for a in node.names]
        else:
            continue
        for module, attr in targets:
            if not module.startswith("pluribus"):
                continue
            if attr is not None and f"{module}.{attr}" in modules:  # `from pkg import submodule`
                yield f"{module}.{attr}"
            elif attr is not None and module in modules and modules[module].name == "__init__.py":
                home = lazy_exports(modules[module]).get(attr)
                yield f"{module}.{home}" if home else module
            elif module in modules:
                yield module


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (packages' ``__init__`` included, self-edges dropped)."""
    modules = module_files()
    return {name: {t for t in imported_modules(name, path, modules) if t in modules and t != name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def is_cli(module: str) -> bool:
    """A command-line module: ``pluribus.cli`` or a system's ``cli``."""
    return module == "pluribus.cli" or module.endswith(".cli")


def is_demo(module: str) -> bool:
    """The demo package or one of its steps."""
    return module == "pluribus.demo" or module.startswith("pluribus.demo.")


def reaches_up(src: str, dst: str) -> bool:
    """An import from a lower layer into the front ends: only the command line imports a command-line module,
    and only ``pluribus.cli`` (the `pluribus demo` command) imports the demo."""
    return (is_cli(dst) and not is_cli(src)) or (is_demo(dst) and not is_demo(src) and src != "pluribus.cli")


def test_no_import_cycle_between_files() -> None:
    assert cycles(import_graph()) == []


def test_the_library_does_not_import_the_cli_or_the_demo() -> None:
    bad = sorted(f"{src} -> {dst}" for src, dsts in import_graph().items() for dst in dsts if reaches_up(src, dst))
    assert bad == []


@pytest.mark.parametrize("system", sorted(SUBLAYERS))
def test_a_systems_layers_only_import_those_below(system: str) -> None:
    order = SUBLAYERS[system]

    def layer(module: str) -> int | None:
        rest = module[len(system) + 1:].split(".")[0] if module.startswith(system + ".") else None
        return order.index(rest) if rest in order else None

    bad = sorted(f"{src} -> {dst}" for src, dsts in import_graph().items() for dst in dsts
                 if layer(src) is not None and layer(dst) is not None and layer(dst) < layer(src))  # type: ignore[operator]
    assert bad == []


def test_the_checks_see_cycles_and_front_end_imports(tmp_path: Path) -> None:
    """The walker itself: a two-file cycle through a function-level import, a lazy export and a relative
    import are all seen."""
    pkg = tmp_path / "pluribus"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text('_EXPORTS = {"Thing": "b"}\n')
    (pkg / "sub" / "a.py").write_text("def f():\n    from pluribus.sub import Thing\n")
    (pkg / "sub" / "b.py").write_text("from . import a\n")
    modules = module_files(pkg)
    graph = {n: {t for t in imported_modules(n, p, modules) if t in modules and t != n} for n, p in modules.items()}
    assert cycles(graph) == [["pluribus.sub.a", "pluribus.sub.b"]]
    assert reaches_up("pluribus.federated.cli", "pluribus.demo.basic")
    assert reaches_up("pluribus.encoder.event_language", "pluribus.encoder.cli")
    assert not reaches_up("pluribus.cli", "pluribus.demo") and not reaches_up("pluribus.cli", "pluribus.fusion.cli")
    assert not reaches_up("pluribus.demo.basic", "pluribus.data.features")
