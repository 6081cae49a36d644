"""The output toolkit of the command line: tables, human-readable sizes, the progress bar on stderr and the
JSON reports (``--json`` on stdout, ``--json-out FILE`` written through a temporary file and a rename)."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from cupyq.cli.common import UsageError


def format_table(rows, columns) -> str:
    """Plain-text table. columns: list of (header, key); numbers are right-aligned."""
    cells = [[h for h, _ in columns]]
    numeric = [True] * len(columns)
    for row in rows:
        line = []
        for i, (_, key) in enumerate(columns):
            v = row.get(key, "")
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                numeric[i] = numeric[i] and v in ("", "-")
            line.append(_fmt(v))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def render(line):
        return "  ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()

    out = [render(cells[0]), "  ".join("-" * w for w in widths)]
    out += [render(line) for line in cells[1:]]
    return "\n".join(out)


def _fmt(v):
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0 or not math.isfinite(v):
            return str(v)
        if abs(v) < 1e-2 or abs(v) >= 1e6:
            return f"{v:.2e}"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _human_bytes(n) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Progress:
    """A one-line progress bar on stderr, drawn only on a terminal and only once a step has taken
    more than ``delay`` seconds (quick commands print nothing)."""

    def __init__(self, total, label, *, stream=None, delay=0.5):
        self.total, self.label, self.done = total, label, 0
        self.stream = sys.stderr if stream is None else stream
        self.start = time.perf_counter()
        self.delay = delay
        self.drawn = False
        self.enabled = getattr(self.stream, "isatty", lambda: False)()

    def update(self, note=""):
        self.done += 1
        if not self.enabled or time.perf_counter() - self.start < self.delay:
            return
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        text = f"\r{self.label} [{bar}] {self.done}/{self.total} {note}"[:120]
        self.stream.write(text.ljust(self._last_len()) if self.drawn else text)
        self.stream.flush()
        self.drawn = True
        self._len = len(text)

    def _last_len(self):
        return getattr(self, "_len", 0)

    def close(self):
        if self.drawn:
            self.stream.write("\r" + " " * self._last_len() + "\r")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


REPORT_KEY = "cupyq_report"  # marks a JSON report written by cupyq; only such files are ever overwritten


def _json_safe(value):
    """``value`` with non-finite floats as None (JSON has no Infinity/NaN) and tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _report_json(command, payload) -> str:
    """The JSON text of a report: ``payload`` with the ``cupyq_report`` marker first; always valid JSON."""
    import cupyq

    marked = {REPORT_KEY: {"command": command, "version": cupyq.__version__}, **payload}
    return json.dumps(_json_safe(marked), indent=2, default=str, allow_nan=False)


def _check_json_out(path) -> Path:
    """``path`` as a Path when a report may be written there; UsageError for a directory, a missing parent
    folder, or an existing file that is not a cupyq JSON report (it is never replaced)."""
    target = Path(path)
    if str(path) in ("", "-"):
        raise UsageError(f"--json-out: expected a file name, got {str(path)!r} (use --json for stdout)")
    if target.is_dir():
        raise UsageError(f"--json-out: {target} is a directory; expected a file name for the JSON report")
    if not target.parent.is_dir():
        raise UsageError(f"--json-out: folder {target.parent} does not exist")
    if target.exists() or target.is_symlink():
        try:
            previous = json.loads(target.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            previous = None
        if not (isinstance(previous, dict) and REPORT_KEY in previous):
            raise UsageError(
                f"--json-out: {target} exists and is not a JSON report written by cupyq; refusing to overwrite "
                f"it (remove it or choose another file name)"
            )
    return target


def _write_report(path, blob: str):
    """Write ``blob`` to ``path`` (checked by :func:`_check_json_out`) through a temporary file and a rename,
    so a reader never sees half a report."""
    target = _check_json_out(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(blob + "\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _emit(args, payload, text):
    """Print ``text`` or, with ``--json``, the JSON report of ``payload``; with ``--json-out`` also write it."""
    blob = _report_json(args.command, payload)
    if getattr(args, "json", False):
        print(blob)
    else:
        print(text)
    target = getattr(args, "json_out", None)
    if target:
        _write_report(target, blob)
        print(f"wrote {target}", file=sys.stderr)
