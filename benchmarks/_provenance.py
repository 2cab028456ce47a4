"""Shared by the comparison scripts: which code a result came from."""

from __future__ import annotations

import os
import subprocess


def tree_commit(given: str | None = None, full: bool = False) -> str:
    """The commit to record for the code that runs: ``given`` (a --commit option), else $HH_COMMIT,
    else git's HEAD, marked "+ uncommitted changes" when tracked files differ from it, else "unknown".

    The mark matters where a copy of the tree travels without its own history (or with a stale
    one): HEAD alone would name a commit whose code did not run."""
    given = given or os.environ.get("HH_COMMIT")
    if given:
        return given
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", *([] if full else ["--short"]), "HEAD"],
                              capture_output=True, text=True, check=True, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, cwd=here).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} + uncommitted changes" if dirty else head
