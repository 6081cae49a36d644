"""Markdown report of a benchmark run: the results table of BENCHMARKS.md and the targets on 8192×28672.

    python scripts/bench_report.py out/bench.json
    python scripts/bench_report.py benchmarks/h200-2026-12-01.json --previous benchmarks/h200-2026-11-28.json \
        --markdown out/report.md

IN.json and OLD.json are what ``scripts/bench.py --json`` writes ({"rows": [{"K", "N", "m", "impl", "us", ...}]});
the figures are ``us``, kernel time per call. Marlin and exllamav2 are the recorded figures of
``benchmarks/recorded_peers.json`` (``cupyq.bench.recorded_peers``), not re-run. A cell the run (or a recording) does
not have is shown as "-"; a target without its figures is "not measured".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cupyq.bench import SHAPES, recorded_peers

# The memory rate: a device-to-device copy on the H200, counting bytes read and written; the math rate: the dense
# bf16 matrix rate measured on the same card.
HBM_BYTES_PER_S = 4.27e12
MMA_FLOP_PER_S = 790e12

MARLIN = "marlin-2026-12-01"
EXLLAMAV2 = "exllamav2-2026-12-01"
PEERS = ((MARLIN, "Marlin (rec.)"), (EXLLAMAV2, "exllamav2 GPTQ (rec.)"))

# (impl, column heading); the optional ones get a column only when the run has them.
COLUMNS = (("gptq", "GPTQ"), ("gptq_act", "act-order"), ("exl2", "EXL2"), ("awq", "AWQ"))
OPTIONAL_COLUMNS = (("gptq_bf16", "GPTQ bf16"),)
BASELINE_COLUMNS = (("fp16", "fp16"),)

TARGET_SHAPE = (8192, 28672)
TARGET_MAX_US = {16: 36.0, 32: 40.0, 64: 55.0, 128: 100.0, 256: 170.0}  # GPTQ µs per call at most
TARGET_FP16_SPEED = {1024: 0.95, 4096: 0.97}  # GPTQ speed at least this fraction of fp16's (fp16 µs ÷ GPTQ µs)
TARGET_BF16_SLOWDOWN = 1.05  # GPTQ with bf16 activations at most this many times the fp16-activation time
MARLIN_MAX_M = 256  # the floor of done: faster than recorded Marlin for m <= 256 ...
EXLLAMAV2_MIN_M = 512  # ... and faster than recorded exllamav2 for m >= 512


def floor_us(k: int, n: int, m: int, group_size: int = 128) -> float:
    """The floor of one GPTQ 4-bit call, in µs: max(bytes ÷ 4.27 TB/s, 2·m·K·N ÷ 790 TFLOP/s).

    k, n: weight shape [K, N]; m: rows of x; group_size: rows per scale/zero group (the last group may be short).
    bytes = K·N/2 (4-bit weights) + 2·G·N (fp16 scales) + G·N/2 (4-bit zero points, packed) + 2·m·K (fp16 x)
    + 2·m·N (fp16 output), with G = ceil(K / group_size) groups. "% of floor" is floor ÷ measured time.
    """
    groups = -(-k // group_size)
    nbytes = k * n / 2 + 2 * groups * n + groups * n / 2 + 2 * m * k + 2 * m * n
    return max(nbytes / HBM_BYTES_PER_S, 2.0 * m * k * n / MMA_FLOP_PER_S) * 1e6


def load_rows(path) -> dict:
    """The rows of a benchmark JSON file as {(K, N, m): {impl: µs}}; rows without a time (an implementation that
    could not run) are left out. Raises ValueError naming the file when it is not such a file."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected the JSON of scripts/bench.py, an object with a list \"rows\"; "
                         f"got {type(doc).__name__}{' without rows' if isinstance(doc, dict) else ''}")
    cells = {}
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not {"K", "N", "m", "impl"} <= r.keys():
            raise ValueError(f"{path}: row {i} lacks K, N, m or impl: {r!r}")
        if r["m"] is None or r.get("us") is None:
            continue
        cells.setdefault((int(r["K"]), int(r["N"]), int(r["m"])), {})[r["impl"]] = float(r["us"])
    return cells


def _us(v):
    return f"{v:.1f}" if v is not None else "-"


def _peer_us(peers, recording, k, n, m):
    return peers.get(recording, {}).get("gptq", {}).get((k, n), {}).get(m)


def best_peer(peers, k, n, m, fp16_us=None):
    """(µs, name) of the fastest peer of GPTQ at (K, N, m): the recorded Marlin and exllamav2 figures and the run's
    own fp16 matmul (``fp16_us``); None when none of them has the cell."""
    found = [(us, label) for rec, label in PEERS if (us := _peer_us(peers, rec, k, n, m)) is not None]
    found += [(fp16_us, "fp16")] if fp16_us is not None else []
    return min(found) if found else None


def results_table(cells, previous=None, previous_label="previous GPTQ", peers=None) -> str:
    """Markdown table, one line per (K, N, m) of ``cells`` ({(K, N, m): {impl: µs}}, as :func:`load_rows`
    returns): the µs of each implementation, GPTQ % of floor, the previous GPTQ figure (when ``previous`` is given,
    the same mapping), the recorded peers and GPTQ's speed over the fastest peer (:func:`best_peer`: peer µs ÷ GPTQ
    µs; the run's fp16 matmul counts as a peer)."""
    peers = recorded_peers() if peers is None else peers
    optional = [c for c in OPTIONAL_COLUMNS if any(c[0] in v for v in cells.values())]
    columns = list(COLUMNS) + optional + list(BASELINE_COLUMNS)
    head = ["K×N", "m"] + [h for _, h in columns] + ["GPTQ % of floor"]
    head += [previous_label] if previous is not None else []
    head += [h for _, h in PEERS] + ["GPTQ vs best peer (rec. or fp16)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (k, n, m), v in sorted(cells.items()):
        gptq = v.get("gptq")
        row = [f"{k}×{n}", str(m)] + [_us(v.get(impl)) for impl, _ in columns]
        row.append(f"{100.0 * floor_us(k, n, m) / gptq:.0f} %" if gptq else "-")
        if previous is not None:
            row.append(_us(previous.get((k, n, m), {}).get("gptq")))
        row += [_us(_peer_us(peers, rec, k, n, m)) for rec, _ in PEERS]
        best = best_peer(peers, k, n, m, v.get("fp16"))
        row.append(f"{best[0] / gptq:.2f}×" if best and gptq else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _faster_by_m(cells, peers, recording, keep_m):
    """{m: (cells where GPTQ is faster than the recording, cells with both figures)} over every shape, and the
    shapes counted."""
    out, shapes = {}, set()
    for (k, n, m), v in sorted(cells.items(), key=lambda kv: (kv[0][2], kv[0][:2])):
        peer = _peer_us(peers, recording, k, n, m)
        if not keep_m(m) or v.get("gptq") is None or peer is None:
            continue
        wins, total = out.get(m, (0, 0))
        out[m] = (wins + (v["gptq"] < peer), total + 1)
        shapes.add((k, n))
    return out, shapes


def targets(cells, peers=None) -> list:
    """The targets, each {"target", "measured", "met"} (met: True, False or None when not measured): GPTQ on
    8192×28672 by m, bf16 activations beside fp16, and the floor of done over every shape of the run (met only
    when the run has all six standard shapes; a loss on fewer is "not met" all the same)."""
    peers = recorded_peers() if peers is None else peers
    k, n = TARGET_SHAPE
    shape = f"{k}×{n}"
    at = {m: v for (kk, nn, m), v in cells.items() if (kk, nn) == TARGET_SHAPE}
    out = []
    for m, limit in TARGET_MAX_US.items():
        us = at.get(m, {}).get("gptq")
        out.append({"target": f"{shape} m = {m}: GPTQ ≤ {limit:g} µs",
                    "measured": f"{us:.1f} µs" if us is not None else "-",
                    "met": None if us is None else us <= limit})
    for m, frac in TARGET_FP16_SPEED.items():
        us, fp16 = at.get(m, {}).get("gptq"), at.get(m, {}).get("fp16")
        speed = fp16 / us if us and fp16 else None
        out.append({"target": f"{shape} m = {m}: GPTQ ≥ {frac:g} × fp16 speed",
                    "measured": f"{us:.1f} µs = {speed:.2f} × fp16 speed (fp16 {fp16:.1f} µs)" if speed else "-",
                    "met": None if speed is None else speed >= frac})
    pairs = sorted((v["gptq_bf16"] / v["gptq"], m, v["gptq_bf16"], v["gptq"])
                   for m, v in at.items() if v.get("gptq") and v.get("gptq_bf16"))
    worst = pairs[-1] if pairs else None
    out.append({"target": f"{shape}: GPTQ with bf16 activations within {100 * (TARGET_BF16_SLOWDOWN - 1):.0f} % of "
                          "fp16 activations, every m",
                "measured": (f"worst {worst[0]:.3f}× at m = {worst[1]} ({worst[2]:.1f} vs {worst[3]:.1f} µs), "
                             f"{len(pairs)} m values" if worst else "-"),
                "met": None if worst is None else worst[0] <= TARGET_BF16_SLOWDOWN})
    for recording, label, keep_m, where in (
            (MARLIN, "Marlin", lambda m: m <= MARLIN_MAX_M, f"m ≤ {MARLIN_MAX_M}"),
            (EXLLAMAV2, "exllamav2 GPTQ", lambda m: m >= EXLLAMAV2_MIN_M, f"m ≥ {EXLLAMAV2_MIN_M}")):
        by_m, shapes = _faster_by_m(cells, peers, recording, keep_m)
        wins, total = sum(w for w, _ in by_m.values()), sum(t for _, t in by_m.values())
        per_m = ", ".join(f"m = {m}: {w}/{t}" for m, (w, t) in by_m.items())
        missing = len(set(SHAPES) - shapes)
        measured = f"{wins} of {total} cells ({per_m})" if total else "-"
        if total and missing:
            measured += f"; {missing} of the {len(SHAPES)} shapes not measured"
        out.append({"target": f"floor of done: GPTQ faster than recorded {label} in every cell with {where}, "
                              f"all {len(SHAPES)} shapes",
                    "measured": measured,
                    "met": False if wins < total else (None if missing or not total else True)})
    return out


def targets_table(rows) -> str:
    """Markdown table of :func:`targets` rows."""
    lines = ["| target | measured | met |", "|---|---|---|"]
    for t in rows:
        met = {True: "yes", False: "no", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return "\n".join(lines)


def report(cells, previous=None, previous_label="previous GPTQ", peers=None) -> str:
    """The whole markdown report: the results table and the targets."""
    peers = recorded_peers() if peers is None else peers
    k, n = TARGET_SHAPE
    return "\n".join([
        "## Results (µs per call, lower is better)", "",
        results_table(cells, previous, previous_label, peers), "",
        f"## Against the targets ({k}×{n}, GPTQ 4-bit g128)", "",
        targets_table(targets(cells, peers)), ""])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", metavar="IN.json", help="rows written by scripts/bench.py --json")
    p.add_argument("--previous", metavar="OLD.json", help="an earlier run, for its GPTQ column")
    p.add_argument("--markdown", metavar="OUT.md", help="also write the report to this file")
    a = p.parse_args(argv)
    try:
        cells = load_rows(a.json)
        previous = load_rows(a.previous) if a.previous else None
    except (OSError, ValueError) as exc:
        p.error(str(exc))
    label = f"GPTQ {Path(a.previous).stem}" if a.previous else "previous GPTQ"
    text = report(cells, previous, label)
    if a.markdown:
        Path(a.markdown).write_text(text, encoding="utf-8")
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
