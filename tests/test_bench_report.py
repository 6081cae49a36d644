"""scripts/bench_report.py (the markdown report of a benchmark run) and the recorded peer figures it compares with.

The floor is recomputed here from the definition in BENCHMARKS.md's Method section; the peers of the table tests
are a small dictionary written here, so the logic is checked apart from the recorded data.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from cupyq import bench

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_report.py"
TABLE_MS = (1, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)  # the m values of BENCHMARKS.md's results table


def _load():
    spec = importlib.util.spec_from_file_location("bench_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load()


def expected_floor_us(k, n, m):
    """max(bytes ÷ 4.27 TB/s, 2·m·K·N ÷ 790 TFLOP/s) of GPTQ 4-bit g128, fp16 scales, 4-bit zeros, fp16 x and out."""
    groups = k // 128
    weights = k * n * 4 / 8
    scales = groups * n * 2
    zeros = groups * n * 4 / 8
    x_and_out = m * k * 2 + m * n * 2
    return max((weights + scales + zeros + x_and_out) / 4.27e12, 2 * m * k * n / 790e12) * 1e6


def parse_table(text):
    """Rows of the first markdown table in ``text`` as dicts keyed by heading."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return head, [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def _row(k, n, m, impl, us):
    return {"K": k, "N": n, "m": m, "impl": impl, "us": us, "graph_us": None if us is None else us * 1.02}


# Two shapes, three m values, with holes: 4096×4096 m = 16 has no GPTQ time (the row is there with us None), EXL2
# and AWQ were not run at m = 1024, fp16 is missing at 8192×28672 m = 1024, int4 could not run at all.
RUN = [
    _row(4096, 4096, 1, "gptq", 6.5), _row(4096, 4096, 1, "gptq_act", 8.0), _row(4096, 4096, 1, "exl2", 8.5),
    _row(4096, 4096, 1, "awq", 6.6), _row(4096, 4096, 1, "fp16", 11.5),
    _row(4096, 4096, 16, "gptq", None), _row(4096, 4096, 16, "gptq_act", 14.0), _row(4096, 4096, 16, "fp16", 12.0),
    _row(4096, 4096, 1024, "gptq", 70.0), _row(4096, 4096, 1024, "gptq_act", 80.0),
    _row(4096, 4096, 1024, "fp16", 45.0),
    _row(8192, 28672, 1, "gptq", 33.0), _row(8192, 28672, 1, "fp16", 110.0),
    _row(8192, 28672, 16, "gptq", 30.0), _row(8192, 28672, 16, "fp16", 108.0),
    _row(8192, 28672, 1024, "gptq", 600.0),
    {"K": 4096, "N": 4096, "m": None, "impl": "int4", "us": None, "error": "not built"},
]
# Marlin fastest at 4096×4096 m = 1, exllamav2 at 8192×28672 m = 16, fp16 (the run's) at 4096×4096 m = 1024;
# 8192×28672 m = 1 and m = 1024 have no recording.
PEERS = {
    "marlin-2026-12-01": {"gptq": {(4096, 4096): {1: 9.0, 16: 10.0, 1024: 95.0}, (8192, 28672): {16: 50.0}}},
    "exllamav2-2026-12-01": {"gptq": {(4096, 4096): {1: 10.0, 1024: 62.0}, (8192, 28672): {16: 40.0}}},
}


def _write(tmp_path, rows, name="run.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"rows": rows, "host_us": {}}))
    return path


def test_floor_formula():
    # 4096×4096, m = 1: 8 MiB of weights + 256 KiB of scales + 64 KiB of zeros + 8 KiB of x + 8 KiB of output
    assert report.floor_us(4096, 4096, 1) == pytest.approx(8_732_672 / 4.27e12 * 1e6)
    # 8192×28672, m = 4096: the multiply bounds it
    assert report.floor_us(8192, 28672, 4096) == pytest.approx(2 * 4096 * 8192 * 28672 / 790e12 * 1e6)
    for k, n, m in [(4096, 14336, 8), (14336, 4096, 256), (28672, 8192, 1024)]:
        assert report.floor_us(k, n, m) == pytest.approx(expected_floor_us(k, n, m))
    # a short last group still carries a scale and a zero row
    assert report.floor_us(200, 64, 1, group_size=128) == pytest.approx(
        (200 * 64 / 2 + 2 * 2 * 64 + 2 * 64 / 2 + 2 * 200 + 2 * 64) / 4.27e12 * 1e6)


def test_table_floor_percentages_peers_and_holes(tmp_path):
    cells = report.load_rows(_write(tmp_path, RUN))
    head, rows = parse_table(report.results_table(cells, peers=PEERS))
    assert head[:8] == ["K×N", "m", "GPTQ", "act-order", "EXL2", "AWQ", "fp16", "GPTQ % of floor"]
    assert "GPTQ bf16" not in head and not any("previous" in h for h in head)
    assert [(r["K×N"], r["m"]) for r in rows] == [("4096×4096", "1"), ("4096×4096", "16"), ("4096×4096", "1024"),
                                                  ("8192×28672", "1"), ("8192×28672", "16"), ("8192×28672", "1024")]
    by = {(r["K×N"], int(r["m"])): r for r in rows}
    for (shape, m), r in by.items():
        k, n = map(int, shape.split("×"))
        gptq = {(rr["K"], rr["N"], rr["m"]): rr["us"] for rr in RUN if rr["impl"] == "gptq"}.get((k, n, m))
        if gptq is None:
            assert r["GPTQ % of floor"] == "-" and r["GPTQ"] == "-"
            continue
        pct = float(r["GPTQ % of floor"].removesuffix(" %"))
        assert abs(pct - 100 * expected_floor_us(k, n, m) / gptq) <= 0.5, (shape, m)
    best = "GPTQ vs best peer (rec. or fp16)"
    assert by["4096×4096", 1][best] == f"{9.0 / 6.5:.2f}×"  # Marlin
    assert by["8192×28672", 16][best] == f"{40.0 / 30.0:.2f}×"  # exllamav2
    assert by["4096×4096", 1024][best] == f"{45.0 / 70.0:.2f}×"  # the run's fp16
    assert by["8192×28672", 1][best] == f"{110.0 / 33.0:.2f}×"  # no recording: fp16 alone
    assert by["8192×28672", 1024][best] == "-"  # neither a recording nor fp16
    assert by["4096×4096", 16][best] == "-"  # no GPTQ time
    assert by["4096×4096", 16]["Marlin (rec.)"] == "10.0" and by["4096×4096", 16]["exllamav2 GPTQ (rec.)"] == "-"
    assert by["4096×4096", 1024]["EXL2"] == by["4096×4096", 1024]["AWQ"] == "-"
    assert by["4096×4096", 1]["act-order"] == "8.0" and by["8192×28672", 1024]["fp16"] == "-"


def test_best_peer():
    assert report.best_peer(PEERS, 4096, 4096, 1) == (9.0, "Marlin (rec.)")
    assert report.best_peer(PEERS, 4096, 4096, 1, fp16_us=8.9) == (8.9, "fp16")
    assert report.best_peer(PEERS, 8192, 28672, 16, fp16_us=108.0) == (40.0, "exllamav2 GPTQ (rec.)")
    assert report.best_peer(PEERS, 8192, 8192, 1) is None


def test_bf16_and_previous_columns(tmp_path):
    run = RUN + [_row(8192, 28672, 16, "gptq_bf16", 31.0)]
    previous = report.load_rows(_write(tmp_path, [_row(4096, 4096, 1, "gptq", 6.9), _row(8192, 28672, 16, "exl2", 9.0)],
                                       "old.json"))
    head, rows = parse_table(report.results_table(report.load_rows(_write(tmp_path, run)), previous, "GPTQ old",
                                                  peers=PEERS))
    assert head.index("AWQ") < head.index("GPTQ bf16") < head.index("fp16")
    assert head.index("GPTQ % of floor") < head.index("GPTQ old") < head.index("Marlin (rec.)")
    by = {(r["K×N"], int(r["m"])): r for r in rows}
    assert by["8192×28672", 16]["GPTQ bf16"] == "31.0" and by["8192×28672", 1]["GPTQ bf16"] == "-"
    assert by["4096×4096", 1]["GPTQ old"] == "6.9" and by["8192×28672", 16]["GPTQ old"] == "-"


def _target(rows, start):
    found = [t for t in rows if t["target"].startswith(start)]
    assert len(found) == 1, (start, rows)
    return found[0]


def test_targets():
    k, n = 8192, 28672
    cells = {
        (k, n, 16): {"gptq": 30.0, "gptq_bf16": 31.0},  # ≤ 36: met; bf16 1.033×
        (k, n, 64): {"gptq": 56.0},  # ≤ 55: not met
        (k, n, 1024): {"gptq": 600.0, "fp16": 580.0, "gptq_bf16": 640.0},  # 0.967 ≥ 0.95; bf16 1.067×: not met
        (k, n, 4096): {"gptq": 2000.0, "fp16": 1900.0},  # 0.95 < 0.97
        (4096, 4096, 1): {"gptq": 6.5}, (4096, 4096, 16): {"gptq": 12.0}, (4096, 4096, 1024): {"gptq": 70.0},
    }
    rows = report.targets(cells, PEERS)
    assert _target(rows, "8192×28672 m = 16:")["met"] is True
    assert _target(rows, "8192×28672 m = 16:")["measured"] == "30.0 µs"
    assert _target(rows, "8192×28672 m = 32:")["met"] is None  # not measured
    assert _target(rows, "8192×28672 m = 64:")["met"] is False
    t = _target(rows, "8192×28672 m = 1024:")
    assert t["met"] is True and f"{580 / 600:.2f} × fp16" in t["measured"]
    assert _target(rows, "8192×28672 m = 4096:")["met"] is False
    t = _target(rows, "8192×28672: GPTQ with bf16")
    assert t["met"] is False and t["measured"].startswith(f"worst {640 / 600:.3f}× at m = 1024")
    # Marlin, m <= 256: 4096×4096 m = 1 (6.5 < 9.0) yes, m = 16 (12.0 > 10.0) no, 8192×28672 m = 16 (30 < 50) yes
    t = _target(rows, "floor of done: GPTQ faster than recorded Marlin")
    assert t["met"] is False and t["measured"].startswith("2 of 3 cells") and "m = 16: 1/2" in t["measured"]
    # exllamav2, m >= 512: 4096×4096 m = 1024 (70 > 62) no; 8192×28672 m = 1024 has no recording
    t = _target(rows, "floor of done: GPTQ faster than recorded exllamav2")
    assert t["met"] is False and t["measured"].startswith("0 of 1 cells")
    assert "5 of the 6 shapes not measured" in t["measured"]  # only 4096×4096 has both figures
    assert report.targets({}, PEERS) and all(t["met"] is None for t in report.targets({}, PEERS))
    # the floor of done is met only over all six shapes: wins on two shapes alone are not enough
    wins_on_two = {(4096, 4096, 1): {"gptq": 6.5}, (k, n, 16): {"gptq": 30.0}}
    assert _target(report.targets(wins_on_two, PEERS), "floor of done: GPTQ faster than recorded Marlin")["met"] is None
    six = {(kk, nn, 1): {"gptq": 5.0} for kk, nn in bench.SHAPES}
    six_peers = {"marlin-2026-12-01": {"gptq": {shape: {1: 6.0} for shape in bench.SHAPES}}}
    t = _target(report.targets(six, six_peers), "floor of done: GPTQ faster than recorded Marlin")
    assert t["met"] is True and t["measured"] == "6 of 6 cells (m = 1: 6/6)"
    table = report.targets_table(rows)
    assert "| not measured |" in table and "| yes |" in table and "| no |" in table


def test_main_writes_the_report(tmp_path, capsys):
    run, old, out = _write(tmp_path, RUN), _write(tmp_path, RUN[:3], "h200-old.json"), tmp_path / "report.md"
    report.main([str(run), "--previous", str(old), "--markdown", str(out)])
    printed = capsys.readouterr().out
    assert printed == out.read_text(encoding="utf-8")
    assert "| GPTQ h200-old |" in printed and "## Against the targets (8192×28672, GPTQ 4-bit g128)" in printed


def test_main_rejects_a_file_that_is_not_a_run(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(SystemExit) as exc:
        report.main([str(bad)])
    assert exc.value.code == 2 and "bad.json" in capsys.readouterr().err
    bad.write_text(json.dumps({"rows": [{"K": 1, "N": 2}]}))
    with pytest.raises(ValueError, match="bad.json: row 0 lacks"):
        report.load_rows(bad)
    bad.write_text("{")
    with pytest.raises(ValueError, match="bad.json: not JSON"):
        report.load_rows(bad)
    with pytest.raises(SystemExit) as exc:
        report.main([str(tmp_path / "missing.json")])
    assert exc.value.code == 2 and "missing.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- recorded peer figures


def test_recorded_peers_cover_the_table():
    peers = bench.recorded_peers()
    for recording in (report.MARLIN, report.EXLLAMAV2):
        cells = peers[recording]["gptq"]
        assert sorted(cells) == sorted(bench.SHAPES), recording
        for shape in bench.SHAPES:
            assert sorted(cells[shape]) == list(TABLE_MS), (recording, shape)
            assert all(isinstance(us, float) and us > 0 for us in cells[shape].values())
    upstream = peers[bench.UPSTREAM_RECORDING]
    assert sorted(upstream) == sorted(bench.UPSTREAM_IMPLS)
    for impl in bench.UPSTREAM_IMPLS:
        assert sorted(upstream[impl]) == sorted(bench.SHAPES)
        assert all(sorted(upstream[impl][s]) == bench.MS for s in bench.SHAPES)
    # spot values, as recorded
    assert peers[report.MARLIN]["gptq"][(8192, 28672)][16] == 49.5
    assert peers[report.EXLLAMAV2]["gptq"][(8192, 28672)][4096] == 2665.0
    assert peers[report.MARLIN]["gptq"][(28672, 8192)][4096] == 5725.1


def test_upstream_us_is_derived_from_the_recording():
    upstream = bench.recorded_peers()[bench.UPSTREAM_RECORDING]
    assert sorted(bench.UPSTREAM_US) == sorted(bench.SHAPES)
    for shape, by_m in bench.UPSTREAM_US.items():
        for m, figures in by_m.items():
            assert figures == tuple(upstream[impl][shape][m] for impl in bench.UPSTREAM_IMPLS)
    assert bench.UPSTREAM_US[(4096, 4096)][128] == (30.1, 32.2, 28.6)


def test_recorded_peers_file_describes_each_recording():
    doc = json.loads((ROOT / "benchmarks" / bench.RECORDED_PEERS_FILE).read_text(encoding="utf-8"))
    assert "µs per call" in doc["about"]
    for name, rec in doc["recordings"].items():
        assert {"runtime", "date", "setup", "us"} <= rec.keys(), name
        assert name.endswith(rec["date"])
