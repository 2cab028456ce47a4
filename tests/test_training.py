"""The ``train`` command and its reusable parts: resume == uninterrupted, atomic checkpoints,
data, schedule, settings errors, and DDP over gloo with 2 processes == one process on both batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from householder.__main__ import main  # noqa: E402
from householder.layers import LanguageModel, LMConfig  # noqa: E402
from householder.training import (  # noqa: E402
    CHECKPOINT,
    PRESETS,
    ByteCorpus,
    lr_at,
    make_optimizer,
    save_checkpoint,
    train_loop,
)

QUIET = ["--no-progress", "--sample-tokens", "0"]


def _history(out: Path) -> dict:
    return torch.load(out / CHECKPOINT, weights_only=True)["history"]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """A small corpus of text files (fresh random words each run)."""
    rng = np.random.default_rng()
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y", "(", ")", ":", "\n"]
    d = tmp_path_factory.mktemp("texts")
    for i in range(12):
        (d / f"f{i}.txt").write_text(" ".join(rng.choice(words, 900)))
    return d


def test_resume_reproduces_uninterrupted_training(tmp_path, text_dir):
    common = ["train", "--preset", "test", "--data", str(text_dir), *QUIET]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--out", str(tmp_path / "b"), "--stop-at", "4"]) == 0
    assert [s for s, _ in _history(tmp_path / "b")["train"]] == [1, 2, 3, 4]
    assert main(["train", "--preset", "test", "--out", str(tmp_path / "b"), "--resume", *QUIET]) == 0
    a, b = _history(tmp_path / "a"), _history(tmp_path / "b")
    assert len(a["train"]) == 6 and a["train"] == b["train"]  # the same losses, step for step
    assert a["val"] == b["val"]
    for name in ("loss_curve.png", "metrics.json", "model/config.json", "model/model.safetensors"):
        assert (tmp_path / "b" / name).is_file(), name
    reloaded = LanguageModel.from_pretrained(tmp_path / "b" / "model")
    state = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=True)["model"]
    for name, p in reloaded.state_dict().items():
        assert torch.equal(p, state[name]), name


def test_validation_loss_falls_and_sample_is_printed(tmp_path, text_dir, capsys):
    args = ["train", "--preset", "test", "--data", str(text_dir), "--out", str(tmp_path), "--no-progress"]
    assert main(args + ["--steps", "30", "--lr", "1e-2", "--eval-interval", "30", "--checkpoint-interval", "30", "--sample-tokens", "12"]) == 0
    val = _history(tmp_path)["val"]
    assert val[0][0] == 0 and val[-1][0] == 30
    # uniform over 256 bytes is ln 256 = 5.55 nats; a 15-word vocabulary is learnt fast
    assert val[-1][1] < val[0][1] - 1.0
    assert abs(val[-1][2] - val[-1][1] / np.log(2)) < 1e-12  # bits per byte
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "sample (temperature" in text and "bits per byte" in text


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, {"step": 1, "w": torch.arange(3)})
    real_save = torch.save

    def broken_save(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["step"] == 1  # the old checkpoint is intact
    save_checkpoint(path, {"step": 3})
    assert torch.load(path, weights_only=True)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if "tmp" not in p.name) == [CHECKPOINT]


def test_corpus_split_and_batches(text_dir):
    corpus = ByteCorpus.load([str(text_dir)])
    assert corpus.train_files + corpus.val_files == 12 and corpus.val_files >= 1 and corpus.train_files >= 1
    x, y = corpus.batch(5, 3, 16, seed=1)
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # labels are the next bytes
    x2, _ = corpus.batch(5, 3, 16, seed=1)
    x3, _ = corpus.batch(6, 3, 16, seed=1)
    x4, _ = corpus.batch(5, 3, 16, seed=1, rank=1)
    assert torch.equal(x, x2) and not torch.equal(x, x3) and not torch.equal(x, x4)
    both = corpus.val_batches(2, 3, 16)
    halves = corpus.val_batches(2, 3, 16, rank=0, world=2) + corpus.val_batches(2, 3, 16, rank=1, world=2)
    assert sum(b[0].shape[0] for b in both) == 6 == sum(b[0].shape[0] for b in halves)


def test_stdlib_corpus_is_python_source():
    from householder.training import stdlib_files

    files = stdlib_files()
    assert len(files) > 100
    assert all(f.suffix == ".py" and not {"test", "tests", "idle_test", "site-packages"} & set(f.parts) for f in files)
    assert any(f.name == "argparse.py" for f in files)


def test_lr_schedule():
    lrs = [lr_at(s, 100, 1.0, warmup=10, min_lr_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_at(100, 100, 1.0, warmup=10, min_lr_ratio=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "extra,error,message",
    [
        (["--steps", "0"], ValueError, "--steps must be an int >= 1; got 0"),
        (["--stop-at", "9"], ValueError, "--stop-at must be in \\[1, steps = 6\\]; got 9"),
        (["--mixer", "deltanet,mamba"], ValueError, "unknown mixer 'mamba'"),
        (["--num-householder", "0"], ValueError, "num_householder must be an int >= 1; got 0"),
        (["--data", "/nonexistent/corpus"], FileNotFoundError, "no such file or directory"),
    ],
)
def test_bad_settings(tmp_path, extra, error, message):
    with pytest.raises(error, match=message):
        main(["train", "--preset", "test", "--out", str(tmp_path), *QUIET, *extra])


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):
        main(["train", "--preset", "test", "--out", str(tmp_path), "--resume", *QUIET])


def test_train_loop_on_a_synthetic_task():
    # the loop other code reuses: any model with .loss, any get_batch(step)
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    torch.manual_seed(seed)
    model = LanguageModel(LMConfig(vocab_size=8, hidden_size=32, num_layers=1, num_heads=2, mixer="deltaproduct"))
    gen = torch.Generator().manual_seed(seed)

    def get_batch(step):
        x = torch.randint(0, 8, (8, 12), generator=gen)
        return x, torch.roll(x, 1, 1)  # predict the previous token: needs the mixer's memory

    losses = train_loop(model, get_batch, steps=40, lr=1e-2, warmup=5, progress=False)
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    stopped = train_loop(model, get_batch, steps=40, lr=1e-2, progress=False, on_step=lambda s, loss: s >= 3)
    assert len(stopped) == 3


def _two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not _two_gpus(), reason="DDP over NCCL needs 2 CUDA GPUs")),
])
def test_ddp_two_processes_equals_one_process_on_both_batches(tmp_path, text_dir, device):
    """gloo on the CPU, NCCL with one GPU per process on CUDA (float32 throughout)."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "householder",
        "train", "--preset", "test", "--data", str(text_dir), "--out", str(out), "--device", device,
        "--dtype", "float32", *QUIET,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout + proc.stderr
    ddp = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)

    # one process, batch = rank 0's and rank 1's batches together: the same averaged gradient
    s = ddp["settings"]
    corpus = ByteCorpus.load(s["data"], s["val_fraction"])
    torch.manual_seed(s["seed"])
    model = LanguageModel(LMConfig.from_dict(ddp["config"]), device=device)

    def both(step):
        parts = [corpus.batch(step, s["batch_size"], s["seq_len"], s["seed"], r) for r in (0, 1)]
        return torch.cat([p[0] for p in parts]).to(device), torch.cat([p[1] for p in parts]).to(device)

    losses = train_loop(
        model, both, steps=s["steps"], optimizer=make_optimizer(model, s["lr"], s["weight_decay"]), lr=s["lr"],
        warmup=s["warmup"], min_lr_ratio=s["min_lr_ratio"], grad_clip=s["grad_clip"], progress=False,
    )
    assert len(losses) == s["steps"] == PRESETS["test"]["steps"]
    # on CUDA, cuBLAS may choose other algorithms for the doubled batch, so the sums differ in
    # their last bits; a missing or wrong gradient average moves weights by about lr = 3e-3
    atol, rtol = (2e-5, 1e-4) if device == "cpu" else (1e-4, 1e-3)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p.cpu(), ddp["model"][name], atol=atol, rtol=rtol, msg=name)
