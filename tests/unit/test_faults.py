"""Named fault points (pipelines.runtime.faults): a point does nothing unless a handler is
injected through the environment, the injected handler gets the point's context, the variables
reach the workers, and a misspelt point fails the test that made it instead of arming nothing."""

from __future__ import annotations

import ast
import sys
import types

import pytest

from pipelines.runtime import faults
from tests.support import fault_handler
from tests.support.helpers import ROOT


@pytest.fixture
def recorder(monkeypatch):
    """A handler module of the test's own, injected as the suite's is: the calls it got."""
    calls = []
    module = types.ModuleType("recording_fault_handler")
    module.on_fault_point = lambda name, **context: calls.append((name, context))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setenv(faults.ENV, module.__name__)
    return calls


def test_without_a_handler_a_point_does_nothing_and_nothing_is_carried(monkeypatch):
    for key in (faults.ENV, fault_handler.SPEC):
        monkeypatch.delenv(key, raising=False)
    faults.point("label.file_committed", moved=1)
    assert faults.runtime_env() == {}


def test_the_injected_handler_gets_each_point_with_its_context(recorder):
    faults.point("label.file_committed", moved=3)
    assert recorder == [("label.file_committed", {"moved": 3})]


def test_an_unknown_point_is_an_error_in_the_product(recorder):
    with pytest.raises(KeyError, match="unknown fault point 'no.such_point'"):
        faults.point("no.such_point")
    assert recorder == []


def test_the_armed_points_reach_the_workers(monkeypatch):
    env = fault_handler.fault_env("label.file_committed=1, ingest.shard_written=20")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert faults.runtime_env() == {"env_vars": env}
    assert fault_handler.armed() == {"label.file_committed": "1", "ingest.shard_written": "20"}


def test_a_misspelt_point_fails_loudly():
    with pytest.raises(ValueError, match="unknown fault point 'label.file_comitted'"):
        fault_handler.fault_env("label.file_comitted=1")


def test_product_code_holds_no_sleep_or_exit_of_a_fault():
    """Pauses and deaths are the handler's (tests/support): a product function that names a
    fault point, and the fault module itself, neither sleep nor end the process."""
    found = []
    for path in (ROOT / "pipelines").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            calls = {ast.unparse(c.func) for c in ast.walk(fn) if isinstance(c, ast.Call)}
            if "faults.point" in calls or path.name == "faults.py":
                found += [f"{path.relative_to(ROOT)}:{fn.name} calls {c}"
                          for c in calls & {"time.sleep", "os._exit", "sys.exit"}]  # fmt: skip
    assert found == []


def test_no_product_function_takes_a_test_only_parameter():
    """What used to be crash_after= and slow-write parameters are fault points now."""
    words = {"crash", "chaos", "fault", "faults", "slow", "inject"}
    found = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({arg.arg})"
        for path in (ROOT / "pipelines").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for arg in [*node.args.args, *node.args.kwonlyargs]
        if words & set(arg.arg.split("_"))
    ]
    assert found == []
