"""Profiling: prefix reuse equals the naive per-(layer, k) forward; calibration packing."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny_model, tiny_tokenizer

from allocplan.errors import AllocplanError
from allocplan import ProfileConfig
from allocplan.planner.losses import Scratch, kl_sum, next_token_logprobs
from allocplan.planner.profiling import layer_ks, measure_sensitivity
from allocplan.planner.windows import pack_windows


@pytest.fixture(scope="module")
def windows(calib_file):
    tensor, record = pack_windows(tiny_tokenizer(), calib_file, max_tokens=384, seq_len=48)
    assert tensor.shape == (8, 48) and record.tokens == 384 and record.windows == 8
    return tensor


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3", "qwen2_moe"])
@pytest.mark.parametrize("strategy", ["isolated", "paper"])
@pytest.mark.parametrize("metric", ["nll", "kl"])
def test_prefix_reuse_matches_naive(family, strategy, metric, windows):
    model = build_tiny_model(family)
    fast, ref_fast = measure_sensitivity(model, windows, ProfileConfig(strategy=strategy, metric=metric, batch_size=3))
    naive, ref_naive = measure_sensitivity(
        model, windows, ProfileConfig(strategy=strategy, metric=metric, batch_size=3), reuse_prefix=False
    )
    assert ref_fast == pytest.approx(ref_naive, abs=1e-6)
    for row_fast, row_naive in zip(fast, naive):
        assert row_fast.keys() == row_naive.keys()
        for k in row_fast:
            assert row_fast[k] == pytest.approx(row_naive[k], abs=1e-5)
    # The profile is not trivially zero: cutting k changes the loss somewhere.
    assert any(abs(v) > 1e-6 for row in fast for v in row.values())
    # The model is left as it was.
    assert [layer.mlp.gate.top_k for layer in model.model.layers if hasattr(layer.mlp, "gate")] == [4] * len(fast)


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_half_expert_grid_reuse_matches_naive(family, windows):
    model = build_tiny_model(family)
    fast, _ = measure_sensitivity(model, windows, ProfileConfig(k_step=0.5, batch_size=4))
    naive, _ = measure_sensitivity(model, windows, ProfileConfig(k_step=0.5, batch_size=4), reuse_prefix=False)
    assert list(fast[0]) == [1, 1.5, 2, 2.5, 3, 3.5, 4]
    for row_fast, row_naive in zip(fast, naive):
        assert row_fast == pytest.approx(row_naive, abs=1e-5)
    assert not hasattr(model, "_allocplan_handle")  # every probe plan was removed


def test_isolated_full_k_is_exactly_zero(windows):
    rows, _ = measure_sensitivity(build_tiny_model("mixtral"), windows, ProfileConfig(strategy="isolated"))
    assert all(row[4] == 0.0 for row in rows)


def test_kl_is_nonnegative(windows):
    rows, _ = measure_sensitivity(build_tiny_model("olmoe"), windows, ProfileConfig(metric="kl"))
    assert all(v >= -1e-7 for row in rows for v in row.values())


def test_scratch_reuses_its_memory_and_changes_no_value(windows):
    """Profiling probes write their log-probabilities and KL terms into a Scratch's buffers instead of
    new [B, S, V] tensors: the same memory every probe, and the fresh tensors' values bit for bit."""
    model = build_tiny_model("olmoe")
    scratch = Scratch()
    with torch.inference_mode():
        reference = next_token_logprobs(model, windows[:3])  # [3, 47, V], its own tensor
        probs = reference.exp()
        seen = None
        for batch in (windows[3:6], windows[5:8]):  # two probes of one shape
            fresh = next_token_logprobs(model, batch)
            written = next_token_logprobs(model, batch, scratch)
            assert torch.equal(written, fresh)
            assert kl_sum(reference, probs, written, scratch) == kl_sum(reference, probs, fresh)
            pointers = (written.data_ptr(), scratch.buffer("kl", written).data_ptr())
            assert seen in (None, pointers)  # the second probe reused the first one's memory
            seen = pointers
        # Another shape gets buffers of its own shape.
        short = next_token_logprobs(model, windows[:2], scratch)
        assert short.shape == (2, 47, reference.shape[-1])
        assert torch.equal(short, reference[:2])


def test_layer_ks_strategies():
    assert layer_ks("isolated", [4, 4, 4, 4], 1, 2, 1) == [4, 2, 4, 4]
    assert layer_ks("paper", [4, 4, 4, 4], 1, 2, 1) == [4, 2, 1, 1]
    assert layer_ks("paper", [6, 6, 6], 2, 3, 2) == [6, 6, 3]


def test_calibration_is_deterministic_and_checked(calib_file, tmp_path):
    tok = tiny_tokenizer()
    a, rec_a = pack_windows(tok, calib_file, max_tokens=1000, seq_len=100)
    b, rec_b = pack_windows(tok, calib_file, max_tokens=1000, seq_len=100)
    assert torch.equal(a, b) and rec_a == rec_b and rec_a.sha256.startswith("sha256:")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(AllocplanError, match="fewer than one --seq-len window"):
        pack_windows(tok, short, max_tokens=1000, seq_len=100)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(AllocplanError, match="not UTF-8"):
        pack_windows(tok, binary, max_tokens=1000, seq_len=100)


def test_k_min_bounds(windows):
    with pytest.raises(AllocplanError, match="--k-min 5 is above the smallest original top-k 4"):
        measure_sensitivity(build_tiny_model("olmoe"), windows, ProfileConfig(k_min=5))


@pytest.mark.parametrize("family, additive", [("olmoe", True), ("qwen2_moe", True), ("flex_olmo", False)])
def test_within_layer_reuse_checks_the_residual_form(family, additive, windows, monkeypatch):
    """Layer l at k is taken as kept output + block change only where that equals a real re-run.

    FlexOlmo normalises the block's output before adding it to the residual, so the
    shortcut does not hold there and every k re-runs the whole layer.
    """
    import allocplan.planner.profiling as profiling

    checks: list[bool] = []
    original = profiling.block_change_is_additive

    def spy(*args, **kwargs):
        checks.append(original(*args, **kwargs))
        return checks[-1]

    monkeypatch.setattr(profiling, "block_change_is_additive", spy)
    model = build_tiny_model(family)
    fast, _ = measure_sensitivity(model, windows, ProfileConfig(batch_size=4))
    naive, _ = measure_sensitivity(model, windows, ProfileConfig(batch_size=4), reuse_prefix=False)
    assert checks == [additive] * len(fast)  # checked once per layer, on the first batch
    for row_fast, row_naive in zip(fast, naive):
        assert row_fast == pytest.approx(row_naive, abs=1e-5)


def test_short_calibration_text_warns_with_the_tokens_it_gives(tmp_path):
    """Text for 2 windows of 64 under --calib-tokens 512 still profiles (the plan records 128 tokens) but warns."""
    from tiny_models import tiny_tokenizer

    from allocplan.planner.profiling import profile_model

    tokenizer = tiny_tokenizer()
    ids = list(range(5, 5 + 140))
    text = tmp_path / "short.txt"
    text.write_text(tokenizer.decode(ids))
    count = len(tokenizer(text.read_text(), add_special_tokens=False)["input_ids"])
    windows = count // 64
    assert 1 <= windows < 512 // 64
    with pytest.warns(UserWarning, match=f"gives {windows * 64} tokens \\({windows} windows of 64\\), fewer than"
                                         " --calib-tokens 512"):
        profile = profile_model(build_tiny_model("olmoe"), tokenizer,
                                ProfileConfig(calib=str(text), calib_tokens=512, seq_len=64, compensation="off"))
    assert profile.measurement.calibration.tokens == windows * 64


def test_compile_takes_calibration_windows_and_a_drop_weighting(calib_file):
    """Windows given to compile_model are profiled instead of packing the text again: the windows that packing
    gives reproduce its plan exactly, and other windows of the same text give other sensitivities. The stand-ins'
    fit takes its weighting from the block it runs in (cross-validation compares them without patching)."""
    from allocplan.planner.compile import compile_model
    from allocplan.planner.treatments import drop_weights, using_drop_weighting

    tokenizer, model = tiny_tokenizer(), build_tiny_model("olmoe")
    config = ProfileConfig(calib=str(calib_file), calib_tokens=256, seq_len=64)
    packed = pack_windows(tokenizer, calib_file, max_tokens=256, seq_len=64)
    plan, measured = compile_model(model, tokenizer, 0.5, profile=config)
    given_plan, given = compile_model(model, tokenizer, 0.5, profile=config, windows=packed)
    assert given_plan.to_yaml() == plan.to_yaml() and given.layers == measured.layers
    more, record = pack_windows(tokenizer, calib_file, max_tokens=512, seq_len=64)
    _, other = compile_model(model, tokenizer, 0.5, profile=config, windows=(more[4:], record))
    assert other.layers != measured.layers
    scores = torch.tensor([[0.1, 0.4, 0.3, 0.2]])  # ranks 3, 0, 1, 2 of K = 4
    assert drop_weights(scores).tolist() == [[1.5, 0.0, 0.5, 1.0]]  # 2 r / K
    with using_drop_weighting("uniform"):
        assert drop_weights(scores).tolist() == [[1.0, 1.0, 1.0, 1.0]]
        with using_drop_weighting("half"):
            assert drop_weights(scores).tolist() == [[1.0, 0.0, 0.0, 1.0]]  # ranks 2 and 3 of 4
        assert drop_weights(scores).tolist() == [[1.0, 1.0, 1.0, 1.0]]
    assert drop_weights(scores).tolist() == [[1.5, 0.0, 0.5, 1.0]]
    with pytest.raises(AllocplanError, match="drop weighting 'flat' is not one of ramp, uniform, half"):
        with using_drop_weighting("flat"):
            pass
