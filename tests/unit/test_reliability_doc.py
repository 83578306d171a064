"""docs/reliability.md names the test that injects each fault: every test it names exists, so a
renamed or removed test cannot leave the page pointing at nothing."""

from __future__ import annotations

import ast
import re

from tests.support.helpers import ROOT

PAGE = ROOT / "docs" / "reliability.md"


def named_tests(text: str) -> set[tuple[str, str]]:
    """(file, test) for each `unit|integration/test_x.py::test_y` and, in a row that names a
    file, each `test_y` after it."""
    found = set()
    for line in text.splitlines():
        files = re.findall(r"`((?:unit|integration)/test_\w+\.py)(?:::(test_\w+))?`", line)
        for file, test in files:
            if test:
                found.add((file, test))
        if files:
            current = files[0][0]
            for test in re.findall(r"`(test_\w+)`", line):
                found.add((current, test))
    return found


def defined_tests(file: str) -> set[str]:
    tree = ast.parse((ROOT / "tests" / file).read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_every_test_the_reliability_page_names_exists():
    named = named_tests(PAGE.read_text())
    assert len(named) >= 20
    missing = [f"{f}::{t}" for f, t in sorted(named) if t not in defined_tests(f)]
    assert missing == []


def test_a_test_name_the_page_no_longer_matches_is_reported():
    line = "| x | `integration/test_label.py::test_no_such_test` | y |"
    [(file, test)] = named_tests(line)
    assert test not in defined_tests(file)
