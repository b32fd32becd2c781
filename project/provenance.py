"""Which code produced a result: the git commit, marked when tracked files differed from it."""
from __future__ import annotations

import subprocess
from functools import lru_cache

from llama.checkpoint import REPO_ROOT


@lru_cache(maxsize=1)
def git_commit() -> str:
    """Short commit of the code that ran, with '+changes' when tracked files differ from it ('unknown' outside git)."""
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True)  # noqa: E731
        sha = run("rev-parse", "--short", "HEAD").stdout.strip()
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return sha + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
