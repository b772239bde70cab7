"""Renamed public names keep working for one release, with a DeprecationWarning."""

from __future__ import annotations

import importlib

import pytest

import daemoneye_eventbus
from daemoneye_eventbus import correlation, topics

RENAMED = [
    ("daemoneye_eventbus.topics", "validate_filter", "validate_topic_filter"),
    ("daemoneye_eventbus.topics", "matches", "topic_matches"),
    ("daemoneye_eventbus.correlation", "validate_filter", "validate_correlation_filter"),
    ("daemoneye_eventbus.correlation", "filter_matches", "correlation_matches"),
]


@pytest.mark.parametrize(("module", "old", "new"), RENAMED)
def test_old_name_warns_and_is_the_new_function(module: str, old: str, new: str) -> None:
    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=f"{module}.{old} is deprecated; use {new}"):
        value = getattr(mod, old)
    assert value is getattr(mod, new)


@pytest.mark.parametrize("old", ["validate_filter", "matches", "filter_matches"])
def test_package_still_offers_old_names_but_not_in_all(old: str) -> None:
    assert old not in daemoneye_eventbus.__all__
    with pytest.warns(DeprecationWarning, match="is deprecated"):
        value = getattr(daemoneye_eventbus, old)
    assert callable(value)


def test_unknown_names_still_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        topics.nothing  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        correlation.nothing  # noqa: B018


def test_old_names_behave_like_the_new_ones() -> None:
    with pytest.warns(DeprecationWarning, match="is deprecated"):
        matches = topics.matches
    assert matches("events.#", "events.process") is True
    assert matches("events.+", "events.a.b") is False
