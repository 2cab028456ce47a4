"""``python -m householder train``: train the reference LM on byte-level text.

With no ``--data``, the corpus is the running interpreter's own standard
library (its .py source files, tests excluded), split into training and
validation by file, so nothing is downloaded. Every batch is a function of
(seed, rank, step), which makes ``--resume`` reproduce the losses of an
uninterrupted run. Under ``torchrun --nproc_per_node=N`` the same command
trains with DistributedDataParallel (NCCL on GPUs, gloo on CPUs).

The pieces are reusable: :func:`train_loop` trains any model whose forward
takes ``(input_ids, labels=...)`` and returns an object with ``.loss``;
:func:`make_optimizer`, :func:`lr_at`, :func:`evaluate` and
:func:`save_checkpoint` are the parts it is made of.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import sysconfig
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

# Presets: model config (LMConfig fields) and training settings. "tiny" is the
# README's command: about 5 minutes on 2 CPU cores. "test" is for CI (seconds).
PRESETS: dict[str, dict[str, Any]] = {
    "test": dict(
        model=dict(hidden_size=32, num_layers=2, num_heads=2, mixer="deltanet", chunk_size=16),
        seq_len=32, batch_size=4, steps=6, lr=3e-3, warmup=2, eval_interval=3, eval_batches=1,
        checkpoint_interval=3, sample_tokens=16,
    ),
    "tiny": dict(
        model=dict(hidden_size=128, num_layers=4, num_heads=4, mixer="deltanet"),
        seq_len=256, batch_size=16, steps=450, lr=3e-3, warmup=30, eval_interval=75, eval_batches=4,
        checkpoint_interval=75, sample_tokens=300,
    ),
    # One GPU (H100/H200), bf16 autocast.
    "gpu-small": dict(
        model=dict(hidden_size=512, num_layers=8, num_heads=8, mixer="deltanet"),
        seq_len=2048, batch_size=16, steps=4000, lr=2e-3, warmup=200, eval_interval=250, eval_batches=16,
        checkpoint_interval=500, sample_tokens=500, dtype="bf16",
    ),
    "gpu-125m": dict(
        model=dict(hidden_size=768, num_layers=12, num_heads=12, mixer="deltanet"),
        seq_len=2048, batch_size=32, steps=10000, lr=1e-3, warmup=500, eval_interval=500, eval_batches=16,
        checkpoint_interval=1000, sample_tokens=500, dtype="bf16",
    ),
    "gpu-hybrid": dict(
        model=dict(hidden_size=768, num_layers=12, num_heads=12, mixer=["gated_deltanet", "swa"], window_size=512),
        seq_len=2048, batch_size=32, steps=10000, lr=1e-3, warmup=500, eval_interval=500, eval_batches=16,
        checkpoint_interval=1000, sample_tokens=500, dtype="bf16",
    ),
}

# training settings and their defaults where a preset does not give them
DEFAULTS: dict[str, Any] = dict(
    weight_decay=0.1, grad_clip=1.0, min_lr_ratio=0.1, seed=0, dtype="float32", val_fraction=0.1,
    prompt="import ", temperature=0.8, top_k=40,
)
# settings a resumed run may change without changing the numbers it reproduces
RESUMABLE_OVERRIDES = ("steps", "stop_at", "eval_interval", "checkpoint_interval", "sample_tokens", "progress", "device")

CHECKPOINT = "checkpoint.pt"
DOC_SEPARATOR = b"\x00"  # never in text: marks file boundaries for the model


# -- data --------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    """The .py files of this interpreter's standard library, tests and site-packages excluded, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if skip.intersection(parts) or path.name.startswith("test_"):
            continue
        files.append(path)
    return sorted(files)


def text_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named by ``paths`` (directories are walked), without binary files, sorted."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"--data: no such file or directory: {str(p)!r}")
    files = [f for f in sorted(set(files)) if DOC_SEPARATOR not in f.read_bytes()[:4096]]
    if not files:
        raise ValueError(f"--data: no text files found under {[str(p) for p in paths]}")
    return files


@dataclasses.dataclass
class ByteCorpus:
    """Byte-level token streams: ``train`` and ``val`` as uint8 arrays, files joined by a 0 byte."""

    train: np.ndarray
    val: np.ndarray
    train_files: int
    val_files: int
    source: str

    @classmethod
    def load(cls, data: list[str] | None = None, val_fraction: float = 0.1) -> "ByteCorpus":
        """Read ``data`` (paths) or the standard library; split by file, deterministically.

        A file goes to validation when the CRC32 of its last two path parts
        (folder/name) falls in the lowest ``val_fraction`` of the range, so the
        split depends neither on where the files live nor on which others exist.
        """
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
        files = stdlib_files() if data is None else text_files(data)
        source = f"Python {sys.version.split()[0]} standard library" if data is None else ", ".join(map(str, data))
        keys = [zlib.crc32("/".join(f.parts[-2:]).encode()) for f in files]
        is_val = [key < val_fraction * 2**32 for key in keys]
        if len(files) >= 2 and (not any(is_val) or all(is_val)):
            # too few files for the fraction: one file (the lowest key) validates, the rest train
            lowest = min(range(len(files)), key=keys.__getitem__)
            is_val = [i == lowest for i in range(len(files))]
        train = [f.read_bytes() + DOC_SEPARATOR for f, v in zip(files, is_val) if not v]
        val = [f.read_bytes() + DOC_SEPARATOR for f, v in zip(files, is_val) if v]
        if len(files) == 1:
            # one file: split its stream by position instead
            stream = val[0] if val else train[0]
            cut = int(len(stream) * (1 - val_fraction))
            train, val = [stream[:cut]], [stream[cut:]]
        return cls(
            np.frombuffer(b"".join(train), dtype=np.uint8), np.frombuffer(b"".join(val), dtype=np.uint8),
            len(train), len(val), source,
        )

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0):
        """Random training windows for ``step``: (input_ids, labels), each (batch_size, seq_len) int64.

        A function of (seed, rank, step) alone, so a resumed run sees the same data.
        """
        import torch

        n = len(self.train) - seq_len - 1
        if n < 1:
            raise ValueError(f"the training text ({len(self.train)} bytes) is shorter than seq_len + 1 = {seq_len + 1}")
        rng = np.random.default_rng([seed, rank, step])
        starts = rng.integers(0, n, size=batch_size)
        windows = torch.from_numpy(np.stack([self.train[s : s + seq_len + 1] for s in starts]).astype(np.int64))
        return windows[:, :-1], windows[:, 1:]

    def val_batches(self, num_batches: int, batch_size: int, seq_len: int, rank: int = 0, world: int = 1):
        """This rank's share of fixed, evenly spaced validation windows (the same every evaluation)."""
        import torch

        n = len(self.val) - seq_len - 1
        if n < 1:
            raise ValueError(f"the validation text ({len(self.val)} bytes) is shorter than seq_len + 1 = {seq_len + 1}")
        starts = np.linspace(0, n, num_batches * batch_size).astype(np.int64)[rank::world]
        windows = torch.from_numpy(np.stack([self.val[s : s + seq_len + 1] for s in starts]).astype(np.int64))
        return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]


# -- the loop ------------------------------------------------------------------------


def lr_at(step: int, steps: int, lr: float, warmup: int = 0, min_lr_ratio: float = 0.1) -> float:
    """Learning rate of step ``step`` (0-based): linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, lr: float = 1e-3, weight_decay: float = 0.1, betas=(0.9, 0.95)):
    """AdamW with weight decay on matrices only (not on norms, biases, gate parameters)."""
    import torch

    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if all(p.is_cuda for p in decay + no_decay) else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **fused)


def autocast(device, dtype: str):
    """The autocast context for ``dtype`` ("float32": none, "bf16": bfloat16 autocast)."""
    import torch

    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"dtype must be 'float32' or 'bf16'; got {dtype!r}")


def train_loop(
    model,
    get_batch: Callable[[int], tuple[Any, Any]],
    *,
    steps: int,
    optimizer=None,
    lr: float = 1e-3,
    warmup: int = 0,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.1,
    grad_clip: float | None = 1.0,
    start_step: int = 0,
    dtype: str = "float32",
    on_step: Callable[[int, float], bool | None] | None = None,
    progress: bool = True,
    tokens_per_step: int | None = None,
    desc: str = "train",
) -> list[float]:
    """Train ``model`` from ``start_step`` to ``steps``; returns the training loss of each step run.

    ``get_batch(step)`` returns (input_ids, labels) on the model's device;
    ``model(input_ids, labels=labels).loss`` is minimised with ``optimizer``
    (default :func:`make_optimizer`) under the :func:`lr_at` schedule.
    ``on_step(step, loss)`` runs after each update (step counts updates done);
    returning True stops the loop. A non-finite loss raises FloatingPointError.
    """
    import torch
    from tqdm.auto import tqdm

    if optimizer is None:
        optimizer = make_optimizer(model, lr, weight_decay)
    device = next(model.parameters()).device
    losses: list[float] = []
    bar = tqdm(total=steps, initial=start_step, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    rate, t_last = None, time.perf_counter()
    model.train()
    try:
        for step in range(start_step, steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup, min_lr_ratio)
            input_ids, labels = get_batch(step)
            with autocast(device, dtype):
                loss = model(input_ids, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            value = float(loss.detach())  # one synchronisation per step, for the log and the check
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss is {value} at step {step + 1}; lower the learning rate")
            losses.append(value)
            now = time.perf_counter()
            tokens = tokens_per_step if tokens_per_step is not None else input_ids.numel()
            inst = tokens / max(now - t_last, 1e-9)
            rate = inst if rate is None else 0.9 * rate + 0.1 * inst
            t_last = now
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{rate:,.0f}")
            if on_step is not None and on_step(step + 1, value):
                break
    finally:
        bar.close()
    return losses


def evaluate(model, batches, dtype: str = "float32") -> float:
    """Mean loss of ``model`` over ``batches`` [(input_ids, labels)], without gradients (a local mean)."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for input_ids, labels in batches:
            with autocast(device, dtype):
                loss = model(input_ids.to(device), labels=labels.to(device)).loss
            total += float(loss) * labels.numel()
            count += labels.numel()
    model.train(was_training)
    return total / max(count, 1)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """torch.save ``state`` to ``path`` atomically: a temporary file in the same folder, then a rename."""
    import torch

    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: a reader sees the old or the new file, never half of one


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def plot_history(history: dict[str, list], path: str | os.PathLike, title: str = "") -> None:
    """Loss-curve PNG: training loss per step and validation loss, in nats per byte."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if history["train"]:
        s, loss = zip(*history["train"])
        ax.plot(s, loss, lw=0.6, alpha=0.45, color="tab:blue", label="train (per step)")
        k = max(1, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(s[k - 1 :], smooth, lw=1.6, color="tab:blue", label=f"train (mean of {k})")
    if history["val"]:
        s, loss, _ = zip(*history["val"])
        ax.plot(s, loss, "o-", color="tab:red", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


# -- the command ---------------------------------------------------------------------


def add_subcommand(subparsers) -> None:
    """Add ``train`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "train",
        help="train the reference LM on byte-level text (default: this Python's standard library)",
        description="Train the reference LM on byte-level text: this Python's standard library source unless "
        "--data names files. Writes checkpoints, a loss curve and the final model to --out.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size and schedule (default: tiny, CPU)")
    p.add_argument("--out", help="output folder (default: runs/<preset>)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="text files or folders to train on instead of the standard library")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g = p.add_argument_group("model (overrides the preset)")
    g.add_argument("--mixer", help="comma-separated mixer names, one per layer or a repeated pattern, e.g. deltanet,swa")
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--num-layers", type=int)
    g.add_argument("--num-heads", type=int)
    g.add_argument("--num-householder", type=int)
    g.add_argument("--allow-neg-eigval", action="store_true", default=None, help="beta in [0, 2] instead of [0, 1]")
    g.add_argument("--attention-layers", help="comma-separated layer indices with global attention")
    g.add_argument("--window-size", type=int, help="window of 'swa' layers")
    t = p.add_argument_group("training (overrides the preset)")
    t.add_argument("--steps", type=int)
    t.add_argument("--stop-at", type=int, help="stop after this step, keeping the schedule of --steps (as if interrupted)")
    t.add_argument("--batch-size", type=int, help="sequences per step per process")
    t.add_argument("--seq-len", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--warmup", type=int)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--grad-clip", type=float)
    t.add_argument("--dtype", choices=["float32", "bf16"], help="bf16 = bfloat16 autocast (default on GPU presets)")
    t.add_argument("--eval-interval", type=int)
    t.add_argument("--eval-batches", type=int)
    t.add_argument("--checkpoint-interval", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--sample-tokens", type=int, help="bytes to generate after training (0: none)")
    t.add_argument("--prompt", help="prompt of the sample (default: 'import ')")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.set_defaults(run=run)


_MODEL_ARGS = ("mixer", "hidden_size", "num_layers", "num_heads", "num_householder", "allow_neg_eigval", "attention_layers", "window_size")


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Preset, then defaults, then explicit command-line values: the run's settings as a plain dict."""
    preset = PRESETS[args.preset]
    s = dict(DEFAULTS)
    s.update({k: v for k, v in preset.items() if k != "model"})
    model = dict(preset["model"])
    for name in _MODEL_ARGS:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == "mixer":
            names = [m.strip() for m in value.split(",") if m.strip()]
            value = names[0] if len(names) == 1 else names
        elif name == "attention_layers":
            value = [int(i) for i in value.split(",") if i.strip()]
        model[name] = value
    s["model"] = model
    for name in ("steps", "stop_at", "batch_size", "seq_len", "lr", "warmup", "weight_decay", "grad_clip", "dtype",
                 "eval_interval", "eval_batches", "checkpoint_interval", "seed", "sample_tokens", "prompt", "progress"):
        value = getattr(args, name, None)
        if value is not None:
            s[name] = value
    s.setdefault("stop_at", None)
    s.setdefault("progress", True)
    s["preset"] = args.preset
    s["data"] = args.data
    s["device"] = args.device
    for name in ("steps", "batch_size", "seq_len", "eval_interval", "eval_batches", "checkpoint_interval"):
        if isinstance(s[name], bool) or not isinstance(s[name], int) or s[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1; got {s[name]!r}")
    if s["stop_at"] is not None and not 1 <= s["stop_at"] <= s["steps"]:
        raise ValueError(f"--stop-at must be in [1, steps = {s['steps']}]; got {s['stop_at']}")
    if not s["lr"] > 0:
        raise ValueError(f"--lr must be > 0; got {s['lr']}")
    return s


def _distributed_setup(device_arg: str | None):
    """(rank, world, device) for this process; initialises torch.distributed under torchrun."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_arg is None:
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def run(args: argparse.Namespace) -> int:
    """The ``train`` command; returns the exit status."""
    import torch

    from householder.layers import LanguageModel, LMConfig

    settings = resolve_settings(args)
    out = Path(args.out or os.path.join("runs", args.preset))
    ckpt_path = out / CHECKPOINT
    checkpoint = None
    if args.resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {str(ckpt_path)!r}")
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        saved = checkpoint["settings"]
        # the numbers depend on the saved settings; only these may change on resume
        for name in RESUMABLE_OVERRIDES:
            explicit = getattr(args, name, None)
            if explicit is not None:
                saved[name] = explicit
        saved["stop_at"] = getattr(args, "stop_at", None)
        settings = saved
    s = settings
    rank, world, device = _distributed_setup(s["device"])
    main = rank == 0
    torch.manual_seed(s["seed"])

    def log(msg: str) -> None:
        if main:
            from tqdm.auto import tqdm

            tqdm.write(msg)

    t0 = time.perf_counter()
    corpus = ByteCorpus.load(s["data"], s["val_fraction"])
    log(
        f"data: {corpus.source}: {len(corpus.train):,} training bytes from {corpus.train_files} files, "
        f"{len(corpus.val):,} validation bytes from {corpus.val_files} files ({time.perf_counter() - t0:.1f} s)"
    )
    config = LMConfig.from_dict(checkpoint["config"]) if checkpoint else LMConfig(**s["model"])
    model = LanguageModel(config, device=device)
    optimizer = make_optimizer(model, s["lr"], s["weight_decay"])
    history: dict[str, list] = {"train": [], "val": []}
    start = 0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        history = checkpoint["history"]
        start = checkpoint["step"]
        log(f"resumed from {ckpt_path} at step {start}")
    log(
        f"model: {model.num_parameters():,} parameters, layers {config.layer_mixers()}, hidden {config.hidden_size}, "
        f"heads {config.num_heads}; device {device}, {world} process(es), dtype {s['dtype']}"
    )
    tokens_per_step = s["batch_size"] * s["seq_len"] * world
    log(f"training: {s['steps']} steps of {tokens_per_step:,} tokens, lr {s['lr']}, output {out}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    val = corpus.val_batches(s["eval_batches"], s["batch_size"], s["seq_len"], rank, world)

    def get_batch(step: int):
        x, y = corpus.batch(step, s["batch_size"], s["seq_len"], s["seed"], rank)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def validate(step: int) -> None:
        local = evaluate(model, val, s["dtype"])
        count = sum(y.numel() for _, y in val)
        if world > 1:
            import torch.distributed as dist

            t = torch.tensor([local * count, count], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            local = float(t[0] / t[1])
        bpb = local / math.log(2)
        history["val"].append((step, local, bpb))
        log(f"step {step}: validation loss {local:.4f} nats/byte, {bpb:.3f} bits per byte")

    def checkpoint_now(step: int) -> None:
        if main:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "config": config.to_dict(), "settings": s, "history": history,
            })
            _write_json(out / "metrics.json", history)
            plot_history(history, out / "loss_curve.png", _title(config, s, history))

    if start == 0:
        validate(0)
    stop = s["stop_at"] or s["steps"]

    def on_step(step: int, loss: float) -> bool:
        history["train"].append((step, loss))
        if step % s["eval_interval"] == 0 or step == s["steps"]:
            validate(step)
        if step % s["checkpoint_interval"] == 0 or step == stop:
            checkpoint_now(step)
        return step >= stop

    t_train = time.perf_counter()
    if start < stop:
        train_loop(
            net, get_batch, steps=s["steps"], optimizer=optimizer, lr=s["lr"], warmup=s["warmup"],
            min_lr_ratio=s["min_lr_ratio"], grad_clip=s["grad_clip"], start_step=start, dtype=s["dtype"],
            on_step=on_step, progress=s["progress"] and main, tokens_per_step=tokens_per_step,
        )
    elapsed = time.perf_counter() - t_train
    done = history["train"][-1][0] if history["train"] else start
    log(f"trained steps {start}..{done} in {elapsed:.0f} s ({(done - start) * tokens_per_step / max(elapsed, 1e-9):,.0f} tokens/s)")
    if main and history["val"]:
        first, last = history["val"][0], history["val"][-1]
        log(f"validation loss {first[1]:.4f} -> {last[1]:.4f} nats/byte ({first[2]:.3f} -> {last[2]:.3f} bits per byte)")
        log(f"loss curve: {out / 'loss_curve.png'}; checkpoint: {ckpt_path}")
    if main and done >= s["steps"]:
        model.save_pretrained(out / "model")
        log(f"model saved to {out / 'model'} (LanguageModel.from_pretrained)")
    if main and s["sample_tokens"] > 0:
        prompt = s["prompt"].encode()
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        gen = torch.Generator(device=device).manual_seed(s["seed"])
        with autocast(device, s["dtype"]):
            sample = model.generate(ids, s["sample_tokens"], temperature=s["temperature"], top_k=s["top_k"], generator=gen)
        text = bytes(sample[0].tolist()).replace(DOC_SEPARATOR, b"\n").decode("utf-8", errors="replace")
        log(f"sample (temperature {s['temperature']}, top-k {s['top_k']}):\n{'-' * 60}\n{text}\n{'-' * 60}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


def _title(config, s, history) -> str:
    last = history["val"][-1] if history["val"] else None
    val = f"; val {last[1]:.3f} nats/byte = {last[2]:.3f} bpb at step {last[0]}" if last else ""
    mixers = sorted(set(config.layer_mixers()))
    return (
        f"{s['preset']}: {config.num_layers} layers {'+'.join(mixers)}, hidden {config.hidden_size}, "
        f"{s['batch_size']}x{s['seq_len']} tokens/step{val}"
    )
