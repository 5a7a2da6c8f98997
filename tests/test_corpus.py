"""The evaluation text is held out: no line of it (20 characters or more) occurs in the training or
calibration text (scripts/make_corpus.py builds it so; this checks the committed files, not the script)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = {name: ROOT / path for name, path in
         {"eval": "data/eval.txt", "train": "data/train.txt", "calibration": "allocplan/data/calibration.txt"}.items()}


@pytest.mark.skipif(not all(path.is_file() for path in FILES.values()), reason="the corpora are not beside the tests")
def test_no_long_eval_line_occurs_in_training_or_calibration_text():
    seen = [FILES["train"].read_text(encoding="utf-8"), FILES["calibration"].read_text(encoding="utf-8")]
    lines = [line.strip() for line in FILES["eval"].read_text(encoding="utf-8").splitlines()]
    long_lines = [line for line in lines if len(line) >= 20]
    assert len(long_lines) > 1000  # the text is still there, only its shared lines are gone
    shared = [line for line in long_lines if any(line in text for text in seen)]
    assert shared == []
