"""scripts/tp_bench.py: importable, and its CPU dry run completes under torchrun with 2 gloo ranks."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "tp_bench.py"


def _load():
    spec = importlib.util.spec_from_file_location("tp_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_set_is_the_70b_decoder_layer():
    bench = _load()
    layers = {name: (k, n, mode) for name, k, n, mode in bench.layer_set()}
    assert layers["gate_proj"] == layers["up_proj"] == (8192, 28672, "column")
    assert layers["down_proj"] == (28672, 8192, "row")
    assert layers["o_proj"] == (8192, 8192, "row") and layers["k_proj"] == (8192, 1024, "column")
    assert all(k % 32 == 0 and n % 32 == 0 for _, k, n, _ in bench.layer_set(bench.DRY_RUN_DIVISOR))


def test_totals_add_products_and_reduces():
    bench = _load()
    rows = [dict(format="gptq", world_size=2, m=1, gemm_us=3.0, allreduce_us=None),
            dict(format="gptq", world_size=2, m=1, gemm_us=5.0, allreduce_us=2.0)]
    assert bench.totals(rows) == [dict(format="gptq", world_size=2, m=1, gemm_us=8.0, allreduce_us=2.0, total_us=10.0)]


def test_dry_run_under_torchrun_writes_json(tmp_path):
    out = tmp_path / "tp.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           str(SCRIPT), "--dry-run", "--ms", "1,16", "--iters", "2", "--json", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["dry_run"] and result["backend"] == "gloo"
    rows = result["rows"]
    assert len(rows) == 3 * 7 * 2 * 2  # formats x layers x world sizes {1, 2} x batch sizes
    for r in rows:
        assert r["gemm_us"] > 0
        assert (r["allreduce_us"] is not None) == (r["mode"] == "row" and r["world_size"] == 2)
        if r["world_size"] == 2:
            assert (r["K_local"], r["N_local"]) == ((r["K"] // 2, r["N"]) if r["mode"] == "row" else (r["K"], r["N"] // 2))
    assert {(t["format"], t["world_size"], t["m"]) for t in result["totals"]} == {
        (f, w, m) for f in ("gptq", "gptq_act", "exl2") for w in (1, 2) for m in (1, 16)}
