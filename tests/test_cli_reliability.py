"""The command line loses nothing and hides nothing: options never swallow paths, output files never replace
what is not a cupyq report, JSON is valid and stable (errors included), a missing CuPy or GPU is named, bad
arguments exit 2 without a traceback, long compiles show progress and stop at Ctrl-C."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cupyq.sources import cuda_source_dir
from cupyq import cli, device, nvrtc, runtime
from cupyq.checkpoint import save_gptq
from cupyq.quantize import quantize_gptq

HAS_GPU = device.gpu_available()
REPO = Path(__file__).resolve().parents[1]


def _strict_json(text):
    """json.loads that refuses Infinity / NaN (which json.loads accepts by default but JSON does not)."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): _digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def ckpt(tmp_path):
    """A small GPTQ directory (one 4-bit layer, 128 x 64)."""
    w = np.random.default_rng(3).standard_normal((128, 64)).astype(np.float32) * 0.05
    layer = quantize_gptq(w, bits=4, group_size=32, act_order=False)
    return save_gptq(tmp_path / "model", {"model.layers.0.mlp.up_proj": layer}, bits=4, group_size=32,
                     desc_act=False, sym=True)


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------ item 1


def test_json_flag_never_takes_the_weights_file(ckpt, capsys):
    weights = ckpt / "model.safetensors"
    before = _digest(weights)
    code, out, err = run(["verify", "--json", str(weights), "--cpu", "--m", "1"], capsys)
    assert _digest(weights) == before
    payload = _strict_json(out)
    assert code == 0, err
    assert payload["sample"] is False and [r["layer"] for r in payload["layers"]] == ["model.layers.0.mlp.up_proj"]


def test_json_flag_before_a_directory(ckpt, capsys):
    before = _tree_digest(ckpt)
    code, out, _ = run(["verify", "--json", str(ckpt), "--cpu", "--m", "2"], capsys)
    assert code == 0 and _strict_json(out)["passed"] is True
    code, out, _ = run(["inspect", "--json", str(ckpt)], capsys)
    assert code == 0 and _strict_json(out)["totals"]["quantized_layers"] == 1
    assert _tree_digest(ckpt) == before


def test_m_does_not_swallow_the_path(ckpt, capsys):
    before = _tree_digest(ckpt)
    code, _, err = run(["verify", "--cpu", "--m", "1", "7", str(ckpt)], capsys)
    assert code == 2 and "7: no such checkpoint directory" in err and "--m 1,7" in err
    code, out, _ = run(["verify", "--cpu", "--m", "1,7", str(ckpt), "--json"], capsys)
    assert code == 0 and _strict_json(out)["ms"] == [1, 7]
    code, out, _ = run(["verify", "--cpu", "--m", "1", "--m", "7", "--m", "1", str(ckpt), "--json"], capsys)
    assert code == 0 and _strict_json(out)["ms"] == [1, 7]
    assert _tree_digest(ckpt) == before


@pytest.mark.parametrize("bad", ["0", "1,,2", "a", "1,-3", ",", "2.5"])
def test_m_bad_values_exit_2(bad, capsys):
    code, _, err = run(["verify", "--cpu", "--m", bad], capsys)
    assert code == 2 and "--m" in err and "positive integer" in err


def test_json_out_refuses_a_file_that_is_not_a_report(ckpt, capsys):
    weights = ckpt / "model.safetensors"
    before = _digest(weights)
    for option in ("--json-out", "-o"):
        code, out, err = run(["verify", "--cpu", "--m", "1", str(ckpt), option, str(weights)], capsys)
        assert code == 2 and "is not a JSON report written by cupyq; refusing to overwrite" in err
        assert out == ""  # refused before any work
        assert _digest(weights) == before
    other = ckpt.parent / "notes.json"
    other.write_text('{"mine": true}\n')
    code, _, err = run(["inspect", str(ckpt), "-o", str(other)], capsys)
    assert code == 2 and other.read_text() == '{"mine": true}\n'


def test_json_out_writes_and_replaces_its_own_report(ckpt, tmp_path, capsys):
    target = tmp_path / "report.json"
    code, out, err = run(["inspect", str(ckpt), "--json-out", str(target)], capsys)
    assert code == 0 and out.startswith(str(ckpt)) and f"wrote {target}" in err
    first = _strict_json(target.read_text())
    assert first[cli.REPORT_KEY]["command"] == "inspect"
    code, out, _ = run(["verify", "--cpu", "--m", "1", str(ckpt), "-o", str(target)], capsys)
    assert code == 0 and "rel err m=1" in out
    assert _strict_json(target.read_text())[cli.REPORT_KEY]["command"] == "verify"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".report")) == []  # no temporary left


def test_json_out_directory_or_missing_folder_exit_2(ckpt, tmp_path, capsys):
    code, _, err = run(["inspect", str(ckpt), "--json-out", str(tmp_path)], capsys)
    assert code == 2 and "is a directory" in err
    code, _, err = run(["inspect", str(ckpt), "--json-out", str(tmp_path / "no" / "r.json")], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run(["compile", "--json-out", str(tmp_path)], capsys)
    assert code == 2 and "is a directory" in err


def test_help_documents_the_output_and_m_forms(capsys):
    code, out, _ = run(["verify", "--help"], capsys)
    flat = " ".join(out.split())
    assert code == 0 and "--json-out FILE, -o FILE" in out and "--m 1,7 or --m 1 --m 7" in flat
    assert "replaced only when it is a JSON report written by cupyq" in flat


# ------------------------------------------------------------------------------------------------ item 14


def test_info_without_cupy_names_the_fix(monkeypatch, capsys, no_cupy):
    code, out, _ = run(["info"], capsys)
    assert code == 0
    assert "CuPy is not installed" in out and "pip install 'cupyq[cuda12]'" in out
    assert "`cupyq compile` need CuPy" in out and "`cupyq compile` can" not in out
    code, out, _ = run(["info", "--json"], capsys)
    payload = _strict_json(out)
    assert payload["can_compile"] is False and "CuPy is not installed" in payload["gpu_unavailable_reason"]


def test_compile_without_cupy_exit_2(monkeypatch, capsys, no_cupy):
    code, _, err = run(["compile", "--arch", "sm_80"], capsys)
    assert code == 2 and "needs CuPy, which is not installed" in err and "cupyq[cuda13]" in err
    assert "Traceback" not in err and "ModuleNotFoundError:" not in err
    assert "NVRTC compile(s)" not in err  # no compile is announced that cannot start


def test_verify_without_cupy_says_why(ckpt, monkeypatch, capsys, no_cupy):
    code, out, _ = run(["verify", str(ckpt), "--m", "1"], capsys)
    assert code == 0
    assert "NO GPU KERNEL RAN" in out and "CuPy is not installed" in out and "no GPU was found" not in out


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU message")
@pytest.mark.parametrize("command", [["bench"], ["warmup"]])
def test_gpu_commands_name_the_cause(command, monkeypatch, capsys, no_cupy):
    code, _, err = run(command, capsys)
    assert code == 2 and "CuPy is not installed" in err


# ------------------------------------------------------------------------------------------------ item 15


@pytest.mark.skipif(HAS_GPU, reason="checks the machine without a GPU")
def test_require_gpu_fails_without_a_gpu(ckpt, capsys):
    code, out, err = run(["verify", str(ckpt), "--require-gpu"], capsys)
    assert code == 1 and "--require-gpu" in err and "FAILED" in out
    code, out, _ = run(["verify", str(ckpt), "--require-gpu", "--json"], capsys)
    payload = _strict_json(out)
    assert code == 1 and payload["passed"] is False and payload["gpu"] is False and payload["layers"] == []
    code, _, _ = run(["verify", str(ckpt), "--m", "1"], capsys)
    assert code == 0  # without the option a CPU-only machine still passes


def test_require_gpu_with_cpu_is_a_usage_error(capsys):
    code, _, err = run(["verify", "--cpu", "--require-gpu"], capsys)
    assert code == 2 and "contradict" in err


def test_require_gpu_in_help(capsys):
    code, out, _ = run(["verify", "--help"], capsys)
    assert code == 0 and "--require-gpu" in out and "exits 0" in " ".join(out.split())


# ------------------------------------------------------------------------------------------------ item 16


@pytest.mark.parametrize("arch", ["banana", "", "foo", "sm_75", "7.0", "sm_"])
def test_compile_bad_arch_exit_2(arch, capsys):
    code, _, err = run(["compile", "--arch", arch], capsys)
    assert code == 2 and "argument --arch" in err and "Traceback" not in err


@pytest.mark.parametrize("source", ["../x", "../setup.cfg", "qdq.cuh", "nope.cu", "", "/etc/passwd"])
def test_compile_bad_source_exit_2(source, capsys):
    code, _, err = run(["compile", "--source", source], capsys)
    assert code == 2 and "argument --source" in err and "qgemm.cu" in err


# ------------------------------------------------------------------------------------------------ item 17


def test_verify_nonfinite_output_is_valid_json(ckpt, monkeypatch, capsys):
    import cupyq.dispatch

    real = cupyq.dispatch.gemm

    def broken(x, qm, *a, **k):
        y = np.array(real(x, qm), copy=True)
        y[0, 0] = np.inf
        return y

    monkeypatch.setattr(cupyq.dispatch, "gemm", broken)
    monkeypatch.setattr(cupyq, "gemm", broken, raising=False)  # the package keeps what it imported once
    code, out, _ = run(["verify", str(ckpt), "--cpu", "--m", "1,3", "--json"], capsys)
    payload = _strict_json(out)
    assert code == 1 and payload["passed"] is False
    row = payload["layers"][0]
    assert row["finite"] is False and row["max_rel_error"] is None and row["ok"] is False
    assert [r["error"] for r in row["results"]] == [None, None]


def test_verify_schema_does_not_depend_on_m(ckpt, capsys):
    keys = []
    for ms in ("1", "2,5"):
        code, out, _ = run(["verify", str(ckpt), "--cpu", "--m", ms, "--json"], capsys)
        payload = _strict_json(out)
        assert code == 0
        keys.append((sorted(payload), sorted(payload["layers"][0])))
        results = payload["layers"][0]["results"]
        assert [r["m"] for r in results] == [int(m) for m in ms.split(",")]
        for r in results:
            assert sorted(r) == ["error", "m", "us"] and 0 < r["error"] < 1e-3 and r["us"] > 0
    assert keys[0] == keys[1]


@pytest.mark.parametrize("argv", [
    ["inspect", "--json", "/nonexistent/checkpoint"],
    ["verify", "--json", "--m", "0"],
    ["compile", "--json", "--arch", "banana"],
    ["verify", "--json", "--cpu", "--require-gpu"],
    ["inspect", "--json"],
])
def test_errors_under_json_are_json(argv, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2 and err
    payload = _strict_json(out)
    assert isinstance(payload["error"], str) and payload["error"]
    assert payload[cli.REPORT_KEY]["command"] == argv[0]


def test_error_report_replaces_a_stale_report(ckpt, tmp_path, capsys):
    target = tmp_path / "r.json"
    assert run(["inspect", str(ckpt), "-o", str(target)], capsys)[0] == 0
    code, _, _ = run(["inspect", str(tmp_path / "gone"), "-o", str(target)], capsys)
    assert code == 2 and "error" in _strict_json(target.read_text())  # not the previous run's figures


def test_every_report_is_strict_json(ckpt, monkeypatch, capsys):
    for argv in (["info", "--json"], ["inspect", str(ckpt), "--json"], ["verify", str(ckpt), "--cpu", "--m", "1",
                                                                          "--json"]):
        code, out, _ = run(argv, capsys)
        assert code == 0 and _strict_json(out)[cli.REPORT_KEY]["command"] == argv[0]

    def fake(archs, *, sources=None, progress=None, resources=False):
        return [nvrtc.CompileReport("qgemm.cu", "sm_80", float("inf"), 10, [("k", "_Zk")])]

    monkeypatch.setattr(nvrtc, "compile_sources", fake)
    code, out, _ = run(["compile", "--json"], capsys)
    assert code == 0 and _strict_json(out)["reports"][0]["seconds"] is None


# ------------------------------------------------------------------------------------------------ item 18


def _fake_compile(delays, started):
    def fake(arch, name):
        started.append(arch)
        time.sleep(delays.get(arch, 0.05))
        return nvrtc.CompileReport(name, arch, delays.get(arch, 0.05), 1, [])

    return fake


def test_compile_sources_reports_progress(monkeypatch):
    started, seen = [], []
    monkeypatch.setattr(nvrtc, "_compile_source", _fake_compile({"sm_80": 0.4, "sm_90": 0.05}, started))
    reports = nvrtc.compile_sources(["sm_80", "sm_90"], sources=["qgemm.cu"], workers=2, progress=seen.append)
    assert [r.arch for r in reports] == ["sm_80", "sm_90"]  # job order
    assert [r.arch for r in seen] == ["sm_90", "sm_80"]  # completion order
    seen.clear()
    nvrtc.compile_sources(["sm_86"], sources=["qgemm.cu"], progress=seen.append)
    assert [r.arch for r in seen] == ["sm_86"]


def test_compile_sources_stops_promptly_on_interrupt(monkeypatch):
    started = []
    delays = {"sm_80": 0.05, "sm_86": 3.0, "sm_89": 3.0, "sm_90": 3.0, "sm_90a": 3.0, "sm_100": 3.0}
    monkeypatch.setattr(nvrtc, "_compile_source", _fake_compile(delays, started))

    def interrupt(report):
        raise KeyboardInterrupt

    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        nvrtc.compile_sources(list(delays), sources=["qgemm.cu"], workers=2, progress=interrupt)
    assert time.perf_counter() - start < 1.5  # not waiting for the 3 s compiles
    time.sleep(0.2)
    assert len(started) <= 3  # the jobs not yet started were dropped


def test_compile_sources_error_drops_the_rest(monkeypatch):
    started = []

    def fake(arch, name):
        started.append(arch)
        if arch == "sm_80":
            raise nvrtc.CompileError("qgemm.cu for sm_80 failed: boom")
        time.sleep(0.5)
        return nvrtc.CompileReport(name, arch, 0.5, 1, [])

    monkeypatch.setattr(nvrtc, "_compile_source", fake)
    with pytest.raises(nvrtc.CompileError, match="boom"):
        nvrtc.compile_sources(["sm_80", "sm_86", "sm_89", "sm_90", "sm_100"], sources=["qgemm.cu"], workers=2)
    assert "sm_80" in started and set(started) <= {"sm_80", "sm_86"}  # the pending ones never started


def test_compile_command_prints_progress(monkeypatch, capsys):
    def fake(archs, *, sources=None, progress=None, resources=False):
        reports = [nvrtc.CompileReport("qgemm.cu", a, 1.25, 10, []) for a in archs]
        for r in reports:
            progress(r)
        return reports

    monkeypatch.setattr(nvrtc, "compile_sources", fake)
    code, out, err = run(["compile", "--arch", "sm_80", "--arch", "sm_90", "--json"], capsys)
    assert code == 0 and _strict_json(out)["ok"]
    sources = len(list(cuda_source_dir().glob("*.cu")))
    assert f"{2 * sources} NVRTC compile(s) for sm_80, sm_90" in err
    assert "compiled qgemm.cu for sm_80 in 1.2 s" in err and "compiled qgemm.cu for sm_90" in err


def test_compile_command_interrupted_exit_130(monkeypatch, capsys):
    def fake(archs, *, sources=None, progress=None, resources=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(nvrtc, "compile_sources", fake)
    code, _, err = run(["compile"], capsys)
    assert code == 130 and "interrupted" in err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_compile_process_stops_at_ctrl_c():
    """A real `cupyq compile` (two NVRTC compiles of ~20 s) exits within seconds of SIGINT."""
    pytest.importorskip("cupy")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "cupyq", "compile", "--arch", "sm_80", "--arch", "sm_86"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "NVRTC compile(s)" in line, line
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        start = time.perf_counter()
        code = proc.wait(timeout=10)
        assert time.perf_counter() - start < 5
        assert code == 130, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_runtime_warmup_reports_each_matrix():
    class FakeMatrix:
        def __init__(self):
            self.max_m = None

        def warmup(self, *, max_m):
            self.max_m = max_m

        def needed_kernels(self, *, max_m):
            return set()

    mats = [FakeMatrix() for _ in range(3)]
    seen = []
    seconds = runtime.warmup(mats, max_m=16, progress=lambda i, qm: seen.append((i, qm)))
    assert seconds >= 0 and [i for i, _ in seen] == [0, 1, 2] and all(qm.max_m == 16 for qm in mats)
    assert [qm for _, qm in seen] == mats


@pytest.mark.gpu
def test_warmup_command_shows_progress(ckpt, capsys):
    code, out, err = run(["warmup", str(ckpt), "--max-m", "8", "--json"], capsys)
    assert code == 0 and _strict_json(out)["layers"] == 1
    assert "warmup: compiling and loading the kernels of 1 layer(s)" in err


@pytest.mark.gpu
def test_verify_require_gpu_passes_on_a_gpu(ckpt, capsys):
    code, out, _ = run(["verify", str(ckpt), "--require-gpu", "--m", "1,7,64", "--json"], capsys)
    payload = _strict_json(out)
    assert code == 0 and payload["gpu"] is True and payload["passed"] is True
