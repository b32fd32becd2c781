"""Run a python-fire entry point so that bad input ends in one clear line, not a traceback.

Before the entry point runs (so before any model is loaded or any step trained), `run` checks the command line
against the function's signature: an unknown flag names the closest valid one (python-fire itself would only
complain after the function returned), and a value of the wrong type (`--max_gen_len ten`) names the flag and
the type it takes. Ranges are each entry point's own business (or its config dataclass's).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import signal
import sys
import tempfile
import threading
import typing
from pathlib import Path
from typing import Any, Optional

import fire
import torch

from llama.errors import UserError
from llama.matmul import requested_kernel


def name_list(value) -> tuple[str, ...]:
    """A list flag as python-fire hands it over: `--x a,b` arrives as a tuple, `--x a` or `--x "a b"` as a str."""
    items = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
    return tuple(str(v).strip() for v in items if str(v).strip())


def unknown_flag(argv: list[str], names: set[str]) -> Optional[str]:
    """The first `--flag` in argv that is not one of names (fire's `--noflag` form counts), with a suggestion."""
    for token in argv:
        if token == "--":  # what follows is for fire itself (e.g. `-- --help`)
            return None
        if not token.startswith("--") or token in ("--help",):
            continue
        name = token[2:].split("=", 1)[0].replace("-", "_")
        if name in names or (name.startswith("no") and name[2:] in names):
            continue
        close = difflib.get_close_matches(name, sorted(names), n=1)
        hint = f"did you mean --{close[0]}?" if close else "valid flags: " + " ".join(f"--{n}" for n in sorted(names))
        return f"unknown flag --{name}: {hint}"
    return None


def _allowed(annotation) -> Optional[tuple[type, ...]]:
    """The scalar types a parameter annotated so accepts (None allowed for Optional), or None: not checked."""
    if annotation in (int, float, bool):
        return {int: (int,), float: (int, float), bool: (bool,)}[annotation]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and inner[0] in (int, float, bool):
            return _allowed(inner[0]) + (type(None),)
    return None


def type_problem(name: str, annotation, value: Any) -> Optional[str]:
    allowed = _allowed(annotation)
    if allowed is None:
        return None
    if isinstance(value, bool) and bool not in allowed:  # True is an int to Python, not to a user
        ok = False
    else:
        ok = isinstance(value, allowed)
    if ok:
        return None
    kind = "True or False" if bool in allowed else "a number" if float in allowed else "an integer"
    return f"--{name} takes {kind}{' (or None)' if type(None) in allowed else ''}, not {value!r}"


def checked(fn):
    """fn with its arguments' types checked against its annotations first (UserError on the first mismatch)."""
    signature = inspect.signature(fn)
    hints = typing.get_type_hints(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for name, value in signature.bind(*args, **kwargs).arguments.items():
            problem = type_problem(name, hints.get(name), value)
            if problem:
                raise UserError(problem)
        return fn(*args, **kwargs)

    return wrapper


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs (a kill, e.g. by a job scheduler)."""


def _terminate(signum, frame):
    raise Terminated


@contextlib.contextmanager
def uninterrupted():
    """Hold Ctrl-C and SIGTERM until the block ends, then deliver them: a checkpoint save finishes first. (DCP
    turns an exception raised inside its collective into a CheckpointException on every rank, so a kill landing
    there would otherwise end in a traceback rather than "interrupted".) Only the main thread receives signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    kinds = (signal.SIGINT, signal.SIGTERM)
    previous = {kind: signal.signal(kind, lambda signum, frame: held.append(signum)) for kind in kinds}
    try:
        yield
    finally:
        for kind, handler in previous.items():
            signal.signal(kind, signal.SIG_DFL if handler is None else handler)  # None: not set from Python
        if held:
            signal.raise_signal(held[0])


def run(component):
    """fire.Fire(component) after checking the flags, turning UserError (and out-of-memory) into `error: ...`
    and exit code 2 (3 for out of memory; "interrupted" and 130 for Ctrl-C, 143 for SIGTERM)."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        problem = unknown_flag(sys.argv[1:], set(inspect.signature(component).parameters))
        if problem:
            raise UserError(problem)
        requested_kernel()  # EFFICIENT_LLAMA_FP32_MATMUL, read at the first fp32 product: checked now
        fire.Fire(checked(component))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError:
        print("error: out of memory: lower the batch size, sequence length or precision", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt as e:
        print("interrupted", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)


def writable_dir(path: str | Path, flag: str) -> Path:
    """Create the folder a flag names (if needed) and check that files can be written in it, before any work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path} is not a writable folder: {e.strerror or e}") from None
    return path
