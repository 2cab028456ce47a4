"""CI's cell of the task suite: ``python -m householder tasks --quick`` on the CPU.

A one-layer DeltaNet trained on parity (length 16, fixed seed) must learn it
with beta in [0, 2] and stay at chance with beta in [0, 1] - the
negative-eigenvalue paper's claim, on our layers and our training loop.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")


def test_quick_parity_cell(tmp_path):
    from householder.__main__ import main

    assert main(["tasks", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    results = {r["model"]: r for r in json.loads((tmp_path / "tasks_quick.json").read_text())["results"]}
    neg, pos = results["deltanet_neg"], results["deltanet"]
    assert neg["train_length"] == pos["train_length"] == 16 and neg["steps"] == pos["steps"] == 200
    acc_neg = {int(k): v["score"] for k, v in neg["lengths"].items()}
    acc_pos = {int(k): v["score"] for k, v in pos["lengths"].items()}
    assert neg["lengths"]["16"]["count"] == 1024  # final-position accuracy of 1024 fresh sequences
    # beta in [0, 2] learns parity and keeps it at twice the training length
    assert acc_neg[16] >= 0.95, acc_neg
    assert acc_neg[32] >= 0.9, acc_neg
    # beta in [0, 1] stays at chance (0.5; the standard deviation of chance on 1024 sequences is 0.016)
    assert all(abs(a - 0.5) <= 0.08 for a in acc_pos.values()), acc_pos
    md = (tmp_path / "tasks_quick.md").read_text()
    assert "| DeltaNet [-1,1] |" in md and "**held**" in md and "device: CPU" in md
    assert (tmp_path / "tasks_quick.png").stat().st_size > 1000
    assert (tmp_path / "tasks_quick.csv").read_text().count("\n") == 1 + 2 * 3
