"""The ``cupyq`` command line: help, exit codes, tables, --json, and each command's CPU behaviour."""

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cupyq import cli, device, nvrtc, runtime
from cupyq.checkpoint import save_gptq
from cupyq.quantize import quantize_exl2, quantize_gptq

HAS_GPU = device.gpu_available()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_ckpt(tmp_path):
    """A small mixed directory: a GPTQ and an EXL2 layer, an fp16 head and a norm."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 128)).astype(np.float32) * 0.05
    gptq = quantize_gptq(w, bits=4, group_size=64, act_order=True, bias=rng.standard_normal(128))
    exl2 = quantize_exl2(w.T.copy(), bits=(8, 4), proportions=(0.5, 0.5))
    extra = {f"model.layers.0.mlp.down_proj.{k}": v for k, v in exl2.items()}
    extra["lm_head.weight"] = rng.standard_normal((64, 256)).astype(np.float16)
    extra["model.norm.weight"] = np.ones(256, np.float16)
    return save_gptq(tmp_path / "ckpt", {"model.layers.0.mlp.up_proj": gptq}, bits=4, group_size=64, desc_act=True,
                     sym=True, extra_tensors=extra)


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------ help


@pytest.mark.parametrize("command", [[], ["info"], ["inspect"], ["verify"], ["bench"], ["warmup"], ["compile"]])
def test_help_everywhere(command, capsys):
    code, out, _ = run(command + ["--help"], capsys)
    assert code == 0
    assert out.startswith("usage: cupyq")
    assert "--json" in out or not command


def test_usage_errors_exit_2(capsys):
    code, _, err = run([], capsys)
    assert code == 2 and "usage: cupyq" in err
    code, _, err = run(["frobnicate"], capsys)
    assert code == 2 and "invalid choice" in err
    code, _, err = run(["verify", "--m", "0"], capsys)
    assert code == 2 and "positive integer" in err
    code, _, err = run(["inspect"], capsys)
    assert code == 2 and "path" in err


def test_version(capsys):
    import cupyq

    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"cupyq {cupyq.__version__}"


# ------------------------------------------------------------------------------------------------ info


def test_info_text_and_json(capsys):
    code, out, _ = run(["info"], capsys)
    assert code == 0
    assert "kernel cache:" in out and str(runtime.kernel_cache_dir()) in out
    if not HAS_GPU:
        assert "GPU: none found" in out
    code, out, _ = run(["info", "--json"], capsys)
    payload = json.loads(out)
    assert code == 0
    assert payload["gpu_available"] == HAS_GPU
    assert payload["kernel_cache_dir"] == str(runtime.kernel_cache_dir())
    assert isinstance(payload["cached_kernel_files"], list)
    assert "cupy" in payload["device_summary"]


def test_info_lists_cached_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    (tmp_path / "abc123.cubin").write_bytes(b"x" * 2048)
    code, out, _ = run(["info"], capsys)
    assert code == 0 and "1 file(s), 2.0 KiB" in out and "abc123.cubin" in out


# ------------------------------------------------------------------------------------------------ inspect


def test_inspect_table(small_ckpt, capsys):
    code, out, _ = run(["inspect", str(small_ckpt)], capsys)
    assert code == 0
    lines = out.splitlines()
    assert "quantization config: gptq (from quantize_config.json): bits 4, group_size 64, desc_act True" in out
    header = next(line for line in lines if line.startswith("layer"))
    for col in ("format", "bits", "bits/weight", "group", "act-order", "in x out", "bytes"):
        assert col in header
    row = next(line for line in lines if line.startswith("model.layers.0.mlp.down_proj"))
    assert "exl2" in row and "8:50% 4:50%" in row and "128 x 256" in row
    row = next(line for line in lines if line.startswith("model.layers.0.mlp.up_proj"))
    assert "gptq" in row and "256 x 128" in row and " 64 " in row
    assert "total: 3 layers (1 exl2, 1 fp16, 1 gptq)" in out


def test_inspect_json(small_ckpt, capsys, tmp_path):
    code, out, _ = run(["inspect", str(small_ckpt), "--json"], capsys)
    payload = json.loads(out)
    assert code == 0
    layers = {entry["name"]: entry for entry in payload["layers"]}
    assert layers["model.layers.0.mlp.down_proj"]["bit_mix"] == [[8, 64], [4, 64]]
    assert layers["model.layers.0.mlp.up_proj"]["act_order"] is True
    assert layers["lm_head"]["format"] == "fp16"
    assert payload["totals"]["quantized_layers"] == 2
    assert payload["totals"]["quantized_weights"] == 2 * 256 * 128
    assert payload["quantization_config"]["group_size"] == 64
    # --json-out FILE keeps the table on stdout and writes the JSON to the file
    target = tmp_path / "inspect.json"
    code, out, _ = run(["inspect", str(small_ckpt), "--json-out", str(target)], capsys)
    assert code == 0 and out.startswith(str(small_ckpt)) and json.loads(target.read_text())["totals"]["layers"] == 3


def test_inspect_bad_input_exit_2(tmp_path, small_ckpt, capsys):
    code, _, err = run(["inspect", str(tmp_path / "nope")], capsys)
    assert code == 2 and "no such checkpoint" in err
    (small_ckpt / "quantize_config.json").write_text('{"bits": 5}')
    code, _, err = run(["inspect", str(small_ckpt)], capsys)
    assert code == 2 and "quantize_config.json" in err and "'bits'" in err


# ------------------------------------------------------------------------------------------------ verify


def test_verify_cpu_path(small_ckpt, capsys):
    code, out, _ = run(["verify", str(small_ckpt), "--cpu", "--m", "1,5"], capsys)
    assert code == 0, out
    assert "NO GPU KERNEL RAN" in out
    assert "all 2 layers passed" in out
    for name in ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"):
        assert any(line.startswith(name) for line in out.splitlines())
    assert "rel err m=1" in out and "rel err m=5" in out


def test_verify_json(small_ckpt, capsys):
    code, out, _ = run(["verify", str(small_ckpt), "--cpu", "--m", "3", "--json"], capsys)
    payload = json.loads(out)
    assert code == 0 and payload["passed"] and payload["gpu"] is False and payload["ms"] == [3]
    assert payload["tolerance"] == cli.DEFAULT_TOLERANCE
    for row in payload["layers"]:
        # the CPU path computes in float32 and rounds the output to the input's fp16
        assert 0 < row["max_rel_error"] < 1e-3 and row["ok"]


def test_verify_failure_exit_1(small_ckpt, capsys, monkeypatch):
    import cupyq.dispatch

    real = cupyq.dispatch.gemm
    wrong = lambda x, qm, *a, **k: real(x, qm) * 1.05  # noqa: E731
    monkeypatch.setattr(cupyq.dispatch, "gemm", wrong)
    monkeypatch.setattr(cupyq, "gemm", wrong, raising=False)  # the package keeps what it imported once
    code, out, _ = run(["verify", str(small_ckpt), "--cpu", "--m", "2"], capsys)
    assert code == 1
    assert "2 of 2 layers FAILED" in out
    code, out, _ = run(["verify", str(small_ckpt), "--cpu", "--m", "2", "--tolerance", "0.1"], capsys)
    assert code == 0


def test_verify_without_quantized_layers_exit_2(tmp_path, capsys):
    save_gptq(tmp_path, {}, bits=4, group_size=64, desc_act=False, sym=True,
              extra_tensors={"lm_head.weight": np.ones((8, 32), np.float16)})
    code, _, err = run(["verify", str(tmp_path)], capsys)
    assert code == 2 and "no GPTQ or EXL2 layers" in err


def test_verify_builtin_sample_cpu(capsys):
    code, out, _ = run(["verify", "--cpu", "--m", "1"], capsys)
    assert code == 0, out
    for name in ("sample gptq-4bit-g128-act", "sample gptq-3bit-g64-asym-v2", "sample exl2-mixed", "sample awq-4bit-g128"):
        assert name in out
    assert "all 11 layers passed" in out


def test_python_dash_m_entry_point(small_ckpt):
    proc = subprocess.run(
        [sys.executable, "-m", "cupyq", "verify", str(small_ckpt), "--cpu", "--m", "1", "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["passed"] is True


# ------------------------------------------------------------------------------------------------ bench / warmup


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU message")
@pytest.mark.parametrize("command", [["bench"], ["warmup"]])
def test_gpu_commands_without_gpu_exit_2(command, capsys):
    code, _, err = run(command, capsys)
    assert code == 2 and "none was found" in err


def test_bench_plot_without_matplotlib(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run(["bench", "--plot", str(tmp_path / "p.png")], capsys)
    assert code == 2 and "--plot needs matplotlib" in err


def test_bench_pivot_and_speedups():
    rows = [
        {"K": 64, "N": 32, "m": 1, "impl": "gptq", "us": 5.0},
        {"K": 64, "N": 32, "m": 1, "impl": "fp16", "us": 10.0},
        {"K": 64, "N": 32, "m": 8, "impl": "gptq", "us": 8.0},
        {"K": 64, "N": 32, "m": 8, "impl": "fp16", "us": 4.0},
        {"K": 64, "N": 32, "m": None, "impl": "int4", "us": None, "error": "not built"},
    ]
    table, impls = cli._speedup_rows(rows)
    assert impls == ["gptq", "fp16"]
    assert [(r["m"], r["x_gptq"]) for r in table] == [(1, 2.0), (8, 0.5)]


def test_bench_takes_comma_lists_and_the_flags_of_the_script(monkeypatch, capsys):
    """`cupyq bench` reads --m / --ms and --formats as comma lists, repeated or space-separated, in order."""
    import cupyq.bench

    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return [{"K": 64, "N": 32, "m": 1, "impl": "gptq", "us": 5.0}, {"K": 64, "N": 32, "m": 1, "impl": "fp16", "us": 10.0}]

    monkeypatch.setattr(device, "gpu_unavailable_reason", lambda: None)
    monkeypatch.setattr(cupyq.bench, "run_benchmark", fake_run)
    code, out, err = run(["bench", "--ms", "1,16", "--m", "4", "--m", "16", "--formats", "gptq,exl2", "gptq_act",
                          "--json"], capsys)
    assert code == 0, err
    assert seen["ms"] == [1, 16, 4] and seen["formats"] == ("gptq", "exl2", "gptq_act")
    assert json.loads(out)["table"][0]["x_gptq"] == 2.0


def test_bench_bad_lists_exit_2(capsys):
    code, _, err = run(["bench", "--m", "1", "16"], capsys)  # 16 lands on the checkpoint path
    assert code == 2 and "several row counts are written --m 1,16" in err
    code, _, err = run(["bench", "--formats", "gptq,int8"], capsys)
    assert code == 2 and "expected one of gptq, gptq_act, exl2" in err and "'gptq,int8'" in err
    code, _, err = run(["bench", "--ms", "1,,4"], capsys)
    assert code == 2 and "positive integers separated by commas" in err


def test_bench_script_takes_the_row_counts_of_cupyq_bench(monkeypatch, capsys):
    """scripts/bench.py (cupyq.bench.main) reads --ms / --m like `cupyq bench`."""
    import cupyq.bench

    seen = {}
    monkeypatch.setattr(cupyq.bench, "run_benchmark", lambda shapes, ms, **kwargs: seen.update(ms=ms) or [])
    monkeypatch.setattr(cupyq.bench, "host_overhead", lambda: {})
    monkeypatch.setattr(cupyq.bench, "summarize", lambda rows: "table")
    cupyq.bench.main(["--ms", "1,16", "--m", "4"])
    assert seen["ms"] == [1, 16, 4]
    cupyq.bench.main([])
    assert seen["ms"] is None
    with pytest.raises(SystemExit) as exc:
        cupyq.bench.main(["--m", "1,x"])
    assert exc.value.code == 2 and "positive integers separated by commas" in capsys.readouterr().err


def test_bench_model_dry_run(capsys, tmp_path):
    """`cupyq bench --model --dry-run`: the tiny model on the CPU through the whole flow, a JSON report."""
    pytest.importorskip("transformers")
    target = tmp_path / "model.json"
    code, out, err = run(["bench", "--model", "--dry-run", "--format", "exl2", "--json", "-o", str(target)], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report == json.loads(target.read_text())
    assert report["cupyq_report"]["command"] == "bench"
    assert report["format"] == "exl2" and report["config"]["layers"] == 2 and report["config"]["hidden"] == 128
    cases = [(r["case"], r["batch"], r["tokens"]) for r in report["rows"]]
    assert cases == [("decode", 1, 1), ("decode", 3, 1), ("prefill", 1, 16)]
    assert all(0 < r["max_abs_logit"] < 1e3 for r in report["rows"])  # finite, real logits
    code, out, err = run(["bench", "--model", "--dry-run"], capsys)
    assert code == 0, err
    assert out.startswith("gptq model: 2 decoder layer(s)") and "nothing was timed" in out


def test_bench_model_passes_its_options(monkeypatch, capsys):
    """--layers, --format, --batches and --prefill reach run_model_benchmark; the table shows the timed rows."""
    pytest.importorskip("transformers")
    from cupyq import model_bench

    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        row = {"case": "decode", "batch": 4, "tokens": 1, "fp16_ms": 2.0, "cupyq_ms": 1.0, "cupyq_ms_per_layer": 1 / 3,
               "fp16_ms_per_layer": 2 / 3, "cupyq_tokens_per_s": 4000.0, "speedup_over_fp16": 2.0,
               "fp16_eager_ms": 3.0, "cupyq_eager_ms": 2.5, "eager_speedup_over_fp16": 1.2}
        kwargs["progress"](row)
        return {"config": {"layers": 3, "hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8},
                "format": kwargs["fmt"], "rows": [row]}

    monkeypatch.setattr(device, "gpu_unavailable_reason", lambda: None)
    monkeypatch.setattr(model_bench, "run_model_benchmark", fake)
    code, out, err = run(["bench", "--model", "--layers", "3", "--format", "exl2", "--batches", "1,4", "--batches", "8",
                          "--prefill", "128"], capsys)
    assert code == 0, err
    assert seen["layers"] == 3 and seen["fmt"] == "exl2" and seen["dry_run"] is False
    assert seen["batches"] == [1, 4, 8] and seen["prefill"] == [128]
    assert "exl2 model: 3 decoder layer(s)" in out and "speed-up" in out and "eager speed-up" in out
    run(["bench", "--model"], capsys)
    assert seen["layers"] == model_bench.DEFAULT_LAYERS and seen["fmt"] == "gptq"
    assert seen["batches"] == list(model_bench.DEFAULT_BATCHES) and seen["prefill"] == list(model_bench.DEFAULT_PREFILL)


def test_bench_model_options_exit_2(capsys, tmp_path):
    code, _, err = run(["bench", "--layers", "2"], capsys)
    assert code == 2 and "--layers: option(s) of the model benchmark; add --model" in err
    code, _, err = run(["bench", "--dry-run", "--batches", "1"], capsys)
    assert code == 2 and "--batches, --dry-run" in err
    code, _, err = run(["bench", "--model", "--dry-run", "--m", "1", str(tmp_path)], capsys)
    assert code == 2 and "--model builds its own model: a checkpoint path, --m (options" in err
    code, _, err = run(["bench", "--model", "--format", "awq"], capsys)
    assert code == 2 and "invalid choice: 'awq'" in err
    code, _, err = run(["bench", "--model", "--layers", "0"], capsys)
    assert code == 2 and "positive integer" in err


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU message")
def test_bench_model_without_gpu_exit_2(capsys):
    pytest.importorskip("transformers")
    code, _, err = run(["bench", "--model"], capsys)
    assert code == 2 and "bench --model needs an NVIDIA GPU" in err


# ------------------------------------------------------------------------------------------------ compile


def test_compile_table_and_json(monkeypatch, capsys):
    calls = []

    def fake(archs, *, sources=None, progress=None, resources=False):
        calls.append((list(archs), sources))
        return [nvrtc.CompileReport("qgemm.cu", "sm_80", 1.5, 123456, [("k1", "_Z2k1"), ("k2", "_Z2k2")])]

    monkeypatch.setattr(nvrtc, "compile_sources", fake)
    code, out, _ = run(["compile", "--arch", "sm_80", "--arch", "90", "--source", "qgemm.cu"], capsys)
    assert code == 0 and calls == [(["sm_80", "90"], ["qgemm.cu"])]
    assert "qgemm.cu" in out and "123456" in out and "compiled 1 module(s)" in out
    code, out, _ = run(["compile", "--json"], capsys)
    assert calls[-1] == (["sm_80", "sm_90"], None)
    payload = json.loads(out)
    assert payload["ok"] and payload["reports"][0]["cubin_bytes"] == 123456


def test_compile_sources_in_parallel_threads_keeps_order(monkeypatch):
    import threading

    threads = set()

    def fake(arch, name):
        threads.add(threading.get_ident())
        time.sleep(0.3)
        return nvrtc.CompileReport(name, arch, 0.3, 1, [])

    monkeypatch.setattr(nvrtc, "_compile_source", fake)
    start = time.perf_counter()
    reports = nvrtc.compile_sources(["80", "sm_86", "sm_89", "90"], sources=["qgemm.cu"], workers=4)
    assert [r.arch for r in reports] == ["sm_80", "sm_86", "sm_89", "sm_90"]
    assert len(threads) > 1 and time.perf_counter() - start < 0.9  # four 0.3 s jobs, not one after another


def test_compile_error_exit_1_with_log(monkeypatch, capsys):
    def fake(archs, *, sources=None, progress=None, resources=False):
        raise nvrtc.CompileError('qgemm.cu for sm_80 failed:\nqgemm.cu(12): error: identifier "x" is undefined')

    monkeypatch.setattr(nvrtc, "compile_sources", fake)
    code, _, err = run(["compile", "--arch", "sm_80"], capsys)
    assert code == 1 and 'identifier "x" is undefined' in err


@pytest.mark.slow
def test_compile_real_sources(capsys):
    code, out, err = run(["compile", "--arch", "sm_80", "--json"], capsys)
    assert code == 0, err
    reports = json.loads(out)["reports"]
    sources = sorted(p.name for p in (REPO / "cuda_src").glob("*.cu"))
    assert sorted(r["source"] for r in reports) == sources
    assert all(r["arch"] == "sm_80" and r["cubin_bytes"] > 0 for r in reports)


# ------------------------------------------------------------------------------------------------ helpers


def test_progress_only_on_terminal_and_after_delay():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    quiet = io.StringIO()
    with cli.Progress(3, "x", stream=quiet, delay=0.0) as bar:
        bar.update("a")
    assert quiet.getvalue() == ""
    tty = Tty()
    with cli.Progress(2, "verify", stream=tty, delay=0.0) as bar:
        bar.update("layer one")
        assert "verify [" in tty.getvalue() and "1/2 layer one" in tty.getvalue()
    slow = Tty()
    with cli.Progress(2, "verify", stream=slow, delay=60.0) as bar:
        bar.update()
    assert slow.getvalue() == ""


def test_format_table_alignment():
    text = cli.format_table([{"a": "xx", "b": 1.5}, {"a": "y", "b": 10000.0}], [("name", "a"), ("value", "b")])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "value"]
    assert lines[2].endswith("  1.5") and lines[3].endswith("10000.0")
    assert len({len(line) for line in lines[1:]}) == 1


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_verify_gpu_sample(capsys):
    code, out, _ = run(["verify", "--json"], capsys)
    payload = json.loads(out)
    assert payload["gpu"] is True and payload["ms"] == list(cli.DEFAULT_MS)
    for row in payload["layers"]:
        print(row["layer"], row["format"], row["bits"], f"{row['max_rel_error']:.2e}")
    assert code == 0 and payload["passed"]


@pytest.mark.gpu
def test_warmup_gpu(small_ckpt, capsys):
    code, out, _ = run(["warmup", str(small_ckpt), "--json"], capsys)
    payload = json.loads(out)
    assert code == 0 and payload["layers"] == 2 and payload["warmup_seconds"] >= 0


@pytest.mark.gpu
def test_bench_gpu_small(small_ckpt, capsys, tmp_path):
    target = tmp_path / "bench.json"
    code, out, err = run(["bench", str(small_ckpt), "--m", "1,16", "--iters", "5", "--repeats", "1",
                          "--json-out", str(target)], capsys)
    assert code == 0, err
    payload = json.loads(target.read_text())
    impls = {r["impl"] for r in payload["rows"]}
    assert {"fp16", "exl2", "gptq_act"} <= impls
    assert "speed-up" in out


@pytest.mark.gpu
def test_bench_model_gpu_small(capsys):
    """`cupyq bench --model` with one Llama-3-8B-shaped layer: timed rows whose derived figures agree."""
    pytest.importorskip("transformers")
    code, out, err = run(["bench", "--model", "--layers", "1", "--format", "gptq", "--batches", "1,8", "--prefill", "64",
                          "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["config"] == {"layers": 1, "hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8}
    assert [(r["case"], r["batch"], r["tokens"]) for r in report["rows"]] == [("decode", 1, 1), ("decode", 8, 1),
                                                                              ("prefill", 1, 64)]
    for r in report["rows"]:
        assert r["fp16_ms"] > 0 and r["cupyq_ms"] > 0
        assert r["speedup_over_fp16"] == pytest.approx(r["fp16_ms"] / r["cupyq_ms"])
        assert r["cupyq_tokens_per_s"] == pytest.approx(r["batch"] * r["tokens"] * 1e3 / r["cupyq_ms"])


def test_info_shows_cuda_versions_as_versions(monkeypatch, capsys):
    """The text report turns CUDA's integer versions into major.minor, and a driver version of 0 into 'none';
    --json keeps the integers."""
    summary = {"gpus": [], "cupy": "14.2.0", "cuda_runtime": 13020, "cuda_driver": 0, "nvrtc": "13.5"}
    monkeypatch.setattr(device, "device_summary", lambda: dict(summary))
    code, out, _ = run(["info"], capsys)
    assert code == 0
    assert "CUDA runtime 13.2, CUDA driver none, NVRTC 13.5" in out and "13020" not in out
    code, out, _ = run(["info", "--json"], capsys)
    assert json.loads(out)["device_summary"]["cuda_runtime"] == 13020
