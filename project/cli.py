"""Run a python-fire entry point so that bad input ends in one clear line, not a traceback."""

from __future__ import annotations

import sys

import fire
import torch

from llama.errors import UserError


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
