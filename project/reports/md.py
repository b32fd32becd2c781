"""Small Markdown helpers for the phase builders' own text (code tables, readings, provenance lines, missing
inputs); the results tables themselves are rendered by the benchmarks' report.py."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from llama.checkpoint import REPO_ROOT


def table(headers: list[str], rows: list[list]) -> str:
    """A pipe table; cells are written with str() and any `|` escaped."""

    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def num(x, digits: int = 2) -> str:
    """A measured number with a fixed count of decimals and thousands separators; missing -> 'n/a'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.{digits}f}"


def ratio(x: float) -> str:
    return f"{x:.1f}×" if x >= 1.95 else f"{x:.2f}×"


def mib(nbytes) -> float:
    return float(nbytes) / 2**20


def distinct(frame, column: str) -> str:
    """The values of a column, joined (for provenance lines); 'not recorded' when the column is absent."""
    if column not in frame.columns:
        return "not recorded"
    return ", ".join(str(v) for v in dict.fromkeys(frame[column].dropna().astype(str)))


def read_results(path: Path, read, tables: str, label: str, command: str, warnings: list):
    """(read(path), None), or (None, (provenance, section)) saying plainly why there is nothing to show: the file
    is missing, has no rows, or is not in the format its benchmark writes (a column is missing)."""
    shown = shown_path(path)
    if not path.exists():
        warnings.append(f"{shown} does not exist: run `{command}`")
        return None, (f"{label}: none yet", missing(tables, f"`{shown}` does not exist", command))
    try:
        return read(path), None
    except (KeyError, AttributeError) as e:  # not what the benchmark writes
        problem = f"`{shown}` lacks the column '{e.args[0] if isinstance(e, KeyError) else e.name}'"
    except pd.errors.EmptyDataError:
        problem = f"`{shown}` has no rows"
    warnings.append(problem)
    return None, (f"{label} `{shown}` (unreadable)", missing(tables, problem, command))


def missing(what: str, reason: str, command: str) -> str:
    return f"**No results yet** for {what}: {reason}. Run `{command}`, then `python -m project.reports`."


def relative(path: Path, start: Path) -> str:
    """path as a link from a file in folder start."""
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def shown_path(path: Path) -> str:
    """path relative to the repository when inside it (so reports do not show this machine's folders)."""
    path = Path(path).resolve()
    return path.relative_to(REPO_ROOT).as_posix() if REPO_ROOT in path.parents else path.name
