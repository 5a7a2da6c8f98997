"""The bad-input matrix: hostile or broken inputs, each refused with one line, exit 2, no file left.

Shared by tests/test_bad_inputs.py (which asserts every case) and
scripts/make_reliability.py (which writes docs/reliability.md from the same run).
A case is a command line run by a real ``allocplan`` subprocess inside a
workspace of valid fixtures, and the fragment its one-line error must contain.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Case:
    """One bad input: its group, what it is, how to build it in a workspace, what the error must say."""

    group: str
    name: str
    build: Callable[["Workspace"], list[str]]  # returns the command's arguments (after ``allocplan``)
    fragment: str


class Workspace:
    """A directory with a tiny checkpoint, calibration text, a profile, plans (one with a sidecar) and a recipe."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        return self.root / name

    def write(self, name: str, content: str | bytes) -> str:
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
        return str(target)

    def plan_text(self) -> str:
        return (self.root / "plan.yaml").read_text()

    def profile_text(self) -> str:
        return (self.root / "profile.yaml").read_text()

    def plan_with(self, name: str, old: str, new: str) -> str:
        text = self.plan_text()
        assert old in text, (old, name)
        return self.write(name, text.replace(old, new, 1))

    def profile_with(self, name: str, old: str, new: str) -> str:
        text = self.profile_text()
        assert old in text, (old, name)
        return self.write(name, text.replace(old, new, 1))


def build_workspace(root: Path) -> Workspace:
    """Tiny olmoe checkpoint, calibration text, profile, plain plan, plan with a sidecar, recipe."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_models import save_tiny_checkpoint, tiny_tokenizer

    import allocplan
    from allocplan.bundled import DEFAULT_CALIBRATION

    work = Workspace(root)
    save_tiny_checkpoint("olmoe", root / "ckpt")
    save_tiny_checkpoint("mixtral", root / "other")
    work.write("calib.txt", DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:20000])
    small = dict(calib=str(root / "calib.txt"), calib_tokens=256, seq_len=64)
    plan = allocplan.compile_plan(str(root / "ckpt"), 0.5, profile=allocplan.ProfileConfig(
        **small, weight_fit="off", compensation="off"), refine=allocplan.RefineConfig(refine=False),
        profile_out=root / "profile.yaml")
    allocplan.save_plan(plan, root / "plan.yaml")
    (root / "with-sidecar").mkdir()
    compensated = allocplan.compile_plan(str(root / "ckpt"), 0.5, profile=allocplan.ProfileConfig(
        **small, compensation="expert", stand_in_choice=False), refine=allocplan.RefineConfig(refine=False))
    allocplan.save_plan(compensated, root / "with-sidecar" / "plan.yaml")
    allocplan.save_recipe(allocplan.Recipe(budget=allocplan.BudgetRequest(ratio=0.5)), root / "recipe.yaml")
    # A checkpoint whose tokenizer gives ids past the model's embedding (vocab 64 < the tokenizer's 101 ids).
    from transformers import AutoModelForCausalLM, OlmoeConfig

    small_vocab = AutoModelForCausalLM.from_config(OlmoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=4, pad_token_id=0, eos_token_id=0,
        bos_token_id=None))
    small_vocab.save_pretrained(root / "small-vocab")
    tiny_tokenizer().save_pretrained(root / "small-vocab")
    # A checkpoint that loads but cannot run: a rotary head size of 9 (odd) fails in transformers' own forward.
    from transformers import MixtralConfig

    odd_heads = AutoModelForCausalLM.from_config(MixtralConfig(
        vocab_size=128, hidden_size=36, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2))
    odd_heads.save_pretrained(root / "odd-heads")
    tiny_tokenizer().save_pretrained(root / "odd-heads")
    return work


def _nested(depth: int) -> str:
    return "schema_version: " + "[" * depth + "]" * depth + "\n"


def _bomb() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


ROUTING_OPTS = ["--calib-tokens", "256", "--seq-len", "64"]


def _compile(w: Workspace, *extra: str, model: str | None = None, calib: str | None = None) -> list[str]:
    return ["compile", "--model", model or str(w.path("ckpt")), "--calib", calib or str(w.path("calib.txt")),
            *ROUTING_OPTS, *extra]


CASES: list[Case] = [
    # --- YAML that defeats a loader -----------------------------------------------------------------
    Case("yaml", "alias bomb (billion laughs)", lambda w: ["validate", w.write("bomb.yaml", _bomb())], "anchors"),
    Case("yaml", "anchor and alias", lambda w: ["validate", w.write("alias.yaml", "a: &x 1\nb: *x\n")], "anchors"),
    Case("yaml", "3000 nested brackets", lambda w: ["validate", w.write("deep.yaml", _nested(3000))], "nesting"),
    Case("yaml", "integer of 5000 digits", lambda w: ["validate", w.plan_with("long.yaml", "index: 0",
                                                                             "index: " + "9" * 5000)], "5000 characters"),
    Case("yaml", "number of 400 digits", lambda w: ["validate", w.plan_with("400.yaml", "index: 0",
                                                                           "index: " + "9" * 400)], "400 characters"),
    Case("yaml", "float beyond float64", lambda w: ["validate", w.plan_with("inf.yaml", "dp_objective:",
                                                                           "dp_objective: 1.0e999 #")], "finite"),
    Case("yaml", "duplicate key", lambda w: ["validate", w.plan_with("dup.yaml", "kind: allocplan-plan",
                                                                     "kind: allocplan-plan\nkind: allocplan-plan")],
         "duplicate key 'kind'"),
    Case("yaml", "yes as a boolean", lambda w: ["validate", w.plan_with("yes.yaml", "enabled: true", "enabled: yes")],
         "expected true or false, got the string 'yes'"),
    Case("yaml", "on as a boolean", lambda w: ["validate", w.plan_with("on.yaml", "enabled: true", "enabled: on")],
         "expected true or false, got the string 'on'"),
    Case("yaml", "octal integer", lambda w: ["validate", w.plan_with("octal.yaml", "k_base: 1", "k_base: 0o1")],
         "expected an integer, got the string '0o1'"),
    Case("yaml", "sexagesimal integer", lambda w: ["validate", w.plan_with("sexa.yaml", "k_base: 1", "k_base: 0:1")],
         "expected an integer, got the string '0:1'"),
    Case("yaml", ".nan for a number", lambda w: ["validate", w.plan_with("nan.yaml", "dp_objective:",
                                                                        "dp_objective: .nan #")],
         "expected a number, got the string '.nan'"),
    Case("yaml", "python object tag", lambda w: ["validate", w.write("tag.yaml", "!!python/object/apply:os.system"
                                                                                 " ['true']\n")], "tags such as"),
    Case("yaml", "explicit str tag", lambda w: ["validate", w.plan_with("strtag.yaml", "kind: allocplan-plan",
                                                                        "kind: !!str allocplan-plan")], "tags such as"),
    Case("yaml", "custom tag", lambda w: ["validate", w.plan_with("custom.yaml", "kind: allocplan-plan",
                                                                  "kind: !plan allocplan-plan")], "tags such as"),
    Case("yaml", "file over the size cap", lambda w: ["validate", w.write("huge.yaml", "# " + "x" * (17 << 20))],
         "over 16 MiB"),
    Case("yaml", "not UTF-8", lambda w: ["validate", w.write("binary.yaml", b"\xff\xfe\x00plan")], "not UTF-8"),
    Case("yaml", "NUL byte in a plan", lambda w: ["validate", w.plan_with("nul.yaml", "kind: allocplan-plan",
                                                                          "kind: allocplan\x00-plan")],
         "character U+0000 is not allowed"),
    Case("yaml", "control character U+0014 in a plan", lambda w: ["validate", w.plan_with(
        "ctrl.yaml", "renormalize: model", "renormalize: mo\x14del")], "character U+0014 is not allowed"),
    Case("yaml", "control character in a profile", lambda w: ["solve", w.profile_with(
        "ctrl-profile.yaml", "metric: ", "metric: \x07"), "--budget", "0.5", "-o", str(w.path("out-ctrl.yaml"))],
         "character U+0007 is not allowed"),
    Case("yaml", "byte-order mark inside a plan", lambda w: ["validate", w.plan_with(
        "bom.yaml", "token_level:", "\ufefftoken_level:")], "unknown key"),
    Case("yaml", "plan cut inside a UTF-8 character", lambda w: ["validate", w.write(
        "cut.yaml", w.plan_text().encode() + "# €".encode()[:-1])], "not UTF-8 text (byte"),
    Case("yaml", "empty file", lambda w: ["validate", w.write("empty.yaml", "")], "expected a mapping"),
    Case("yaml", "a list, not a plan", lambda w: ["validate", w.write("list.yaml", "- 1\n- 2\n")], "expected a mapping"),
    Case("yaml", "unbounded value in a message", lambda w: ["validate", w.plan_with(
        "bigstr.yaml", "renormalize: model", "renormalize: " + "z" * 100000)], "a string of 100000 characters"),
    # --- plans whose metadata contradicts itself ----------------------------------------------------------
    Case("plan", "objectives_agree with different objectives", lambda w: ["validate", w.plan_with(
        "agree.yaml", "ilp_objective:", "ilp_objective: 123.0 #")], "objectives_agree: is true but"),
    Case("plan", "calibration tokens != windows x seq_len", lambda w: ["validate", w.plan_with(
        "tokens.yaml", "tokens: 256", "tokens: 300")], "must equal windows"),
    Case("plan", "negative num_experts", lambda w: ["validate", w.plan_with(
        "experts.yaml", "num_experts: 8", "num_experts: -3")], ".yaml'.model.num_experts: -3 is outside"),
    Case("plan", "unknown metric", lambda w: ["validate", w.plan_with("metric.yaml", "metric: kl", "metric: banana")],
         "'banana' is not one of"),
    Case("plan", "malformed fingerprint", lambda w: ["validate", w.plan_with(
        "fp.yaml", "fingerprint: sha256:", "fingerprint: md5:")], "fingerprint: must be sha256"),
    Case("plan", "layer path that is not the model's", lambda w: ["validate", w.plan_with(
        "path.yaml", "path: model.layers.0.mlp", "path: model.layers.0.attn"), "--model", str(w.path("ckpt"))],
         "entry 0 is model.layers.0.attn in the plan but model.layers.0.mlp in the model"),
    Case("plan", "plan for another model", lambda w: ["validate", str(w.path("plan.yaml")), "--model",
                                                       str(w.path("other"))], "fingerprint"),
    Case("plan", "sidecar path escaping the directory", lambda w: ["validate", w.write(
        "with-sidecar/escape.yaml", (w.path("with-sidecar/plan.yaml")).read_text().replace(
            "file: compensation-", "file: ../compensation-", 1))], "plain *.safetensors file name"),
    # --- profiles that break solvers ----------------------------------------------------------------------
    Case("profile", "sensitivity 1e20", lambda w: ["solve", w.profile_with("p1.yaml", "1: ", "1: 1.0e+20 #"),
                                                   "--budget", "0.5", "-o", str(w.path("out1.yaml"))],
         "outside [-1000, 1000]"),
    Case("profile", "original_k of a billion", lambda w: ["solve", w.profile_with(
        "p2.yaml", "original_k: 4", "original_k: 1000000000"), "--budget", "0.5", "-o", str(w.path("out2.yaml"))],
         "original_k: 1000000000 is outside"),
    Case("profile", "missing k in a row", lambda w: ["solve", w.profile_with("p3.yaml", "    2: ", "    7: "),
                                                     "--budget", "0.5", "-o", str(w.path("out3.yaml"))],
         "keys must be exactly"),
    Case("profile", "unknown metric", lambda w: ["solve", w.profile_with("p4.yaml", "metric: kl", "metric: ppl"),
                                                 "--budget", "0.5", "-o", str(w.path("out4.yaml"))], "metric"),
    Case("profile", "future schema version", lambda w: ["solve", w.profile_with(
        "p5.yaml", "schema_version: 3", "schema_version: 9"), "--budget", "0.5", "-o", str(w.path("out5.yaml"))],
         "schema_version 9 is not supported"),
    # --- output paths ------------------------------------------------------------------------------------
    Case("output", "output equals the input profile", lambda w: ["solve", str(w.path("profile.yaml")), "--budget",
                                                                 "0.5", "-o", str(w.path("profile.yaml"))],
         "is also the input PROFILE"),
    Case("output", "-o equals --profile-out", lambda w: _compile(w, "--budget", "0.5", "-o", str(w.path("same.yaml")),
                                                                 "--profile-out", str(w.path("same.yaml"))),
         "name the same file"),
    Case("output", "plan directory missing", lambda w: _compile(w, "--budget", "0.5", "-o",
                                                                str(w.path("missing-dir/plan.yaml"))),
         "does not exist"),
    Case("output", "profile directory missing", lambda w: _compile(w, "--budget", "0.5", "-o", str(w.path("p.yaml")),
                                                                   "--profile-out", str(w.path("nowhere/p.yaml"))),
         "does not exist"),
    Case("output", "output is a directory", lambda w: ["solve", str(w.path("profile.yaml")), "--budget", "0.5", "-o",
                                                       str(w.path("ckpt"))], "directory"),
    Case("output", "unwritable location", lambda w: ["solve", str(w.path("profile.yaml")), "--budget", "0.5", "-o",
                                                     "/proc/allocplan-plan.yaml"], "cannot write"),
    Case("output", "two outputs on stdout", lambda w: _compile(w, "--budget", "0.5", "-o", "-", "--profile-out", "-"),
         "both write to standard output"),
    # --- other inputs ------------------------------------------------------------------------------------
    Case("input", "--reference-k above every layer's top-k", lambda w: [
        "solve", str(w.path("profile.yaml")), "--budget", "0.5", "--renormalize", "decoupled", "--reference-k", "99",
        "-o", str(w.path("rk.yaml"))], "--reference-k 99 is above the smallest original top-k"),
    Case("input", "--exact-decode in prefill mode", lambda w: [
        "eval", "--model", str(w.path("ckpt")), "--plan", str(w.path("plan.yaml")), "--data", str(w.path("calib.txt")),
        "--exact-decode"], "--exact-decode applies to the decode modes only"),
    Case("input", "eval --profile with a plan", lambda w: [
        "eval", "--model", str(w.path("ckpt")), "--plan", str(w.path("plan.yaml")), "--data", str(w.path("calib.txt")),
        "--profile", str(w.path("profile.yaml"))], "a plan reads no --profile"),
    Case("input", "eval --budget with --method full", lambda w: [
        "eval", "--model", str(w.path("ckpt")), "--method", "full", "--budget", "0.5", "--data",
        str(w.path("calib.txt"))], "--method full takes no --budget"),
    Case("input", "eval --calib for a method that calibrates nothing", lambda w: [
        "eval", "--model", str(w.path("ckpt")), "--method", "uniform", "--budget", "0.5", "--data",
        str(w.path("calib.txt")), "--calib", str(w.path("calib.txt"))], "--method uniform reads no --calib"),
    Case("input", "bench --budget with a plan", lambda w: [
        "bench", "--plan", str(w.path("plan.yaml")), "--model", str(w.path("ckpt")), "--budget", "0.3"],
         "--budget sets the uniform plan a --config preset is timed with"),
    Case("input", "bench --model with a preset", lambda w: ["bench", "--config", "mixtral-small", "--model",
                                                             str(w.path("ckpt"))], "--config builds its own"),
    Case("input", "validate --revision without --model", lambda w: [
        "validate", str(w.path("plan.yaml")), "--revision", "main"], "--revision says how to load --model"),
    Case("input", "eval --seed for a method that draws nothing at random", lambda w: [
        "eval", "--model", str(w.path("ckpt")), "--method", "uniform", "--budget", "0.5", "--data",
        str(w.path("calib.txt")), "--seed", "3"], "--method uniform draws nothing at random"),
    Case("input", "apply --max-new-tokens without --prompt", lambda w: [
        "apply", str(w.path("plan.yaml")), "--model", str(w.path("ckpt")), "--max-new-tokens", "4"],
        "--max-new-tokens sets how much --prompt generates"),
    Case("input", "empty --model", lambda w: ["compile", "--model", "", "--calib", str(w.path("calib.txt")), "--budget",
                                               "0.5", "-o", str(w.path("em.yaml"))], "the model name is empty"),
    Case("input", "empty --prompt", lambda w: ["apply", str(w.path("plan.yaml")), "--model", str(w.path("ckpt")),
                                               "--prompt", ""], "--prompt is empty"),
    Case("input", "non-UTF-8 --arith", lambda w: ["eval", "--model", str(w.path("ckpt")), "--plan",
                                                  str(w.path("plan.yaml")), "--data", str(w.path("calib.txt")),
                                                  "--arith", w.write("arith.txt", b"1+1=2\n\xff\xfe"),
                                                  "--max-tokens", "128", "--seq-len", "64"], "not UTF-8"),
    Case("input", "calibration of only white space", lambda w: _compile(
        w, "--budget", "0.5", "-o", str(w.path("ws.yaml")), calib=w.write("blank.txt", " \n\t \n" * 100)),
         "holds no text"),
    Case("input", "tokenizer ids past the vocabulary", lambda w: [
        "compile", "--model", str(w.path("small-vocab")), "--calib", str(w.path("calib.txt")), *ROUTING_OPTS,
        "--budget", "0.5", "-o", str(w.path("vocab.yaml"))], "the tokenizer gives token id"),
    Case("input", "missing sidecar", lambda w: ["validate", _without_sidecar(w)], "not beside it"),
    Case("input", "changed sidecar", lambda w: ["validate", _changed_sidecar(w)], "does not match the sha256"),
    Case("input", "sidecar holding NaN under a matching sha256", lambda w: [
        "validate", _nan_sidecar(w), "--model", str(w.path("ckpt"))], "holds NaN or infinite values"),
    Case("input", "recipe with an unknown key", lambda w: ["solve", str(w.path("profile.yaml")), "--recipe",
                                                           w.write("bad-recipe.yaml", "kind: allocplan-recipe\n"
                                                                   "schema_version: 1\nrouting:\n  k_bse: 2\n"),
                                                           "-o", str(w.path("r.yaml"))], "unknown key(s) k_bse"),
    Case("input", "budget above the model's", lambda w: ["solve", str(w.path("profile.yaml")), "--budget-activations",
                                                         "99", "-o", str(w.path("b.yaml"))], "exceeds"),
    Case("input", "unknown method", lambda w: ["eval", "--model", str(w.path("ckpt")), "--method", "magic",
                                               "--budget", "0.5", "--data", str(w.path("calib.txt"))],
         "is not one of"),
    Case("input", "unknown bundled model", lambda w: _compile(w, "--budget", "0.5", "-o", str(w.path("u.yaml")),
                                                              model="bundled:nope"), "no bundled model"),
    Case("input", "model directory without config.json", lambda w: _compile(
        w, "--budget", "0.5", "-o", str(w.path("c.yaml")), model=_empty_dir(w)), "has no config.json"),
    Case("input", "compile with --k-max below the original top-k", lambda w: _compile(
        w, "--budget", "0.5", "--k-max", "2", "-o", str(w.path("m.yaml"))), "which --k-max 2 forbids"),
    Case("input", "profile with --k-max below the original top-k", lambda w: [
        "profile", "--model", str(w.path("ckpt")), "--calib", str(w.path("calib.txt")), *ROUTING_OPTS, "--k-max", "3",
        "-o", str(w.path("kp.yaml"))], "which --k-max 3 forbids"),
    Case("input", "budget above what --k-max allows", lambda w: ["solve", str(w.path("profile.yaml")), "--budget",
                                                                 "0.75", "--k-max", "1", "-o", str(w.path("k.yaml"))],
         "--k-max 1 lets the MoE layers run at most"),
    Case("input", "half-expert grid without token-level allocation", lambda w: _compile(
        w, "--budget", "0.5", "--k-step", "0.5", "--no-token-level", "-o", str(w.path("h.yaml"))),
        "--k-step 0.5 profiles fractional k, which only token-level allocation"),
    Case("input", "eval with another model's profile", lambda w: [
        "eval", "--model", str(w.path("other")), "--method", "alloc-l", "--budget", "0.5", "--profile",
        str(w.path("profile.yaml")), "--data", str(w.path("calib.txt")), "--seq-len", "64", "--max-tokens", "256"],
        "was measured on"),
    Case("input", "weights only as pickle", lambda w: _compile(
        w, "--budget", "0.5", "-o", str(w.path("pk.yaml")), model=_pickled_checkpoint(w)),
        "has no safetensors weights, and allocplan does not unpickle checkpoint files unless asked"),
    Case("input", "windows longer than the model's positions", lambda w: _compile(
        w, "--budget", "0.5", "--seq-len", "256", "--calib-tokens", "512", "-o", str(w.path("long.yaml"))),
        "--seq-len 256 is longer than the model's max_position_embeddings 128; use --seq-len 128 or less"),
    Case("input", "report with another model's profile", lambda w: [
        "report", str(w.path("plan.yaml")), "--profile", _other_models_profile(w), "-o", str(w.path("report"))],
        "give the profile the plan was solved from"),
    Case("input", "damaged safetensors weights", lambda w: _compile(
        w, "--budget", "0.5", "-o", str(w.path("dmg.yaml")), model=_damaged_checkpoint(w)),
        "a safetensors weights file is damaged"),
    Case("input", "checkpoint without weights", lambda w: _compile(
        w, "--budget", "0.5", "-o", str(w.path("nw.yaml")), model=_checkpoint_without_weights(w)),
        "no file named model.safetensors"),
    Case("input", "model whose own forward fails", lambda w: _compile(
        w, "--budget", "0.5", "-o", str(w.path("f.yaml")), model=str(w.path("odd-heads"))),
        "its own forward pass fails before any plan is applied"),
]


def _pickled_checkpoint(w: Workspace) -> str:
    """The workspace's checkpoint with its weights saved as pytorch_model.bin (pickle) instead of safetensors."""
    import shutil

    import torch
    from safetensors.torch import load_file

    target = w.path("pickled")
    if not target.exists():
        target.mkdir()
        for item in w.path("ckpt").iterdir():
            if item.suffix != ".safetensors":
                shutil.copy(item, target / item.name)
        torch.save(load_file(w.path("ckpt") / "model.safetensors"), target / "pytorch_model.bin")
    return str(target)


def _checkpoint_copy(w: Workspace, name: str, weights: bool) -> Path:
    """The workspace's checkpoint copied to ``name``, with or without its weights file."""
    import shutil

    target = w.path(name)
    if not target.exists():
        target.mkdir()
        for item in w.path("ckpt").iterdir():
            if weights or item.suffix != ".safetensors":
                shutil.copy(item, target / item.name)
    return target


def _damaged_checkpoint(w: Workspace) -> str:
    """The workspace's checkpoint with the header of its safetensors file garbled (as a bad download leaves it)."""
    target = _checkpoint_copy(w, "damaged", weights=True)
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:8] + b"{garbage" + data[16:])
    return str(target)


def _checkpoint_without_weights(w: Workspace) -> str:
    """The workspace's checkpoint without any weights file (a download that stopped after the config)."""
    return str(_checkpoint_copy(w, "no-weights", weights=False))


def _other_models_profile(w: Workspace) -> str:
    """The workspace's profile as if measured on another checkpoint of the family (another fingerprint)."""
    import re

    text = re.sub(r"fingerprint: sha256:[0-9a-f]+", "fingerprint: sha256:" + "0" * 16, w.profile_text(), count=1)
    assert text != w.profile_text()
    return w.write("other-profile.yaml", text)


def _sidecar_copy(w: Workspace, name: str) -> Path:
    source = w.path("with-sidecar")
    target = w.path(name)
    if not target.exists():
        shutil.copytree(source, target)
    return target


def _without_sidecar(w: Workspace) -> str:
    target = _sidecar_copy(w, "no-sidecar")
    for sidecar in target.glob("compensation-*.safetensors"):
        sidecar.unlink()
    return str(target / "plan.yaml")


def _changed_sidecar(w: Workspace) -> str:
    target = _sidecar_copy(w, "changed-sidecar")
    for sidecar in target.glob("compensation-*.safetensors"):
        data = bytearray(sidecar.read_bytes())
        data[-1] ^= 1
        sidecar.write_bytes(bytes(data))
    return str(target / "plan.yaml")


def _nan_sidecar(w: Workspace) -> str:
    """The plan with a sidecar whose first stand-in value is NaN, renamed and re-hashed as a compile would."""
    import hashlib

    from safetensors.torch import load_file, save

    target = _sidecar_copy(w, "nan-sidecar")
    plan = target / "plan.yaml"
    old = next(target.glob("compensation-*.safetensors"))
    tensors = load_file(old)
    tensors[sorted(tensors)[0]].view(-1)[0] = float("nan")
    data = save(tensors)
    digest = hashlib.sha256(data).hexdigest()
    name = f"compensation-{digest[:16]}.safetensors"
    (target / name).write_bytes(data)
    old_digest = hashlib.sha256(old.read_bytes()).hexdigest()
    text = plan.read_text()
    assert old.name in text and old_digest in text
    plan.write_text(text.replace(old.name, name).replace(old_digest, digest))
    return str(plan)


def _empty_dir(w: Workspace) -> str:
    target = w.path("empty-model")
    target.mkdir(exist_ok=True)
    return str(target)


def console_script() -> list[str]:
    """The installed ``allocplan`` console script (the wheel's, in CI's second run)."""
    script = shutil.which("allocplan", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "allocplan.cli"]


@dataclass(frozen=True)
class Outcome:
    """What one case did."""

    case: Case
    returncode: int
    stderr: str
    new_files: list[str]

    @property
    def refused_cleanly(self) -> bool:
        lines = self.stderr.strip().splitlines()
        # One line, of bounded length: no message prints an unbounded value.
        return (self.returncode == 2 and len(lines) == 1 and lines[0].startswith("allocplan: error: ")
                and len(lines[0]) <= 600
                and self.case.fragment in lines[0] and "Traceback" not in self.stderr and not self.new_files)


def run_case(case: Case, work: Workspace) -> Outcome:
    """Run one case in ``work`` and report its exit status, stderr and any file it left."""
    args = case.build(work)
    before = {str(p) for p in work.root.rglob("*")}
    proc = subprocess.run([*console_script(), *args], capture_output=True, text=True, cwd=work.root,
                          env={**os.environ, "PYTHONHASHSEED": "0"}, timeout=600)
    after = {str(p) for p in work.root.rglob("*")}
    return Outcome(case, proc.returncode, proc.stderr, sorted(after - before))
