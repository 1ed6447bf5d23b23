"""Tests use diagpass's public names only: no ``from diagpass... import _x``,
no ``<diagpass module>._x`` (a dunder such as ``__version__`` is public), no
private module (``diagpass._entry``), and no ``monkeypatch.setattr`` of a
private diagpass name. A test that needs a private name is testing an
implementation detail; make the name public (and document it) or test
through what uses it."""

import ast
import pathlib
from typing import List, Set

TESTS = pathlib.Path(__file__).resolve().parent


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _diagpass(module: str) -> bool:
    return module == "diagpass" or module.startswith("diagpass.")


def _private_path(dotted: str) -> bool:
    return any(_private(part) for part in dotted.split("."))


def _root(node: ast.AST):
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def private_uses(source: str, filename: str = "<test>") -> List[str]:
    """Every use of a private diagpass name in ``source``, as 'line: what'."""
    tree = ast.parse(source, filename)
    bound: Set[str] = set()  # local names bound to diagpass modules or objects
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _diagpass(alias.name):
                    bound.add(alias.asname or alias.name.split(".")[0])
                    if _private_path(alias.name):
                        found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _diagpass(node.module):
            if _private_path(node.module):
                found.append(f"{node.lineno}: from {node.module} import ...")
            for alias in node.names:
                bound.add(alias.asname or alias.name)
                if _private(alias.name):
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and _root(node.value) in bound:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("setattr", "delattr"):
            args = node.args
            if len(args) >= 2 and _root(args[0]) in bound and isinstance(args[1], ast.Constant) \
                    and isinstance(args[1].value, str) and _private(args[1].value):
                found.append(f"{node.lineno}: {node.func.attr} {ast.unparse(args[0])}.{args[1].value}")
            elif args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str) \
                    and _diagpass(args[0].value) and _private_path(args[0].value):
                found.append(f"{node.lineno}: {node.func.attr} {args[0].value}")
    return sorted(set(found), key=lambda s: int(s.split(":")[0]))


def test_the_scan_finds_each_kind_of_private_use():
    source = """
import diagpass
import diagpass.testing as T
import diagpass._entry
from diagpass.passes.cost import _node_flops, estimate_cost
from diagpass import testing
from diagpass._entry import diagonal
from diagpass.passes import cost as c

diagpass._entry
T._run
testing._sequential_compiled(1)
c._LINEAR
diagpass.passes.cost._numel
monkeypatch.setattr(testing, "_sequential_compiled", None)
monkeypatch.setattr("diagpass.testing._run", None)
"""
    found = [line.split(": ", 1)[1] for line in private_uses(source)]
    assert found == [
        "import diagpass._entry",
        "from diagpass.passes.cost import _node_flops",
        "from diagpass._entry import ...",
        "diagpass._entry",
        "T._run",
        "testing._sequential_compiled",
        "c._LINEAR",
        "diagpass.passes.cost._numel",
        "setattr testing._sequential_compiled",
        "setattr diagpass.testing._run",
    ]


def test_the_scan_allows_public_names_dunders_and_private_aliases():
    source = """
import diagpass
from diagpass import backend as _backend
from diagpass.passes.cost import node_flops
import torch

diagpass.__version__
_backend.compile_count
torch._dynamo.reset()
batched = object()
batched._pieces          # an object's attribute, not a module's name
from .conftest import _capture
"""
    assert private_uses(source) == []


# Known, to be removed: (file, use). The fast path of effects analysis is
# switched off by patching a private function to compare it with the full run;
# a public switch in diagpass/passes/effects.py would remove it.
KNOWN = {
    ("passes/test_functionalize.py", "setattr effects_mod._effects_of_suspects"),
}


def test_no_test_uses_a_private_diagpass_name():
    files = sorted(p for p in TESTS.rglob("*.py") if p.resolve() != pathlib.Path(__file__).resolve())
    assert len(files) > 20
    offenders = {}
    for path in files:
        for use in private_uses(path.read_text(), str(path)):
            line, what = use.split(": ", 1)
            offenders[(path.relative_to(TESTS).as_posix(), what)] = line
    new = sorted(f"{f}:{offenders[(f, w)]}: {w}" for f, w in set(offenders) - KNOWN)
    assert not new, "tests using private diagpass names:\n  " + "\n  ".join(new)
    gone = sorted(f"{f}: {w}" for f, w in KNOWN - set(offenders))
    assert not gone, "fixed: remove from KNOWN:\n  " + "\n  ".join(gone)
