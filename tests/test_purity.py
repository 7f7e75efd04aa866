"""elmo_core stays pure model code: torch, numpy and the standard library only."""

import ast
import sys

from tests.conftest import ROOT

ALLOWED = {"torch", "numpy", "elmo_core", "__future__"}


def test_elmo_core_imports_only_torch_numpy_stdlib():
    bad = []
    for path in sorted((ROOT / "elmo_core").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in ALLOWED and top not in sys.stdlib_module_names:
                    bad.append(f"{path.name}: {name}")
    assert not bad, bad


def test_no_unsafe_torch_load():
    offenders = []
    for folder in ("elmo_core", "storage", "tasks", "flows", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if "torch.load(" in line and "weights_only=True" not in line:
                    offenders.append(f"{path.name}:{i}")
    assert not offenders, offenders
