"""Run a python-fire entry point so that bad input ends in one clear line, not a traceback."""

from __future__ import annotations

import sys

import fire
import torch

from llama.errors import UserError


def name_list(value) -> tuple[str, ...]:
    """A list flag as python-fire hands it over: `--x a,b` arrives as a tuple, `--x a` or `--x "a b"` as a str."""
    items = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
    return tuple(str(v).strip() for v in items if str(v).strip())


def run(component):
    """fire.Fire(component), turning UserError (and out-of-memory) into `error: ...` and exit code 2."""
    try:
        fire.Fire(component)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError:
        print("error: out of memory: lower the batch size, sequence length or precision", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
