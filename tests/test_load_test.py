"""bench/load_test.py keeps one section of bench/README.md: a run replaces it, never adds another."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "load_test.py"


@pytest.fixture(scope="module")
def load_test():
    spec = importlib.util.spec_from_file_location("load_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _section(m, body: str) -> str:
    return f"{m.MARK_START}\n## Serving\n{body}\n{m.MARK_END}"


def test_readme_section_is_replaced_not_appended(load_test):
    m = load_test
    readme = "# Benchmarks\n\nintro\n"
    first = m.replace_section(readme, _section(m, "run 1"))
    assert first == readme + "\n" + _section(m, "run 1") + "\n"  # none yet: added at the end
    later = first + "\n## What is left\n\nmore\n"
    second = m.replace_section(later, _section(m, "run 2"))
    assert second == later.replace(_section(m, "run 1"), _section(m, "run 2"))
    assert second.count(m.MARK_START) == 1 and "run 1" not in second
    # sections an older version appended are folded into one
    twice = first + "\n" + _section(m, "run 0") + "\n"
    assert m.replace_section(twice, _section(m, "run 3")) == readme + "\n" + _section(m, "run 3") + "\n"
    with pytest.raises(SystemExit, match="mend it"):
        m.replace_section(readme + m.MARK_START + "\n", _section(m, "x"))
