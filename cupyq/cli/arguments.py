"""Argument types of the command line (argparse ``type=`` callables) and the parser that raises instead of
exiting, so that ``--json`` can report a usage error."""

from __future__ import annotations

import argparse
import math


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return v


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def _row_counts(text):
    """``--m`` value: one positive integer or a comma-separated list of them (``1,7,64``)."""
    parts = [t.strip() for t in str(text).split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, such as 1,7,64; got {text!r}")
    try:
        return [_positive_int(t) for t in parts]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas, such as 1,7,64; got {text!r}") from None


def _names(choices):
    """An argparse type for a list option such as ``--formats``: one of ``choices`` or a comma-separated list of
    them (``gptq,exl2``); the value is a list of names."""
    expected = ", ".join(choices)

    def parse(text):
        names = [t.strip() for t in str(text).split(",")]
        if not all(n in choices for n in names):
            raise argparse.ArgumentTypeError(f"expected one of {expected}, or several separated by commas or spaces; "
                                             f"got {text!r}")
        return names

    return parse


def _flat_lists(values):
    """The values of every occurrence of a list option (``--m 1,7 --m 64``, ``--formats gptq exl2``: lists of
    lists), in order and without repeats; None when the option was not given."""
    if not values:
        return None
    out = []
    for group in values:
        out += [v for v in group if v not in out]
    return out


def _arch(text):
    from cupyq.nvrtc import _normalise_arch

    try:
        _normalise_arch(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("arch: ")) from None
    return text


def _gpu_arch(text):
    """``--arch`` of ``inspect --explain``: an architecture such as sm_80 or sm_90, as (major, minor)."""
    from cupyq.explain import parse_arch

    try:
        return parse_arch(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cuda_source_name(text):
    from cupyq.sources import list_cuda_sources

    available = [p.name for p in list_cuda_sources()]
    if text not in available:
        raise argparse.ArgumentTypeError(
            f"expected the file name of a CUDA source of the package ({', '.join(available)}), got {text!r}")
    return text


class _ArgumentError(Exception):
    """A command-line usage error (raised instead of argparse's exit so that --json can report it)."""

    def __init__(self, parser, message):
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _ArgumentError(self, message)
