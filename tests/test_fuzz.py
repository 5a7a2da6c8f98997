"""Fuzzed plans and profiles: only AllocplanError escapes, and whatever is accepted is valid."""

from __future__ import annotations

import pytest
from fuzz_formats import (
    base_documents,
    load,
    load_text,
    mutated_data,
    mutated_text,
    plan_invariants,
    profile_invariants,
)
from hypothesis import HealthCheck, given, settings

from allocplan.formats.records import dump_yaml

PLAN, PROFILE = base_documents()
CHECKS = {"plan": plan_invariants, "profile": profile_invariants}
BASES = {"plan": PLAN, "profile": PROFILE}


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _check(kind: str, loaded) -> None:
    if loaded is not None:
        CHECKS[kind](loaded)


def test_the_bases_are_valid():
    for kind, base in BASES.items():
        CHECKS[kind](load(kind, base))
        CHECKS[kind](load_text(kind, dump_yaml(base)))


@pytest.mark.parametrize("kind", ["plan", "profile"])
def test_fuzz_data_quick(kind):
    @fuzz_settings(300)
    @given(data=mutated_data(BASES[kind]))
    def run(data):
        _check(kind, load(kind, data))

    run()


@pytest.mark.parametrize("kind", ["plan", "profile"])
def test_fuzz_text_quick(kind):
    @fuzz_settings(300)
    @given(text=mutated_text(dump_yaml(BASES[kind])))
    def run(text):
        _check(kind, load_text(kind, text))

    run()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plan", "profile"])
@pytest.mark.parametrize("source", ["data", "text"])
def test_fuzz_10000(kind, source):
    """2,500 examples per (kind, source): 10,000 in all."""
    strategy = mutated_data(BASES[kind]) if source == "data" else mutated_text(dump_yaml(BASES[kind]))

    @fuzz_settings(2500)
    @given(doc=strategy)
    def run(doc):
        _check(kind, load(kind, doc) if source == "data" else load_text(kind, doc))

    run()
