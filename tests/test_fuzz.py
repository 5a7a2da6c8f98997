"""Fuzzed plans and profiles: only AllocplanError escapes, and whatever is accepted is valid."""

from __future__ import annotations

import pytest
from fuzz_formats import (
    base_documents,
    load,
    load_bytes,
    load_text,
    mutated_bytes,
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


@pytest.mark.parametrize("kind", ["plan", "profile"])
def test_fuzz_bytes_quick(kind):
    @fuzz_settings(300)
    @given(data=mutated_bytes(dump_yaml(BASES[kind])))
    def run(data):
        _check(kind, load_bytes(kind, data))

    run()


def test_reader_errors_are_one_line_with_the_byte():
    """Characters the YAML reader refuses, and bytes that are not UTF-8, are one AllocplanError line naming the
    byte offset (they used to escape as PyYAML's multi-line ReaderError)."""
    from allocplan.errors import AllocplanError
    from allocplan.formats.strict_yaml import decode_text, load_strict

    text = dump_yaml(PLAN)
    at = text.index("schema_version")
    for bad, shown in (("\x00", "U+0000"), ("\x14", "U+0014"), ("\ud800", "U+D800")):
        with pytest.raises(AllocplanError) as caught:
            load_strict(text[:at] + bad + text[at:], "plan", "'p.yaml'")
        assert str(caught.value) == (f"plan file 'p.yaml' is not valid YAML at byte {len(text[:at].encode())}: character"
                                     f" {shown} is not allowed (control characters, NUL and lone surrogates are not"
                                     " text); remove it")
    with pytest.raises(AllocplanError, match=r"^plan file 'p.yaml' is not UTF-8 text \(byte 5: unexpected end of"
                                             r" data\); save it as UTF-8$"):
        decode_text(b"kind:\xe2\x82", "plan", "'p.yaml'")  # a euro sign cut after its second byte
    assert load_bytes("plan", b"\xef\xbb\xbf" + text.encode()) is not None  # a leading byte-order mark is fine


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plan", "profile"])
@pytest.mark.parametrize("source", ["data", "text", "bytes"])
def test_fuzz_10000(kind, source):
    """2,500 examples per (kind, source)."""
    strategy = {"data": mutated_data(BASES[kind]), "text": mutated_text(dump_yaml(BASES[kind])),
                "bytes": mutated_bytes(dump_yaml(BASES[kind]))}[source]
    loader = {"data": load, "text": load_text, "bytes": load_bytes}[source]

    @fuzz_settings(2500)
    @given(doc=strategy)
    def run(doc):
        _check(kind, loader(kind, doc))

    run()


@pytest.fixture(scope="module")
def compiled_tiny(tmp_path_factory):
    """A compiled, compensated plan for a tiny olmoe (its data and sidecar), the model, and token ids."""
    import torch
    from tiny_models import build_tiny_model, tiny_tokenizer

    import allocplan
    from allocplan.bundled import DEFAULT_CALIBRATION
    from allocplan.formats.records import to_data

    calib = tmp_path_factory.mktemp("fuzz") / "calib.txt"
    calib.write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    model = build_tiny_model("olmoe")
    plan = allocplan.compile_plan(model, 0.5, tokenizer=tiny_tokenizer(), profile=allocplan.ProfileConfig(
        calib=str(calib), calib_tokens=256, seq_len=64, compensation="linear", stand_in_choice=False))
    ids = torch.randint(5, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    return to_data(plan), plan.compensation_data, model, ids


def test_fuzz_structured_plans_apply(compiled_tiny):
    """Plans built field by field within the bounds: at least 30% accepted, and every accepted one applies,
    runs within its budget and is removed exactly on the tiny model it was made for."""
    from fuzz_formats import apply_and_check, structured_plan_data

    base, sidecar, model, ids = compiled_tiny
    seen = {"accepted": 0, "refused": 0}

    @fuzz_settings(120)
    @given(data=structured_plan_data(base))
    def run(data):
        plan = load("plan", data)
        seen["accepted" if plan is not None else "refused"] += 1
        if plan is not None:
            plan_invariants(plan)
            apply_and_check(plan, model, ids, sidecar)

    run()
    assert seen["accepted"] >= 0.3 * sum(seen.values()), seen
