"""The suite's outputs: summary table (markdown, CSV), heatmap PNG, and the check of the papers' claims."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Iterable

from householder.tasks.models import label, sort_key

CSV_FIELDS = [
    "model", "label", "task", "seed", "train_length", "length", "metric", "score", "token_accuracy", "chance",
    "scaled_score", "steps", "cut_short", "final_loss", "train_seconds", "params", "device",
]

# what counts as "learned" (accuracy), "near chance" and "far from solving" (scaled accuracy: 0 = chance, 1 = perfect)
LEARNED = 0.95
NEAR_CHANCE = 0.1
FAR_FROM_SOLVED = 0.5


def scaled(acc: float, chance: float) -> float:
    """(acc - chance) / (1 - chance): 0 at chance, 1 when perfect."""
    return (acc - chance) / (1 - chance)


def best_runs(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (model, task): the run (seed) with the best mean score over its lengths.

    Adds ``runs`` (runs of the cell that did not fail) and ``learned`` (of them,
    those >= 95% at the training length). A cell whose every run failed keeps
    one error record.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["model"], r["task"]), []).append(r)
    out = []
    for runs in groups.values():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            out.append(runs[0])
            continue
        best = max(ok, key=lambda r: sum(v["score"] for v in r["lengths"].values()) / len(r["lengths"]))
        learned = sum(r["lengths"][r["train_length"]]["score"] >= LEARNED for r in ok if r["train_length"] in r["lengths"])
        out.append(dict(best, runs=len(ok), learned=learned))
    return out


def rows(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per (model, task, length) of the result records (long format, CSV_FIELDS)."""
    out = []
    for r in results:
        if "error" in r:
            continue
        for length, v in sorted(r["lengths"].items()):
            out.append(dict(
                model=r["model"], label=r["label"], task=r["task"], seed=r.get("seed", 0), train_length=r["train_length"], length=int(length),
                metric=r["metric"], score=round(v["score"], 4), token_accuracy=round(v["token"], 4),
                chance=round(r["chance"], 4), scaled_score=round(scaled(v["score"], r["chance"]), 4), steps=r["steps"],
                cut_short=bool(r.get("cut_short")), final_loss=round(r["final_loss"], 4), train_seconds=r["train_seconds"], params=r["params"],
                device=r["device"],
            ))
    return out


def to_csv(results) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows(results))
    return buf.getvalue()


def _columns(results, tasks: list[str]) -> list[tuple[str, int, int]]:
    """(task, train_length, length) of every table column, tasks in the given order."""
    cols = {}
    for r in results:
        if "error" not in r:
            for length in r["lengths"]:
                cols[(r["task"], r["train_length"], int(length))] = None
    return sorted(cols, key=lambda c: (tasks.index(c[0]) if c[0] in tasks else len(tasks), c[2]))


def _models(results, models: list[str]) -> list[str]:
    """The models of the results (and of ``models``, when they have results), in table order."""
    return sorted({r["model"] for r in results}, key=sort_key)


def _lookup(results):
    return {(r["model"], r["task"]): r for r in results}


def markdown_table(results, tasks: list[str], models: list[str]) -> str:
    """Model x (task, length) accuracy table in percent; "-" where the cell did not run, "error" where it failed."""
    cols = _columns(results, tasks)
    look = _lookup(results)
    head = "| model | " + " | ".join(f"{t} {length}{' (train)' if length == tl else ''}" for t, tl, length in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for m in _models(results, models):
        cells = []
        for t, _, length in cols:
            r = look.get((m, t))
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append("error")
            else:
                v = r["lengths"].get(length)
                cut = "&dagger;" if r.get("cut_short") else ""
                cells.append("-" if v is None else f"{100 * v['score']:.1f}{cut}")
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims(results) -> list[tuple[str, str, str]]:
    """The papers' qualitative claims, checked on these results: [(claim, verdict, evidence)].

    verdict is "held", "did not hold" or "not run" (the cells it needs are missing).
    """
    look = _lookup([r for r in results if "error" not in r])

    def acc(model, task, mult=1):
        r = look.get((model, task))
        if r is None:
            return None
        v = r["lengths"].get(mult * r["train_length"])
        return None if v is None else v["score"]

    def sc(model, task, mult=1):
        a = acc(model, task, mult)
        return None if a is None else scaled(a, look[(model, task)]["chance"])

    def fmt(model, task, mult=1):
        a = acc(model, task, mult)
        return f"{label(model)} {100 * a:.1f}%" if a is not None else f"{label(model)} not run"

    def longer(model, task):
        r = look[(model, task)]
        return sorted(int(k) for k in r["lengths"] if int(k) > r["train_length"])

    def at_chance_beyond(model, task) -> bool:
        """Near chance at every length beyond training: it does not track the state."""
        r = look[(model, task)]
        return all(abs(scaled(r["lengths"][k]["score"], r["chance"])) <= NEAR_CHANCE for k in longer(model, task))

    def curve(model, task):
        r = look[(model, task)]
        return f"{label(model)} " + "/".join(f"{100 * v['score']:.0f}" for _, v in sorted(r["lengths"].items())) + "%"

    out = []
    # 1. parity: [0, 1] cannot, [0, 2] can and extrapolates
    claim = ("parity: DeltaNet beta in [0, 2] learns it (>= 95% at the training length); beta in [0, 1] does not "
             "track it (near chance at every longer length)")
    if ("deltanet_neg", "parity") not in look or ("deltanet", "parity") not in look:
        out.append((claim, "not run", ""))
    else:
        ok = acc("deltanet_neg", "parity") >= LEARNED and at_chance_beyond("deltanet", "parity")
        out.append((claim, "held" if ok else "did not hold", f"{curve('deltanet_neg', 'parity')}; {curve('deltanet', 'parity')}"))
        if longer("deltanet_neg", "parity"):
            r = look[("deltanet_neg", "parity")]
            ok = all(r["lengths"][k]["score"] >= 0.9 for k in longer("deltanet_neg", "parity"))
            out.append(("parity: DeltaNet [-1,1] extrapolates to longer sequences (>= 90%)", "held" if ok else "did not hold",
                        curve("deltanet_neg", "parity")))
    # 2. mod_arith: positive-eigenvalue models do not track it; a Householder product with negative eigenvalues does
    task = "mod_arith"
    negs = [m for (m, t) in look if t == task and m.endswith("_neg")]
    poss = [m for (m, t) in look if t == task and not m.endswith("_neg") and m != "transformer"]
    claim = ("mod_arith (sum mod 3): a [-1,1] Householder model learns it (>= 95% at the training length); positive-"
             "eigenvalue models ([0,1], diagonal) are far from solving it at the longest length (scaled accuracy < 0.5)")
    if not negs or not poss:
        out.append((claim, "not run", ""))
    else:
        best_neg = max(negs, key=lambda m: acc(m, task))

        def far(m):
            r = look[(m, task)]
            k = max(r["lengths"])
            return k > r["train_length"] and scaled(r["lengths"][k]["score"], r["chance"]) < FAR_FROM_SOLVED

        ok = acc(best_neg, task) >= LEARNED and all(far(m) for m in poss)
        out.append((claim, "held" if ok else "did not hold", "; ".join(curve(m, task) for m in [best_neg] + sorted(poss, key=sort_key))))
    # 3. groups: more Householder factors per token -> harder groups and longer extrapolation
    for task in ("s3", "s4", "a5", "s5"):
        ladder = sorted(
            (m for (m, t) in look if t == task and m.endswith("_neg") and not m.startswith("gated_") and "delta" in m),
            key=lambda m: _n_h(m),
        )
        claim = f"{task}: more Householder factors per token ([-1,1]) track it better, at the training length and beyond"
        if len(ladder) < 2:
            out.append((claim, "not run", ""))
            continue
        mults = sorted({int(k) // look[(ladder[0], task)]["train_length"] for k in look[(ladder[0], task)]["lengths"]})
        ev = "; ".join(
            f"n_h={_n_h(m)}: " + "/".join(f"{100 * acc(m, task, k):.0f}" for k in mults if acc(m, task, k) is not None) + "%"
            for m in ladder
        )
        mean = [sum(acc(m, task, k) or 0 for k in mults) / len(mults) for m in ladder]
        ok = all(b >= a - 0.02 for a, b in zip(mean, mean[1:])) and mean[-1] > mean[0] + 0.05
        out.append((claim, "held" if ok else "did not hold", f"accuracy at {'/'.join(f'{k}x' for k in mults)} the training length: {ev}"))
    # 4. MQAR: DeltaNet recalls well
    task = "mqar"
    dn = [m for m in ("deltanet", "deltanet_neg") if (m, task) in look]
    claim = "mqar: DeltaNet recalls well at the training length (>= 90%)"
    if not dn:
        out.append((claim, "not run", ""))
    else:
        best = max(dn, key=lambda m: acc(m, task))
        out.append((claim, "held" if acc(best, task) >= 0.9 else "did not hold", fmt(best, task)))
    return out


def _n_h(model: str) -> int:
    if "deltaproduct" in model:
        digits = "".join(ch for ch in model.split("deltaproduct")[1] if ch.isdigit())
        return int(digits)
    return 1


def heatmap(results, tasks: list[str], models: list[str], path: str | os.PathLike, title: str = "") -> None:
    """PNG heatmap: models x (task, length), colour = scaled accuracy (0 chance, 1 perfect), text = accuracy %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = _columns(results, tasks)
    ms = _models(results, models)
    look = _lookup(results)
    grid = np.full((len(ms), len(cols)), np.nan)
    text = [["" for _ in cols] for _ in ms]
    for i, m in enumerate(ms):
        for j, (t, _, length) in enumerate(cols):
            r = look.get((m, t))
            if r is None:
                continue
            if "error" in r:
                text[i][j] = "err"
                continue
            v = r["lengths"].get(length)
            if v is not None:
                grid[i, j] = scaled(v["score"], r["chance"])
                text[i][j] = f"{100 * v['score']:.0f}"
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * max(len(cols), 4), 1.2 + 0.42 * max(len(ms), 2)), dpi=110)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i in range(len(ms)):
        for j in range(len(cols)):
            if text[i][j]:
                dark = np.isnan(grid[i, j]) or grid[i, j] > 0.6
                ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7, color="black" if dark else "white")
    ax.set_yticks(range(len(ms)), [label(m) for m in ms], fontsize=8)
    ax.set_xticks(range(len(cols)), [f"{length}{'*' if length == tl else ''}" for t, tl, length in cols], fontsize=7)
    ax.set_xlabel("sequence length (* = training length)", fontsize=8)
    starts = [j for j in range(len(cols)) if j == 0 or cols[j][0] != cols[j - 1][0]]
    for a, b in zip(starts, starts[1:] + [len(cols)]):
        if a:
            ax.axvline(a - 0.5, color="white", lw=2)
        ax.text((a + b - 1) / 2, -0.6, cols[a][0], ha="center", va="bottom", fontsize=8, fontweight="bold")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02).set_label("scaled accuracy (0 = chance, 1 = perfect)", fontsize=8)
    ax.set_title(title + ("\n" if title else "") + "text: accuracy %", fontsize=8, pad=16)
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def markdown_report(results, tasks: list[str], models: list[str], header: list[str], settings_lines: list[str], png_name: str | None) -> str:
    """The whole markdown page: header (run facts), settings, table, claims, failures."""
    all_runs, results = list(results), best_runs(results)
    lines = ["# State-tracking and recall tasks", "", *header, ""]
    lines += [
        "## Accuracy (%)", "",
        "Score: the final position's accuracy (state tracking) or every query's (mqar); chance is 1 / classes.",
    ]
    if any(r.get("runs", 1) > 1 for r in results):
        lines.append("Each cell shows its best run (seed); the CSV lists every run.")
    lines.append("")
    lines.append(markdown_table(results, tasks, models))
    cut = [r for r in results if r.get("cut_short")]
    if cut:
        lines += ["", "&dagger; training cut short by the time limit: " + ", ".join(f"{r['model']} on {r['task']} ({r['steps']} steps)" for r in cut)]
    if png_name:
        lines += ["", f"![heatmap]({png_name})"]
    lines += ["", "## The papers' claims on these results", "", "| claim | verdict | evidence |", "|---|---|---|"]
    for claim, verdict, ev in claims(results):
        lines.append(f"| {claim} | **{verdict}** | {ev} |")
    multi = [r for r in results if r.get("runs", 1) > 1]
    if multi:
        lines += ["", "## Runs per cell", "", "Runs that reached >= 95% at the training length, of the runs made:", ""]
        lines += [f"- {r['label']} on {r['task']}: {r['learned']} of {r['runs']}" for r in multi]
    errors = [r for r in all_runs if "error" in r]
    if errors:
        lines += ["", "## Runs that failed", ""]
        lines += [f"- {r['model']} on {r['task']} (seed {r.get('seed', 0)}): `{r['error']}`" for r in errors]
    lines += ["", "## Settings", "", *settings_lines, ""]
    return "\n".join(lines)
