"""EOS_FAILPOINTS parsing: bad specs are refused with the expected form."""

from __future__ import annotations

import pytest

from eos_airflow import failpoints
from eos_airflow.errors import ConfigurationError, FailpointError


@pytest.mark.parametrize("spec", ["after_commit", "after_commit=explode", "before_commit=sleep:x"])
def test_bad_specs_name_the_expected_form(monkeypatch, spec):
    monkeypatch.setenv("EOS_FAILPOINTS", spec)
    with pytest.raises(ConfigurationError, match="raise, exit or sleep:SECONDS|sleep needs"):
        failpoints.check("after_commit")


def test_attempt_filter_fires_only_on_that_attempt(monkeypatch):
    monkeypatch.setenv("EOS_FAILPOINTS", "after_claim@2=raise, before_commit=sleep:0")
    failpoints.check("after_claim", attempt=1)
    failpoints.check("before_commit", attempt=1)
    with pytest.raises(FailpointError, match="after_claim"):
        failpoints.check("after_claim", attempt=2)


def test_unknown_hook_step_is_refused():
    with pytest.raises(ConfigurationError, match="unknown failpoint step"):
        failpoints.set_hook("after_lunch", lambda attempt: None)


def test_the_observer_sees_each_firing_before_its_action_and_nothing_else(monkeypatch):
    """The crash matrix counts a fault as fired only on this evidence."""
    seen: list[tuple[str, str, int | None]] = []
    monkeypatch.setenv(
        "EOS_FAILPOINTS", "after_claim@2=raise, before_commit=sleep:0, after_chunk#2=raise"
    )
    failpoints._hits.clear()  # earlier tests of this process may have counted hits
    failpoints.set_observer(lambda step, action, attempt: seen.append((step, action, attempt)))
    try:
        failpoints.check("after_claim", attempt=1)  # reached, not configured for attempt 1
        failpoints.check("after_commit", attempt=1)  # not configured at all
        failpoints.check("after_chunk", attempt=1)  # hit 1 of after_chunk#2
        assert seen == []
        failpoints.check("before_commit", attempt=1)
        with pytest.raises(FailpointError):
            failpoints.check("after_claim", attempt=2)
        with pytest.raises(FailpointError):
            failpoints.check("after_chunk", attempt=1)
    finally:
        failpoints.set_observer(None)
    assert seen == [
        ("before_commit", "sleep:0", 1),
        ("after_claim", "raise", 2),
        ("after_chunk", "raise", 1),
    ]
    failpoints.check("before_commit", attempt=1)  # cleared: no more reports
    assert len(seen) == 3
