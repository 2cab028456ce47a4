"""``python -m householder tasks``: train the model grid on the tasks, write table, CSV, heatmap."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from householder.tasks.generators import get_task, task_names
from householder.tasks.models import DEFAULT_MODELS, mixer_settings
from householder.tasks.report import best_runs, heatmap, markdown_report, to_csv
from householder.tasks.trainer import CellSettings

_STATE_TASKS = ["parity", "mod_arith", "s3", "s4", "a5", "s5"]
_NEG_LADDER = ["deltanet_neg", "deltaproduct2_neg", "deltaproduct3_neg", "deltaproduct4_neg"]

# Settings shared by the state-tracking cells: one layer, no short convolution (the transition
# of each token must come from that token alone, as in the papers' constructions).
_STATE = dict(num_layers=1, num_heads=1, train_length=16, model_kwargs={"use_short_conv": False})
# Recall needs to see a key next to its value: two layers with short convolutions.
_RECALL = dict(num_layers=2, num_heads=2, train_length=64, model_kwargs={"use_short_conv": True})
# Settings a task needs whatever the preset (a preset's per_task entries come after these).
TASK_SETTINGS: dict[str, dict[str, Any]] = {"mqar": _RECALL}

# A preset: grid {task: [models]}, settings of every cell, and per-task overrides.
PRESETS: dict[str, dict[str, Any]] = {
    # CI: a tiny parity cell on the CPU (seconds per model).
    "quick": dict(
        grid={"parity": ["deltanet", "deltanet_neg"]},
        cell=dict(hidden_size=32, steps=200, batch_size=32, lr=3e-3, warmup=10, eval_samples=1024, **_STATE),
        per_task={},
    ),
    # The CPU-sized grid (about 20 minutes on one core): every claim at a small scale.
    "cpu": dict(
        grid={
            "parity": ["deltanet", "deltanet_neg", "gated_deltanet", "gated_deltanet_neg", "transformer", "diag"],
            "mod_arith": ["deltanet", "deltanet_neg", "deltaproduct2", "deltaproduct2_neg", "deltaproduct3_neg", "diag"],
            "s3": ["deltanet_neg", "deltaproduct2", "deltaproduct2_neg", "deltaproduct3_neg"],
            "s4": ["deltanet_neg", "deltaproduct2_neg", "deltaproduct4_neg"],
            "mqar": ["deltanet", "deltanet_neg", "transformer", "diag"],
        },
        cell=dict(hidden_size=64, steps=1500, batch_size=64, lr=3e-3, warmup=50, **_STATE),
        per_task={"s4": dict(steps=3000), "mqar": dict(hidden_size=64, train_length=32)},
    ),
    # One H100/H200 within about five minutes (several cells at a time on the one GPU).
    "gpu": dict(
        grid={
            "parity": ["deltanet", "deltanet_neg", "gated_deltanet", "gated_deltanet_neg", "transformer", "diag"],
            "mod_arith": ["deltanet", "deltanet_neg", "deltaproduct2", "deltaproduct2_neg", "deltaproduct3_neg", "diag"],
            "s3": _NEG_LADDER[:3] + ["deltaproduct2"],
            "s4": _NEG_LADDER,
            "a5": _NEG_LADDER,
            "mqar": ["deltanet", "deltanet_neg", "gated_deltanet", "transformer", "diag"],
            "s5": _NEG_LADDER,
        },
        cell=dict(hidden_size=64, steps=3000, batch_size=128, lr=3e-3, warmup=50, stop_loss=1e-4, **_STATE),
        per_task={"mqar": dict(hidden_size=128, steps=2000)},
    ),
    # The full grid of the issue (every model on every task): minutes per cell on one GPU.
    "full": dict(
        grid={t: DEFAULT_MODELS + ["deltaproduct4_neg"] for t in _STATE_TASKS + ["mqar"]},
        cell=dict(hidden_size=64, steps=10000, batch_size=128, lr=3e-3, warmup=100, stop_loss=1e-4, **_STATE),
        per_task={"mqar": dict(hidden_size=128, steps=5000)},
    ),
}


def add_subcommand(subparsers) -> None:
    """Add ``tasks`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "tasks",
        help="state-tracking and recall tasks (parity, mod_arith, s3, s4, a5, s5, mqar) on the model grid",
        description="Train every (model, task) cell of a grid on synthetic tasks generated on the fly, score it "
        "at the training length and longer, and write a table (markdown, CSV) and a heatmap PNG.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="grid and settings (default: cpu)")
    p.add_argument("--quick", action="store_true", help="the tiny CPU parity cell of CI (same as --preset quick)")
    p.add_argument("--tasks", help=f"comma-separated tasks (default: the preset's); known: {', '.join(task_names())}, mod_arith<p>")
    p.add_argument("--models", help="comma-separated models for every task (default: the preset's grid); e.g. "
                   "deltanet,deltanet_neg,deltaproduct3_neg,gated_deltanet,transformer,diag")
    p.add_argument("--out", help="results folder (default: runs/tasks-<preset>)")
    p.add_argument("--name", help="file name stem of the outputs (default: tasks_<preset>)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--workers", type=int, default=1, help="cells trained at the same time, each in its own process (default 1)")
    p.add_argument("--time-limit", type=float, help="after this many seconds start no new cell and end the training of "
                   "running ones (they are scored as they are and marked cut short; the rest are reported as not run)")
    p.add_argument("--threads", type=int, help="torch CPU threads per cell (default 1 on the CPU: tiny models only lose "
                   "to threading, badly so on a shared machine)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--report", metavar="JSON", help="only rebuild the table, CSV and heatmap from a run's .json (no training)")
    g = p.add_argument_group("cell settings (override the preset for every task)")
    g.add_argument("--steps", type=int)
    g.add_argument("--train-length", type=int)
    g.add_argument("--eval-lengths", help="comma-separated multiples of the training length (default 1,2,4)")
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--num-layers", type=int)
    g.add_argument("--num-heads", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--eval-samples", type=int)
    g.add_argument("--stop-loss", type=float, help="stop a cell early when its mean training loss falls below this")
    g.add_argument("--seed", type=int, help="seed of the first run of each cell (default 0)")
    g.add_argument("--seeds", type=int, default=1, help="runs per cell, seeds seed .. seed + N - 1; the table shows "
                   "the best run, the CSV every run (default 1)")
    p.set_defaults(run=run)


_CELL_ARGS = ("steps", "train_length", "hidden_size", "num_layers", "num_heads", "batch_size", "lr", "eval_samples", "stop_loss", "seed")


def _names(value: str, option: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise ValueError(f"--{option} must list at least one name; got {value!r}")
    return names


def plan(args: argparse.Namespace) -> tuple[list[tuple[str, str, CellSettings]], dict[str, Any]]:
    """The cells to run, [(task, model, settings)], in order, and the resolved preset; checks every name."""
    preset_name = "quick" if args.quick else args.preset
    preset = PRESETS[preset_name]
    grid: dict[str, list[str]] = dict(preset["grid"])
    if args.tasks:
        tasks = _names(args.tasks, "tasks")
        grid = {t: grid.get(t, DEFAULT_MODELS) for t in tasks}
    if args.models:
        models = _names(args.models, "models")
        grid = {t: models for t in grid}
    for t, models in grid.items():
        get_task(t)  # raises on an unknown task, naming it
        for m in models:
            mixer_settings(m)  # raises on an unknown model, naming it
    if args.seeds < 1:
        raise ValueError(f"--seeds must be an int >= 1; got {args.seeds}")
    overrides = {k: getattr(args, k) for k in _CELL_ARGS if getattr(args, k, None) is not None}
    if args.eval_lengths:
        try:
            overrides["eval_lengths"] = tuple(int(x) for x in _names(args.eval_lengths, "eval-lengths"))
        except ValueError as exc:
            raise ValueError(f"--eval-lengths must be comma-separated ints >= 1; got {args.eval_lengths!r}") from exc
    cells = []
    for t, models in grid.items():
        settings = {**preset["cell"], **TASK_SETTINGS.get(t, {}), **preset["per_task"].get(t, {}), **overrides}
        s = CellSettings(**settings)
        task = get_task(t)
        for mult in s.eval_lengths:
            if t == "mqar" and mult * s.train_length > task.max_length():
                raise ValueError(
                    f"--eval-lengths: mqar sequences are at most {task.max_length()} tokens; got "
                    f"{mult} x {s.train_length} = {mult * s.train_length}"
                )
        cells += [(t, m, dataclasses.replace(s, seed=s.seed + i)) for m in models for i in range(args.seeds)]
    if args.workers < 1:
        raise ValueError(f"--workers must be an int >= 1; got {args.workers}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be an int >= 1; got {args.threads}")
    return cells, dict(name=preset_name, grid=grid)


def _run_in_worker(task: str, model: str, settings: CellSettings, device: str | None, threads: int, deadline) -> dict[str, Any]:
    """One cell in a worker process (CPU threads shared out among the workers)."""
    import torch

    torch.set_num_threads(threads)
    return _run_guarded(task, model, settings, device, False, deadline)


def _run_guarded(task, model, settings, device, progress, deadline) -> dict[str, Any]:
    from householder.tasks.trainer import run_cell

    if deadline is not None and time.time() > deadline:
        return dict(task=task, model=model, seed=settings.seed, not_run=True)
    try:
        return run_cell(model, task, settings, device=device, progress=progress, deadline=deadline)
    except Exception as exc:  # a failed cell is reported in the table; the grid goes on
        from householder.tasks.models import label

        return dict(model=model, label=label(model), task=task, seed=settings.seed, error=f"{type(exc).__name__}: {exc}")


def _git(*a: str) -> str:
    """Output of a git command in this checkout ("" when git or the checkout is missing)."""
    try:
        return subprocess.run(["git", *a], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run_facts(device: str | None, threads: int) -> list[str]:
    """Lines naming what produced the results: date, commit, device, versions, command."""
    import numpy as np
    import torch

    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    argv = sys.argv[1:]
    command = "python -m householder " + " ".join(argv) if argv[:1] == ["tasks"] else "householder.tasks.run (from Python)"
    dirty = " (with uncommitted changes)" if _git("status", "--porcelain", "--untracked-files=no") else ""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and torch.cuda.is_available():
        dev_name = torch.cuda.get_device_name(torch.device(dev))
    else:
        dev_name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} torch thread(s) per cell)"
    versions = f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}"
    try:
        import triton

        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    return [
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- commit: {commit}{dirty}",
        f"- device: {dev_name}",
        f"- versions: {versions}",
        f"- command: `{command}`",
    ]


def _settings_lines(cells) -> list[str]:
    by_task: dict[str, CellSettings] = {}
    for t, _, s in cells:
        by_task.setdefault(t, s)
    out = []
    for t, s in by_task.items():
        d = dataclasses.asdict(s)
        d["seed"] = sorted({c[2].seed for c in cells if c[0] == t})
        d["eval_lengths"] = [m * s.train_length for m in s.eval_lengths]
        out.append(f"- {t} ({get_task(t).describe()}): " + ", ".join(f"{k}={v}" for k, v in d.items()))
    return out


def write_outputs(out: Path, stem: str, results, cells, facts, elapsed: float, pending: list[tuple[str, str, int]]) -> None:
    """Rewrite the raw JSON, table, CSV and heatmap from the results so far (after every run)."""
    seeds = len({s.seed for _, _, s in cells})
    header = facts + [f"- runs: {len(results)} of {len(cells)} ({seeds} seed(s) per cell) in {elapsed:.0f} s"]
    if pending:
        header.append("- not run (time limit): " + ", ".join(f"{m} on {t} (seed {seed})" for t, m, seed in pending))
    doc = dict(
        header=header,
        tasks=list(dict.fromkeys(t for t, _, _ in cells)),
        models=list(dict.fromkeys(m for _, m, _ in cells)),
        settings=_settings_lines(cells),
        title=f"{stem}: {facts[2][len('- device: '):]}",
        results=list(results),
    )
    _write_text(out / f"{stem}.json", json.dumps(doc, indent=1))
    render(out / f"{stem}.json")


def render(json_path: str | os.PathLike, note: str | None = None) -> Path:
    """Write the table (.md), CSV and heatmap (.png) beside a run's raw JSON; returns the .md path.

    The JSON (written by every run) holds the header facts, task and model
    order, settings and every run's record, so the report can be rebuilt
    later (``--report``) without training again; ``note`` is added to the
    header of the rebuilt page (not to the JSON).
    """
    json_path = Path(json_path)
    try:
        doc = json.loads(json_path.read_text())
        header, tasks, models, settings, title, results = (
            doc[k] for k in ("header", "tasks", "models", "settings", "title", "results")
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--report must be the .json file a tasks run wrote; could not read {str(json_path)!r}: {exc}") from exc
    for r in results:  # JSON keys are strings
        if "lengths" in r:
            r["lengths"] = {int(k): v for k, v in r["lengths"].items()}
    out, stem = json_path.parent, json_path.stem
    if note:
        header = header + [note]
    png = out / f"{stem}.png"
    if any("error" not in r for r in results):
        heatmap(best_runs(results), tasks, models, png, title)
    md = markdown_report(results, tasks, models, header, settings, png.name if png.exists() else None)
    _write_text(out / f"{stem}.md", md)
    _write_text(out / f"{stem}.csv", to_csv(results))
    return out / f"{stem}.md"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one


def run(args: argparse.Namespace) -> int:
    """The ``tasks`` command; returns the exit status (1 if a cell failed)."""
    if args.report:
        commit = _git("rev-parse", "--short", "HEAD") or "unknown"
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        md = render(args.report, note=f"- report rebuilt from the JSON by `--report` at commit {commit}, {when}")
        print(f"rewrote {md} and its .csv and .png")
        return 0
    cells, preset = plan(args)
    out = Path(args.out or os.path.join("runs", f"tasks-{preset['name']}"))
    stem = args.name or f"tasks_{preset['name']}"
    out.mkdir(parents=True, exist_ok=True)
    import torch

    cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    threads = args.threads or (1 if cpu else max(1, (os.cpu_count() or 1) // args.workers))
    saved_threads = torch.get_num_threads()
    facts = run_facts(args.device, threads)
    print("\n".join(facts), flush=True)
    print(f"{len(cells)} runs ({len({(t, m) for t, m, _ in cells})} cells) -> {out}/{stem}.{{md,csv,png,json}}", flush=True)
    t0 = time.perf_counter()
    deadline = None if args.time_limit is None else time.time() + args.time_limit
    results: list[dict[str, Any]] = []
    pending = [(t, m, s.seed) for t, m, s in cells]

    def record(r: dict[str, Any]) -> None:
        if r.get("not_run"):
            return
        results.append(r)
        pending.remove((r["task"], r["model"], r["seed"]))
        if "error" in r:
            print(f"[{time.perf_counter() - t0:6.0f} s] {r['model']} on {r['task']} (seed {r['seed']}): FAILED {r['error']}", flush=True)
        else:
            accs = ", ".join(f"{k}: {100 * v['score']:.1f}%" for k, v in sorted(r["lengths"].items()))
            cut = " (cut short by the time limit)" if r["cut_short"] else ""
            print(f"[{time.perf_counter() - t0:6.0f} s] {r['model']} on {r['task']} (seed {r['seed']}): {r['steps']} steps{cut}, "
                  f"{r['train_seconds']:.0f} s, accuracy {accs} (chance {100 * r['chance']:.0f}%)", flush=True)
        write_outputs(out, stem, results, cells, facts, time.perf_counter() - t0, [])

    if args.workers == 1:
        torch.set_num_threads(threads)
        try:
            for t, m, s in cells:
                record(_run_guarded(t, m, s, args.device, args.progress, deadline))
        finally:
            torch.set_num_threads(saved_threads)
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        # cells past the deadline return at once as not run; running ones stop training at it
        with cf.ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_run_in_worker, t, m, s, args.device, threads, deadline) for t, m, s in cells]
            for f in cf.as_completed(futures):
                record(f.result())
    write_outputs(out, stem, results, cells, facts, time.perf_counter() - t0, pending)
    print(f"done in {time.perf_counter() - t0:.0f} s: {out / stem}.md", flush=True)
    return 1 if any("error" in r for r in results) else 0
