"""The package layout keeps its promises: no import cycle, imports at module top, no private names across modules,
no switch on a method's name outside ``divico.methods``, and a library wheel without weights."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"divico": ROOT / "src" / "divico", "divico_testbed": ROOT / "testbed" / "src" / "divico_testbed"}
#: Late imports that an optional dependency needs (installed only with an extra).
OPTIONAL_LATE_IMPORTS = {("divico.video", "av")}


def _modules(package: str) -> dict[str, Path]:
    root = PACKAGES[package]
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = (package, *path.relative_to(root).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(module: str, path: Path, known: set[str]) -> list[tuple[str, list[str], bool]]:
    """(imported module, imported names, at module top) for every import statement of ``module``."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found = []
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [alias.name for alias in node.names]
            found.append((base, names, id(node) in top_level))
            # ``from pkg import submodule`` imports the submodule too.
            found += [(f"{base}.{name}", [], id(node) in top_level) for name in names if f"{base}.{name}" in known]
    return found


def _graph(package: str) -> dict[str, set[str]]:
    modules = _modules(package)
    known = set(modules)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _, _ in _imports(name, path, known):
            if target in known and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_cycle_finder_finds_a_cycle():
    # The checker itself must be able to fail.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_import_graph_has_no_cycle(package):
    graph = _graph(package)
    assert len(graph) > 5
    assert _cycles(graph) == []


def test_library_does_not_import_the_testbed():
    graph = _graph("divico")
    assert not [(name, target) for name, targets in graph.items() for target in targets
                if target.startswith("divico_testbed")]
    for name, path in _modules("divico").items():
        assert "divico_testbed" not in {target.split(".")[0] for target, _, _ in _imports(name, path, set())}, name


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_imports_are_at_module_top(package):
    late = []
    for name, path in _modules(package).items():
        for target, _, at_top in _imports(name, path, set()):
            if not at_top and (name, target.split(".")[0]) not in OPTIONAL_LATE_IMPORTS:
                late.append(f"{name}: {target}")
    assert late == []


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_private_name_is_imported_from_another_module(package):
    private = []
    for name, path in _modules(package).items():
        for target, names, _ in _imports(name, path, set()):
            if target.split(".")[0] in PACKAGES:
                private += [f"{name}: {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert private == []


def test_no_switch_on_a_method_name_outside_methods():
    import divico

    names = "|".join(re.escape(name) for name in divico.available_methods())
    switch = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    loop = re.compile(rf"""for \w+ in \(\s*["']({names})["']""")
    offenders = []
    for package in PACKAGES:
        for name, path in _modules(package).items():
            if name.startswith("divico.methods"):
                continue
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                code = line.split("#", 1)[0]
                if switch.search(code) or loop.search(code):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_library_wheel_is_small_and_holds_no_weights(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT), "-w",
         str(tmp_path)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("divico-*.whl")
    assert wheel.stat().st_size < 1_000_000
    names = zipfile.ZipFile(wheel).namelist()
    assert any(name == "divico/api.py" for name in names)
    assert not [name for name in names if name.endswith((".safetensors", ".bin", ".pt", ".onnx", ".gguf"))]
    assert not [name for name in names if name.startswith("divico_testbed/")]
