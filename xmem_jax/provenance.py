"""Which code produced a result: every results file records it."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

# A copy of the code without its git history (what `python -m xmem_jax.launch setup` installs on
# a TPU VM) names the commit it was packed from in this file at its root.
SOURCE_COMMIT_FILE = "SOURCE_COMMIT"


@functools.cache
def source_commit() -> str:
    """The checkout's commit, '+' marking uncommitted changes; outside a git checkout, the
    commit SOURCE_COMMIT_FILE names, or ''. Read once per process: a job calls it when it starts
    (the code it imported), so a commit made while it runs is not what its results name."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        stamp = root / SOURCE_COMMIT_FILE
        return stamp.read_text().strip() if stamp.exists() else ""
    return commit + ("+" if dirty else "")
