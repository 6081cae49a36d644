"""What every command shares: exit statuses, the usage error, the GPU check and where checkpoints come from."""

from __future__ import annotations

from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input that is not a verification failure: reported on stderr, exit status 2."""


def _gpu_available():
    from cupyq import device

    return device.gpu_available()


def _gpu_unavailable_reason():
    from cupyq import device

    return device.gpu_unavailable_reason()


def _require_gpu(command):
    """UsageError naming why ``command`` cannot run here when no GPU is usable."""
    reason = _gpu_unavailable_reason()
    if reason is not None:
        raise UsageError(f"{command} needs an NVIDIA GPU with CuPy, and none was found: {reason} (see `cupyq info`)")


def _checkpoint_paths(paths, tmp):
    """The checkpoint directories to work on: the given ones, or the built-in sample made in ``tmp``."""
    if paths:
        for p in paths:
            _reject_row_count(p)
        return [Path(p) for p in paths], False
    from cupyq.sample import make_sample

    return list(make_sample(tmp).values()), True


def _reject_row_count(path):
    """UsageError for a checkpoint path that is a number and no file: a row count given as ``--m 1 16``."""
    if str(path).isdigit() and not Path(path).exists():
        raise UsageError(f"{path}: no such checkpoint directory; several row counts are written --m 1,{path} "
                         f"(or --m 1 --m {path})")


def _open(path):
    from cupyq.checkpoint import open_checkpoint

    return open_checkpoint(path)
