"""The model benchmark (cupyq.model_bench) end to end through scripts/model_bench.py on a tiny Llama on the CPU
(--dry-run): the checkpoint of random quantized tensors is written, loaded into a meta-device model by
patch_model, and both models run every case."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("fmt", ["gptq", "exl2"])
def test_model_bench_dry_run(tmp_path, fmt):
    pytest.importorskip("transformers")
    out = tmp_path / "model.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "model_bench.py"), "--dry-run", "--format", fmt,
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["format"] == fmt and report["config"]["layers"] == 2
    cases = [(r["case"], r["batch"], r["tokens"]) for r in report["rows"]]
    assert cases == [("decode", 1, 1), ("decode", 3, 1), ("prefill", 1, 16)]
    assert all(0 < r["max_abs_logit"] < 1e3 for r in report["rows"])  # finite, real logits


def test_run_model_benchmark_refuses_bad_arguments():
    from cupyq.model_bench import run_model_benchmark

    with pytest.raises(ValueError, match="fmt: expected one of gptq, exl2, got 'awq'"):
        run_model_benchmark(fmt="awq", dry_run=True)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="layers: expected a positive int"):
            run_model_benchmark(layers=bad, dry_run=True)


def test_time_eager_alternates_the_models_in_rounds_between_synchronisations():
    from cupyq.model_bench import time_eager

    events = []
    ms = time_eager({"a": lambda: events.append("a"), "b": lambda: events.append("b")},
                    lambda: events.append("sync"), warmup=2, per_round=3, rounds=2)
    one_round = ["sync"] + ["a"] * 3 + ["sync"] + ["sync"] + ["b"] * 3 + ["sync"]
    assert events == ["a"] * 2 + ["b"] * 2 + one_round * 2
    assert set(ms) == {"a", "b"} and all(v > 0 for v in ms.values())
