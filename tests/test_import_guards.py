"""Package boundaries: `runtime` imports with only onnxruntime + numpy; `graph_passes` never imports torch or its
sibling `runtime`; `models` never imports `hn_export` (packages import downward only)."""

from __future__ import annotations

import pkgutil
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

    names = ("HADANORM_DOMAIN", "HADANORM_OPSET_VERSION", "TRANSFORM_OPS_KEY", "FORMAT_KEY", "ATTENTION_KEY")
    assert {n: getattr(written, n) for n in names} == {n: getattr(read, n) for n in names}
