"""Nothing that touches the wire or stored data can run pickle: no module of zipcomm or cirrus
imports a pickle-like module, and every ``np.load`` refuses pickled objects."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p for pkg in ("zipcomm", "cirrus") for p in (ROOT / pkg).rglob("*.py"))
FORBIDDEN = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def test_the_scan_sees_the_wire_modules() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in MODULES}
    for must in ("zipcomm/protocol/frames.py", "zipcomm/protocol/payload.py", "zipcomm/rpc.py",
                 "zipcomm/daemon/protocol.py", "cirrus/ps/shard.py", "cirrus/dataset.py"):
        assert must in names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_pickle_imports_and_no_pickled_loads(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name.split(".")[0] in FORBIDDEN]
            assert not bad, f"{path}:{node.lineno} imports {bad}"
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.module.split(".")[0] not in FORBIDDEN, f"{path}:{node.lineno} imports from {node.module}"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id in ("np", "numpy"):
            flags = {k.arg: k.value for k in node.keywords}
            assert "allow_pickle" in flags and isinstance(flags["allow_pickle"], ast.Constant) \
                and flags["allow_pickle"].value is False, f"{path}:{node.lineno} np.load without allow_pickle=False"
