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
