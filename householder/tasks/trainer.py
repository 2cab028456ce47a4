"""Train one (model, task) cell with the LM's training loop and score it at several lengths."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from householder.tasks.generators import Task, get_task, score
from householder.tasks.models import label, mixer_settings

# seed-stream tag of evaluation data, so it never coincides with a training step's batch
_EVAL_STREAM = 0x7A5C


@dataclasses.dataclass
class CellSettings:
    """Model size and training schedule of one cell (the same for every model of a grid).

    ``eval_lengths`` are multiples of ``train_length``. ``stop_loss``: stop
    early once the mean training loss of the last 20 steps falls below it
    (None: never); the schedule stays that of ``steps``.
    """

    hidden_size: int = 64
    num_layers: int = 1
    num_heads: int = 2
    steps: int = 300
    batch_size: int = 64
    train_length: int = 32
    eval_lengths: tuple[int, ...] = (1, 2, 4)
    eval_samples: int = 1024
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.0
    chunk_size: int = 16
    stop_loss: float | None = None
    seed: int = 0
    dtype: str = "float32"
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "steps", "batch_size", "train_length", "eval_samples", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        self.eval_lengths = tuple(self.eval_lengths)
        if not self.eval_lengths or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in self.eval_lengths):
            raise ValueError(f"eval_lengths must be ints >= 1 (multiples of train_length); got {self.eval_lengths!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr!r}")


def build_model(model: str, task: Task, s: CellSettings, device=None):
    """The reference LM for ``model`` sized for ``task``: vocabulary max(inputs, classes), untied head."""
    from householder.layers import LanguageModel, LMConfig

    config = LMConfig(
        vocab_size=max(task.vocab_size, task.num_classes),
        hidden_size=s.hidden_size,
        num_layers=s.num_layers,
        num_heads=s.num_heads,
        chunk_size=s.chunk_size,
        tie_word_embeddings=False,  # classes and input tokens are different things
        **{**mixer_settings(model), **s.model_kwargs},
    )
    return LanguageModel(config, device=device)


def _to_torch(arrays, device):
    import torch

    return tuple(torch.from_numpy(a).to(device, non_blocking=True) for a in arrays)


def evaluate_lengths(model, task: Task, s: CellSettings, device) -> dict[int, dict[str, float]]:
    """Scores of ``model`` at every evaluation length: {length: {"score", "token", "count"}}."""
    import torch

    from householder.training import autocast

    was_training = model.training
    model.eval()
    out = {}
    try:
        for mult in s.eval_lengths:
            length = mult * s.train_length
            rng = np.random.default_rng([s.seed, _EVAL_STREAM, length])
            preds, targets = [], []
            # batches of about the training batch's token count, so memory does not grow with length
            per_batch = max(1, s.batch_size * s.train_length // length)
            for start in range(0, s.eval_samples, per_batch):
                n = min(per_batch, s.eval_samples - start)
                x, y = task.sample(rng, n, length)
                (xt,) = _to_torch([x], device)
                with torch.no_grad(), autocast(device, s.dtype):
                    logits = model(xt).logits[..., : task.num_classes]
                preds.append(logits.argmax(-1).cpu().numpy())
                targets.append(y)
            sc = score(task, np.concatenate(preds), np.concatenate(targets))
            out[length] = dict(score=sc.score, token=sc.token, count=sc.count)
    finally:
        model.train(was_training)
    return out


def run_cell(
    model_name: str,
    task_name: str,
    s: CellSettings,
    device: str | None = None,
    progress: bool = False,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Train ``model_name`` on ``task_name`` and score it; returns one result record (a plain dict).

    The record holds the model and task names, the model label, chance
    accuracy, parameter count, steps run, final training loss, seconds, and
    ``lengths``: {length: {"score", "token", "count"}}. ``deadline`` (a
    ``time.time()`` value) ends training early, before the evaluation; the
    record then says ``cut_short``.
    """
    import torch

    from householder.training import train_loop

    task = get_task(task_name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(s.seed)
    model = build_model(model_name, task, s, device=device)

    def get_batch(step: int):
        rng = np.random.default_rng([s.seed, step])
        return _to_torch(task.sample(rng, s.batch_size, s.train_length), device)

    recent: list[float] = []

    cut = []

    def on_step(step: int, loss: float) -> bool:
        recent.append(loss)
        del recent[:-20]
        if deadline is not None and time.time() > deadline and step < s.steps:
            cut.append(step)
            return True
        return s.stop_loss is not None and len(recent) == 20 and sum(recent) / 20 < s.stop_loss

    t0 = time.perf_counter()
    losses = train_loop(
        model, get_batch, steps=s.steps, lr=s.lr, warmup=s.warmup, weight_decay=s.weight_decay,
        dtype=s.dtype, on_step=on_step, progress=progress, desc=f"{model_name} on {task_name}",
    )
    train_s = time.perf_counter() - t0
    lengths = evaluate_lengths(model, task, s, device)
    return dict(
        model=model_name, label=label(model_name), task=task_name, seed=s.seed, chance=task.chance, metric=task.metric,
        params=model.num_parameters(), steps=len(losses), final_loss=float(np.mean(losses[-20:])),
        train_seconds=round(train_s, 2), seconds=round(time.perf_counter() - t0, 2), device=str(device),
        train_length=s.train_length, cut_short=bool(cut), lengths={int(k): v for k, v in lengths.items()},
    )
