"""Package boundaries: `runtime` imports with only onnxruntime + numpy; `graph_passes` never imports torch or its
sibling `runtime`; `models` never imports `hn_export` (packages import downward only). No import circle inside the
packages either, not even one held together by imports inside functions; each model metadata key is spelled once."""

from __future__ import annotations

import ast
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = """
import sys, importlib.abc
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
import importlib
for module in {modules!r}:
    importlib.import_module(module)
leaked = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)
assert not leaked, leaked
print('ok', len({modules!r}))
"""


def modules_of(package: str) -> list[str]:
    return [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(ROOT / package)])]


@pytest.mark.parametrize("package,blocked", [
    ("runtime", ["torch", "diffusers", "onnx", "onnx_ir", "onnxscript", "hn_export", "graph_passes", "models"]),
    ("graph_passes", ["torch", "diffusers", "hn_export", "models", "runtime"]),
    ("models", ["hn_export", "graph_passes", "runtime"]),
])
def test_package_imports_without(package, blocked):
    modules = modules_of(package)
    assert len(modules) > 1
    code = BLOCKER.format(blocked=blocked, modules=modules)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"ok {len(modules)}"


def test_writer_and_device_agree_on_names():
    import graph_passes.domain as written
    import runtime.domain as read

    names = ("HADANORM_DOMAIN", "HADANORM_OPSET_VERSION")
    assert {n: getattr(written, n) for n in names} == {n: getattr(read, n) for n in names}


PACKAGES = ("hn_export", "models", "graph_passes", "runtime")


def _sources() -> dict[str, Path]:
    """Module name -> file, for every module of the project's packages (subpackages included)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(tree: ast.Module, module: str, is_package: bool, known: dict[str, Path]) -> set[str]:
    """The project modules `module` imports anywhere in its body (module level or inside functions; not under
    ``if TYPE_CHECKING:``, which never runs). ``from a import b`` names module ``a.b`` when that is one, else ``a``."""
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                name = f"{base}.{alias.name}"
                out |= {name} if name in known else {base} if base in known else set()
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself), Tarjan's."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circles(package):
    """Every import, at module level or inside a function, follows one direction: no module needs a function-level
    import to break a circle (e.g. hn_export.denoise <-> hn_export.families, or models.build -> models.families.* ->
    models.dit_stats -> models.build, both gone)."""
    known = _sources()
    graph = {name: _imported(ast.parse(path.read_text()), name, path.name == "__init__.py", known)
             for name, path in known.items()}
    circles = [c for c in _cycles(graph) if any(m.split(".")[0] == package for m in c)]
    detail = ["; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(c)))}" for m in c) for c in circles]
    assert not circles, detail


def test_metadata_keys_spelled_once():
    """Each model metadata key (a string literal ``hn_export.<name>``) is written out in one place: the keys the device
    reads in `runtime.domain`, the others in `hn_export.metadata_keys`."""
    spelled: dict[str, list[str]] = {}
    for name, path in _sources().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    re.fullmatch(r"hn_export\.[a-z_]+", node.value):
                spelled.setdefault(node.value, []).append(name)
    assert "hn_export.family" in spelled
    assert {key: homes for key, homes in spelled.items() if len(homes) > 1} == {}
