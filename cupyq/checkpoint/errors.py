"""The checkpoint error and the helpers that raise it naming the file (and tensor) at fault."""

from __future__ import annotations

import json

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint directory that is malformed, inconsistent or unsupported.

    The message names the file, the tensor (when one is involved) and the problem.
    """


def _fail(file, problem, tensor=None):
    where = str(file) + (f": tensor '{tensor}'" if tensor else "")
    raise CheckpointError(f"{where}: {problem}")


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        _fail(path, f"cannot parse JSON ({exc})")

