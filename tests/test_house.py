"""The floor plan holds (tests/house.py): no import cycle, no shipped side reaching into
another deliverable, no oversized module or function and no repeated block of lines
without a written reason — and no reason left for something that is gone."""

from __future__ import annotations

from . import house


def _found() -> set[tuple[str, str]]:
    report = house.report()
    found = {("cycles", " ".join(cycle)) for cycle in report["cycles"]}
    found |= {("crossings", line) for line in report["crossings"]}
    found |= {(kind, name) for kind, name, _ in report["oversized"]}
    found |= {("repeated", line) for line in report["repeated"]}
    return found


def test_every_exception_has_a_reason():
    unexplained = _found() - set(house.REASONS)
    assert not unexplained, f"new exceptions without a reason in tests/house.py: {unexplained}"


def test_no_reason_outlives_its_exception():
    stale = set(house.REASONS) - _found()
    assert not stale, f"reasons for what is gone (remove them from tests/house.py): {stale}"


def test_the_rescue_side_imports_only_its_own_package():
    rescue = [line for line in house.report()["crossings"] if "(rescue)" in line]
    assert set(rescue) <= {key for kind, key in house.REASONS if kind == "crossings"}
