"""A plan's way into serving: export, from_pretrained, the save warning, and batch-invariant routing."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from tiny_models import build_tiny_model, plan_for, plan_of

import allocplan
from allocplan.runtime.layers import find_moe_layers

IDS = torch.randint(1, 90, (2, 10), generator=torch.Generator().manual_seed(3))


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("family, make, form, keys", [
    ("olmoe", lambda m: plan_for(m, 2), "uniform", ["num_experts_per_tok"]),
    ("hunyuan_v1_moe", lambda m: plan_for(m, [2, 1, 3, 1]), "per-layer", ["moe_topk"]),
    ("olmoe", lambda m: plan_for(m, [3, 2, 1.5, 1.5], token_level=True, scope="sequence"), "plan", []),
])
def test_export_then_from_pretrained_equals_apply(family, make, form, keys, checkpoints, tmp_path):
    checkpoint = checkpoints(family)
    model, _ = allocplan.load_model(str(checkpoint))
    allocation = make(model)
    plan = plan_of(allocation)
    result = allocplan.export_plan(plan, str(checkpoint), tmp_path / "exported")
    assert (result["form"], result["config_keys"]) == (form, keys)
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["allocplan"]["form"] == form and (tmp_path / "exported" / "allocplan-plan.yaml").is_file()
    if form == "uniform":
        assert config["num_experts_per_tok"] == 2  # what vLLM reads
    if form == "per-layer":
        assert config["moe_topk"] == [2, 1, 3, 1]
    with allocplan.apply_plan(model, plan):
        expected = logits(model)
    loaded = allocplan.from_pretrained(tmp_path / "exported")
    assert torch.equal(logits(loaded), expected)
    assert (allocplan.plan_handle(loaded) is not None) == (form == "plan")


def test_an_exported_config_names_its_plan_only_inside_the_checkpoint(checkpoints, tmp_path):
    """config.json's allocplan.plan is a file name inside the checkpoint: a path out of it is refused even
    when the file it reaches has the recorded sha256, a missing file is named, a changed one refused."""
    model, _ = allocplan.load_model(str(checkpoints("olmoe")))
    plan = plan_of(plan_for(model, [3, 2, 1.5, 1.5], token_level=True))
    exported = tmp_path / "exported"
    allocplan.export_plan(plan, str(checkpoints("olmoe")), exported)
    (tmp_path / "outside.yaml").write_bytes((exported / "allocplan-plan.yaml").read_bytes())  # same sha256
    config_path = exported / "config.json"
    config = json.loads(config_path.read_text())

    def load_naming(name):
        config["allocplan"]["plan"] = name
        config_path.write_text(json.dumps(config))
        return allocplan.from_pretrained(exported)

    for name in ("../outside.yaml", str(tmp_path / "outside.yaml"), "plan.txt"):
        with pytest.raises(allocplan.AllocplanError, match="must be a plain \\*.yaml file name inside the checkpoint"):
            load_naming(name)
    with pytest.raises(allocplan.AllocplanError, match="names 'other.yaml' in config.json, but the checkpoint has no"):
        load_naming("other.yaml")
    (exported / "other.yaml").write_text((exported / "allocplan-plan.yaml").read_text() + "# changed\n")
    with pytest.raises(allocplan.AllocplanError, match="does not match the sha256"):
        load_naming("other.yaml")
    assert allocplan.plan_handle(load_naming("allocplan-plan.yaml")) is not None


def test_export_refuses_a_plan_for_another_model_and_a_used_directory(checkpoints, tmp_path):
    model, _ = allocplan.load_model(str(checkpoints("olmoe")))
    plan = plan_of(plan_for(model, 2))
    with pytest.raises(allocplan.AllocplanError, match="fingerprint"):
        allocplan.export_plan(plan, str(checkpoints("mixtral")), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("x")
    with pytest.raises(allocplan.AllocplanError, match="is not empty"):
        allocplan.export_plan(plan, str(checkpoints("olmoe")), tmp_path / "b")


def test_save_pretrained_warns_while_a_plan_is_applied(tmp_path):
    model = build_tiny_model("olmoe")
    with allocplan.apply_plan(model, plan_for(model, 2)):
        with pytest.warns(UserWarning, match="use `allocplan export"):
            model.save_pretrained(tmp_path / "a")
    assert "save_pretrained" not in model.__dict__  # the instance is as it was
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "b")


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3", "qwen2_moe"])
def test_sequence_scope_is_batch_invariant(family):
    """A prompt routes the same alone, among other prompts, and left-padded in a batch: the same experts for
    every token in every layer. Its logits then differ only as the untouched model's own do between those
    cases (PyTorch's CPU kernels are not batch-invariant: about 1e-6); under the batch scope they differ more."""
    from tiny_models import PairRecorder

    model = build_tiny_model(family)
    ks = [min(2.5, layer.top_k) for layer in find_moe_layers(model)]
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, 100, (1, 10), generator=generator)
    padded = torch.zeros(3, 14, dtype=torch.long)
    mask = torch.zeros(3, 14, dtype=torch.long)
    padded[0, 4:], mask[0, 4:] = prompt[0], 1
    padded[1:] = torch.randint(1, 100, (2, 14), generator=generator)
    mask[1:] = 1

    def run(scope: str | None):
        """(prompt's logits alone, in the padded batch, experts per layer alone, in the batch)."""
        handle = allocplan.apply_plan(model, plan_for(model, ks, token_level=True, scope=scope)) if scope else None
        recorder = PairRecorder(model)
        try:
            with torch.inference_mode():
                alone = model(input_ids=prompt).logits[0]
                together = model(input_ids=padded, attention_mask=mask).logits[0, 4:]
        finally:
            recorder.remove()
            if handle is not None:
                handle.remove()
        experts = [{path: seen[i].sort(-1).values for path, seen in recorder.seen.items()} for i in (0, 1)]
        batch_rows = {path: index.view(3, 14, -1)[0, 4:] for path, index in experts[1].items()}
        return alone, together, experts[0], batch_rows

    alone, together, routed_alone, routed_together = run("sequence")
    for path in routed_alone:
        assert torch.equal(routed_alone[path], routed_together[path]), path
    untouched_alone, untouched_together, _, _ = run(None)
    model_noise = (untouched_alone - untouched_together).abs().max().item()
    assert (alone - together).abs().max().item() <= 4 * model_noise + 1e-6
    batch_alone, batch_together, _, _ = run("batch")
    assert (batch_alone - batch_together).abs().max().item() > 100 * (model_noise + 1e-6)



@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3", "qwen3_moe"])
def test_sequence_scope_gives_bit_identical_logits_whatever_the_batch_mates(family):
    """The same left-padded prompt in two batches of the same shape with different batch-mates, through the
    prefill and KV-cached decode steps, where the ledger carries each row's budget. Under the sequence scope
    the prompt's experts are the same at every step, and its logits are bit-identical wherever the untouched
    model's are (the prefill here: same kernels, same shapes). Where the untouched model's grouped expert
    matmuls already differ in the last bits (decode), the plan adds nothing to that. Under the batch scope the
    experts and the logits change with the batch-mates."""
    from tiny_models import PairRecorder

    model = build_tiny_model(family)
    ks = [min(2.5, layer.top_k) for layer in find_moe_layers(model)]
    generator = torch.Generator().manual_seed(5)
    prompt = torch.randint(1, 100, (10,), generator=generator)
    follow = torch.randint(1, 100, (4,), generator=generator)  # the prompt's decode tokens, teacher-forced

    def batch():
        ids = torch.randint(1, 100, (3, 14), generator=generator)
        mask = torch.ones(3, 14, dtype=torch.long)
        ids[0, :4], mask[0, :4] = 0, 0
        ids[0, 4:] = prompt
        return ids, mask, torch.randint(1, 100, (3, len(follow)), generator=generator)

    def run(scope, ids, mask, mates):
        """Per step (the prefill, then each decode step): the prompt's logits and its experts per layer."""
        handle = allocplan.apply_plan(model, plan_for(model, ks, token_level=True, scope=scope)) if scope else None
        recorder = PairRecorder(model)
        steps = []
        try:
            with torch.inference_mode():
                out = model(input_ids=ids, attention_mask=mask, use_cache=True)
                steps.append(out.logits[0, 4:])
                for i in range(len(follow)):
                    step = mates[:, i : i + 1].clone()
                    step[0, 0] = follow[i]
                    mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
                    out = model(input_ids=step, attention_mask=mask, cache=out.cache)
                    steps.append(out.logits[0])
        finally:
            recorder.remove()
            if handle is not None:
                handle.remove()
        rows = [(slice(4, None) if i == 0 else slice(None)) for i in range(len(steps))]
        experts = [
            {path: seen[i].view(3, -1, seen[i].shape[-1])[0, rows[i]].sort(-1).values for path, seen in recorder.seen.items()}
            for i in range(len(steps))
        ]
        return steps, experts

    first, second = batch(), batch()
    untouched = [run(None, *data)[0] for data in (first, second)]
    assert torch.equal(untouched[0][0], untouched[1][0])  # the premise for the prefill
    (logits_a, experts_a), (logits_b, experts_b) = run("sequence", *first), run("sequence", *second)
    for step, (a, b, base_a, base_b) in enumerate(zip(logits_a, logits_b, *untouched)):
        assert experts_a[step].keys() == experts_b[step].keys()
        for path in experts_a[step]:
            assert torch.equal(experts_a[step][path], experts_b[step][path]), (step, path)
        if torch.equal(base_a, base_b):
            assert torch.equal(a, b), step
        else:
            assert (a - b).abs().max() <= 4 * (base_a - base_b).abs().max() + 1e-6, step
    (logits_a, experts_a), (logits_b, experts_b) = run("batch", *first), run("batch", *second)
    assert any(
        not torch.equal(experts_a[step][path], experts_b[step][path]) for step in range(len(experts_a)) for path in experts_a[step]
    )
    assert not torch.equal(logits_a[0], logits_b[0])
