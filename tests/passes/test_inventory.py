"""Every pass class defined in `graph_passes` has a row in tests/passes/README.md naming its test file, and that
file imports the class from the module the row names."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import onnx_ir as ir

import graph_passes

HERE = Path(__file__).resolve().parent
ROW = re.compile(r"^\| `(\w+)` \| `(graph_passes\.\w+)` \| `(test_\w+\.py)` \|", re.MULTILINE)


def pass_classes() -> dict[str, str]:
    """class name -> defining module, for every `ir.passes.PassBase` subclass defined in `graph_passes`."""
    found = {}
    for info in pkgutil.iter_modules(graph_passes.__path__):
        module = importlib.import_module(f"graph_passes.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, ir.passes.PassBase):
                found[name] = module.__name__
    return found


def test_every_pass_class_has_a_test_file():
    rows = {name: (module, test) for name, module, test in ROW.findall((HERE / "README.md").read_text())}
    classes = pass_classes()
    assert classes == {name: module for name, (module, _) in rows.items()}
    for name, (module, test) in rows.items():
        text = (HERE / test).read_text()
        assert re.search(rf"^from {re.escape(module)} import .*\b{name}\b", text, re.MULTILINE), (name, test)
