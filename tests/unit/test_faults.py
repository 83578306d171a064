"""Named fault points (pipelines.ops.faults): armed only through LANE_FAULTS, and a typo fails
the test that made it instead of silently arming nothing."""

from __future__ import annotations

import pytest

from pipelines.ops import faults


def test_unarmed_points_are_none(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert all(faults.armed(name) is None for name in faults.POINTS)
    assert faults.runtime_env() == {}


def test_armed_points_carry_their_values_to_the_workers(monkeypatch):
    spec = "label.exit_mid_commit=1, ingest.pause_after_shard=20"
    monkeypatch.setenv(faults.ENV, spec)
    assert faults.armed("label.exit_mid_commit") == "1"
    assert faults.armed("ingest.pause_after_shard") == "20"
    assert faults.armed("train.exit_at_step") is None
    assert faults.runtime_env() == {"env_vars": {faults.ENV: spec}}


def test_a_misspelt_point_fails_loudly(monkeypatch):
    monkeypatch.setenv(faults.ENV, "label.exit_mid_comit=1")
    with pytest.raises(ValueError, match="unknown fault point 'label.exit_mid_comit'"):
        faults.runtime_env()
    with pytest.raises(KeyError):
        faults.armed("no.such_point")


def test_no_product_function_takes_a_test_only_parameter():
    """What used to be crash_after= and slow-write parameters are fault points now."""
    import ast

    from tests.support.helpers import ROOT

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
