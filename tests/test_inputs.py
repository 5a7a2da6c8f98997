"""Inputs for real models: calibration from .jsonl and datasets, loader pass-through, the revision on record."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from tiny_models import tiny_tokenizer

import allocplan
from allocplan import AllocplanError, LoadConfig, ProfileConfig
from allocplan.formats.records import sha256_bytes
from allocplan.planner.texts import DOCUMENT_SEPARATOR, read_source
from allocplan.planner.windows import calibration_source, pack_windows

DOCUMENTS = ["The first document talks about rivers and the sea.", "A second one, about mountains.",
             "Third: numbers 1 2 3 and letters a b c."]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_jsonl_documents_are_joined_in_order_and_recorded(tmp_path):
    path = write_jsonl(tmp_path / "calib.jsonl", [{"id": i, "body": text} for i, text in enumerate(DOCUMENTS)])
    source = read_source(path, text_field="body")
    assert source.text == "\n\n".join(DOCUMENTS) and DOCUMENT_SEPARATOR == "\n\n"
    assert (source.source, source.name, source.text_field) == ("jsonl", "calib.jsonl", "body")
    windows, record = pack_windows(tiny_tokenizer(), source, max_tokens=40, seq_len=8)
    expected = tiny_tokenizer()("\n\n".join(DOCUMENTS), add_special_tokens=False)["input_ids"]
    assert windows.flatten().tolist() == expected[: windows.numel()]
    assert (record.source, record.name, record.text_field) == ("jsonl", "calib.jsonl", "body")
    assert record.sha256 == sha256_bytes("\n\n".join(DOCUMENTS).encode())


@pytest.mark.parametrize("lines, message", [
    (['{"text": "a"}', "not json"], "line 2 is not JSON"),
    (['["a list"]'], "line 1 is not a JSON object"),
    (['{"body": "a"}'], "has no field 'text' (fields: body); name the text field with --text-field"),
    (['{"text": 3}'], "field 'text' holds int, not text"),
    (["", "  "], "holds no JSON lines"),
])
def test_bad_jsonl_is_refused_naming_the_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(AllocplanError, match="calibration file .*bad.jsonl") as info:
        read_source(path)
    assert message in str(info.value)


def test_a_dataset_from_a_local_directory_is_read_in_order_up_to_what_is_needed(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"content": text} for text in DOCUMENTS * 40])
    spec = f"{folder}:train"
    source = read_source(dataset=spec, text_field="content", max_tokens=2)  # 64 characters wanted: 2 documents
    assert source.text == "\n\n".join(DOCUMENTS[:2])
    assert (source.source, source.name, source.text_field) == ("dataset", spec, "content")
    whole = read_source(dataset=spec, text_field="content", max_tokens=10_000)
    assert whole.text == "\n\n".join(DOCUMENTS * 40)
    with pytest.raises(AllocplanError, match="has no field 'text' \\(fields: content\\)"):
        read_source(dataset=spec, max_tokens=10)
    with pytest.raises(AllocplanError, match="cannot load dataset"):
        read_source(dataset=f"{folder}:test", text_field="content", max_tokens=10)


def test_an_uncached_hub_dataset_offline_is_one_line_at_once(monkeypatch):
    # datasets alone retries an unreachable hub for about 25 s, logging every try.
    datasets = pytest.importorskip("datasets")
    import huggingface_hub

    import allocplan.loading as loading

    monkeypatch.setattr(loading, "hub_reachable", lambda: False)
    before = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    started = time.monotonic()
    with pytest.raises(AllocplanError, match="'nobody/no-such-dataset:train' is not in the local datasets cache and"
                                             " the hub cannot be reached"):
        read_source(dataset="nobody/no-such-dataset:train", max_tokens=10)
    assert time.monotonic() - started < 10
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == before  # restored


def test_without_datasets_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(AllocplanError, match=r"pip install 'allocplan\[datasets\]'"):
        read_source(dataset="wikitext:wikitext-2-raw-v1:train", max_tokens=10)


@pytest.mark.parametrize("settings, message", [
    ({"calib": "a.txt", "calib_dataset": "wikitext:train"}, "both name calibration text"),
    ({"calib_dataset": "wikitext"}, "must be NAME:SPLIT or NAME:CONFIG:SPLIT"),
    ({"calib_dataset": "a::train"}, "must be NAME:SPLIT or NAME:CONFIG:SPLIT"),
    ({"text_field": ""}, "--text-field must be"),
])
def test_calibration_settings_are_checked(settings, message):
    with pytest.raises(AllocplanError, match=message):
        ProfileConfig(**settings)


def test_profile_records_its_jsonl_calibration(tmp_path, calib_file):
    from tiny_models import build_tiny_model

    text = calib_file.read_text(encoding="utf-8")
    path = write_jsonl(tmp_path / "calib.jsonl", [{"text": part} for part in (text[:9000], text[9000:])])
    config = ProfileConfig(calib=str(path), calib_tokens=256, seq_len=64, weight_fit="off", compensation="off")
    assert calibration_source(config, 256).text == text[:9000] + "\n\n" + text[9000:]
    profile = allocplan.profile_model(build_tiny_model("olmoe"), tiny_tokenizer(), config)
    calibration = profile.measurement.calibration
    assert (calibration.source, calibration.name, calibration.text_field) == ("jsonl", "calib.jsonl", "text")
    assert calibration.sha256 == sha256_bytes((text[:9000] + "\n\n" + text[9000:]).encode())


def test_load_config_passes_through_to_from_pretrained(checkpoints):
    load = LoadConfig(dtype="auto", attn_implementation="eager", revision="v1", device_map="cpu")
    assert load.from_pretrained_kwargs() == {"dtype": "auto", "trust_remote_code": False, "use_safetensors": True,
                                             "device_map": "cpu", "revision": "v1", "attn_implementation": "eager"}
    assert LoadConfig().from_pretrained_kwargs() == {"dtype": "auto", "trust_remote_code": False,
                                                     "use_safetensors": True}
    assert LoadConfig(pickle_weights=True).from_pretrained_kwargs() == {"dtype": "auto", "trust_remote_code": False}
    model, _ = allocplan.load_model(str(checkpoints("olmoe")), LoadConfig(dtype="bfloat16", attn_implementation="eager"))
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    with pytest.raises(AllocplanError, match="cannot load model .*attn_implementation"):
        allocplan.load_model(str(checkpoints("olmoe")), LoadConfig(attn_implementation="no-such-kernel"))
    with pytest.raises(AllocplanError, match="must be one word"):
        LoadConfig(revision="two words")


def test_device_map_loads_and_a_plan_applies(checkpoints):
    pytest.importorskip("accelerate")
    from tiny_models import plan_for

    model, _ = allocplan.load_model(str(checkpoints("olmoe")), LoadConfig(device_map="cpu"))
    ids = torch.randint(1, 90, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        handle = allocplan.apply_plan(model, plan_for(model, 1))
        reduced = model(input_ids=ids).logits
        handle.remove()
        after = model(input_ids=ids).logits
    assert torch.equal(before, after) and not torch.equal(before, reduced)


def _fake_hub_cache(root, checkpoint, repo="tiny-org/tiny-olmoe", commit="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face hub cache holding ``checkpoint`` as ``repo`` at ``commit`` (refs/main points at it)."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for item in checkpoint.iterdir():
        (snapshot / item.name).write_bytes(item.read_bytes())
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return repo, commit


def test_a_hub_id_from_the_cache_records_its_commit_and_validate_warns_on_another(tmp_path, checkpoints, calib_file):
    """Loaded by hub id from the cache (offline), the plan records the snapshot's commit; once the
    cache's main moves to another commit, ``validate --model`` says so in one warning line."""
    import os

    from allocplan.formats.plan import load_plan

    cache = tmp_path / "hub"
    repo, commit = _fake_hub_cache(cache, checkpoints("olmoe"))
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    plan_path = tmp_path / "plan.yaml"
    script = f"""
import allocplan
from allocplan import ProfileConfig, RefineConfig
plan = allocplan.compile_plan({repo!r}, 0.5, profile=ProfileConfig(calib={str(calib_file)!r}, calib_tokens=128,
    seq_len=64, weight_fit="off", compensation="off"), refine=RefineConfig(refine=False))
allocplan.save_plan(plan, {str(plan_path)!r})
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    plan = load_plan(plan_path)
    assert (plan.model.name, plan.model.revision) == (repo, commit)

    validate = [sys.executable, "-m", "allocplan.cli", "validate", str(plan_path), "--model", repo]
    same = subprocess.run(validate, capture_output=True, text=True, env=env, timeout=300)
    assert same.returncode == 0 and "warning" not in same.stderr, same.stderr
    newer = "f" * 40
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "snapshots" / commit).rename(repo_dir / "snapshots" / newer)
    (repo_dir / "refs" / "main").write_text(newer)
    moved = subprocess.run(validate, capture_output=True, text=True, env=env, timeout=300)
    assert moved.returncode == 0, moved.stderr
    warning = [line for line in moved.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and warning[0].startswith("allocplan: warning: the plan was compiled on revision"), moved.stderr
    assert commit in warning[0] and newer in warning[0]


@pytest.mark.parametrize("offline_flag", [True, False])
def test_an_unreachable_hub_id_fails_fast_in_one_line(tmp_path, offline_flag):
    """Offline by HF_HUB_OFFLINE, or simply without a network (as on CI): exit 2, one line, in seconds
    (transformers alone retries for about half a minute)."""
    import os
    import time

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path)}
    env.pop("HF_HUB_OFFLINE", None)
    if offline_flag:
        env["HF_HUB_OFFLINE"] = "1"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "allocplan.cli", "compile", "--model", "no-org/no-model",
                           "--budget", "0.5", "-o", str(tmp_path / "p.yaml")], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and time.monotonic() - start < 25, done.stderr
    assert done.stderr.count("\n") == 1 and "'no-org/no-model'" in done.stderr, done.stderr
    assert not (tmp_path / "p.yaml").exists()


def test_windows_longer_than_the_models_positions_are_refused_before_any_work(calib_file):
    """Tiny models have 128 positions: 128-token windows are scored, 129 are refused in one line naming
    both lengths; eval checks the same."""
    from tiny_models import build_tiny_model

    from allocplan.evaluation.metrics import evaluate
    from allocplan.planner.windows import check_window_length

    model = build_tiny_model("qwen3_moe")
    assert model.config.max_position_embeddings == 128
    check_window_length(torch.zeros(2, 128, dtype=torch.long), model)
    with pytest.raises(AllocplanError, match=r"^--seq-len 129 is longer than the model's max_position_embeddings"
                                             r" 128; use --seq-len 128 or less$"):
        check_window_length(torch.zeros(2, 129, dtype=torch.long), model)
    with pytest.raises(AllocplanError, match="--seq-len 200 is longer"):
        evaluate(model, tiny_tokenizer(), data=calib_file, seq_len=200, max_tokens=400)
    with pytest.raises(AllocplanError, match="--seq-len 256 is longer"):
        allocplan.profile_model(model, tiny_tokenizer(), ProfileConfig(calib=str(calib_file), calib_tokens=512))


def test_pickle_weights_load_only_when_asked(tmp_path, checkpoints):
    """A checkpoint whose weights are only pytorch_model.bin (pickle) is refused in one line by default, since
    transformers would unpickle it; with pickle_weights it loads, through torch's weights-only unpickler, the same
    model as from safetensors."""
    import shutil

    from safetensors.torch import load_file

    source = checkpoints("olmoe")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for item in source.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, pickled / item.name)
    torch.save(load_file(source / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(AllocplanError, match=r"has no safetensors weights.*pass --pickle-weights"):
        allocplan.load_model(str(pickled))
    model, _ = allocplan.load_model(str(pickled), LoadConfig(pickle_weights=True))
    reference, _ = allocplan.load_model(str(source))
    ids = torch.tensor([[5, 17, 42, 8]])
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    # allocplan.from_pretrained (for code that loads exported checkpoints) keeps the same rule.
    with pytest.raises(OSError, match="model.safetensors"):
        allocplan.from_pretrained(pickled)
    assert allocplan.from_pretrained(pickled, use_safetensors=False) is not None
