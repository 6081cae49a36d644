"""What an install brings and what a machine supports: the CUDA extras carry every library the GPU path
loads, GPUs older than sm_80 and mismatched CUDA majors are named clearly, a missing CuPy names the fix, and
the offline compile check uses exactly the options of the run time.

CuPy and GPUs are faked (sys.modules, monkeypatch), so everything here runs on a CPU-only machine.
"""

import configparser
import re
import sys
import types
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from cupyq import device, kernels, nvrtc, runtime
from cupyq.quantize import quantize_exl2, quantize_gptq

REPO = Path(__file__).resolve().parents[1]

try:  # before any test fakes CuPy: torch's first import inspects the loaded modules and would trip over a fake
    import torch  # noqa: F401
except ImportError:
    pass

# Library files the GPU path opens, by the cuda-toolkit component (extra) whose wheel ships them:
# NVRTC and its builtins compile the kernels, the CUDA runtime serves CuPy and the NVRTC headers,
# cuBLAS (and cuBLASLt, which it loads) runs cupy.matmul for the dense path of large batches.
GPU_PATH_LIBRARIES = {
    "nvrtc": ("libnvrtc.so", "libnvrtc-builtins.so"),
    "cudart": ("libcudart.so",),
    "cublas": ("libcublas.so", "libcublasLt.so"),
}


def _extras():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    raw = cfg["options.extras_require"]
    return {name: [line.strip() for line in raw[name].splitlines() if line.strip()] for name in raw}


def _toolkit_components(requirement: str):
    """(components, version spec) of a ``cuda-toolkit[a,b]==13.*`` requirement line."""
    m = re.fullmatch(r"cuda-toolkit\[([a-z0-9_,]+)\](.*)", requirement)
    assert m, f"not a cuda-toolkit requirement: {requirement!r}"
    return set(m.group(1).split(",")), m.group(2)


@pytest.mark.parametrize("extra", ["cuda12", "cuda13"])
def test_cuda_extras_name_every_component_of_the_gpu_path(extra):
    lines = _extras()[extra]
    major = extra.removeprefix("cuda")
    assert f"cupy-cuda{major}x" in lines
    toolkit = [line for line in lines if line.startswith("cuda-toolkit")]
    assert len(toolkit) == 1, lines
    components, spec = _toolkit_components(toolkit[0])
    assert spec == f"=={major}.*"
    missing = set(GPU_PATH_LIBRARIES) - components
    assert not missing, f"{extra}: cuda-toolkit lacks the components {sorted(missing)} the GPU path loads"


def _toolkit_packages(components):
    """Distribution names the installed cuda-toolkit pulls in for the given extras (from its metadata)."""
    from packaging.requirements import Requirement

    dist = metadata.distribution("cuda-toolkit")
    out = {}
    for line in dist.requires or []:
        req = Requirement(line)
        for component in components:
            if req.marker is not None and req.marker.evaluate({"extra": component}):
                out.setdefault(component, set()).add(req.name)
    return out


def _installed_files(dist_name):
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        return None
    return [Path(str(f)).name for f in dist.files or []]


@pytest.mark.parametrize("component", sorted(GPU_PATH_LIBRARIES))
def test_cuda13_extra_wheels_provide_the_libraries(component):
    """The cuda13 extra as this environment installed it: the component's wheels and their library files."""
    try:
        metadata.distribution("cuda-toolkit")
    except metadata.PackageNotFoundError:
        pytest.skip("cuda-toolkit is not installed here (pip install -e '.[cuda13]')")
    components, _ = _toolkit_components(next(l for l in _extras()["cuda13"] if l.startswith("cuda-toolkit")))
    assert component in components
    packages = _toolkit_packages(components).get(component)
    assert packages, f"cuda-toolkit's metadata names no wheel for the {component} component"
    files = []
    for name in packages:
        found = _installed_files(name)
        if found is None:
            pytest.skip(f"{name} (the {component} wheel) is not installed in this environment; "
                        f"pip install -e '.[cuda13]' brings it")
        files += found
    for lib in GPU_PATH_LIBRARIES[component]:
        assert any(f.startswith(lib) for f in files), f"{lib} not among the files of {sorted(packages)}"


# ------------------------------------------------------------------------------------------------ fake CuPy


def _fake_cupy(*, driver=13000, runtime_version=13000, devices=(("NVIDIA H200", 9, 0),), count_error=None):
    """A stand-in for the ``cupy`` module with just the calls cupyq.device makes about devices."""

    def get_count():
        if count_error is not None:
            raise RuntimeError(count_error)
        return len(devices)

    def props(i):
        name, major, minor = devices[i]
        return {"name": name.encode(), "major": major, "minor": minor, "multiProcessorCount": 132,
                "totalGlobalMem": 1 << 30}

    rt = types.SimpleNamespace(driverGetVersion=lambda: driver, runtimeGetVersion=lambda: runtime_version,
                               getDeviceCount=get_count, getDeviceProperties=props)
    return types.SimpleNamespace(__version__="0.fake", cuda=types.SimpleNamespace(runtime=rt))


@pytest.fixture
def fresh_checks(monkeypatch):
    monkeypatch.setattr(device, "_checked_devices", set())
    monkeypatch.setattr(device, "_warned_mismatch", False)


@pytest.mark.parametrize("name, major, minor", [("Tesla T4", 7, 5), ("Tesla V100-SXM2-32GB", 7, 0),
                                                ("NVIDIA GeForce RTX 2080", 7, 5), ("Tesla P100", 6, 0)])
def test_device_older_than_sm80_is_refused(monkeypatch, fresh_checks, name, major, minor):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(devices=((name, major, minor),)))
    with pytest.raises(device.SetupError) as info:
        device.check_device_supported(0)
    text = str(info.value)
    assert name in text and f"{major}.{minor}" in text and "sm_80" in text and "H100" in text


@pytest.mark.parametrize("name, major, minor", [("NVIDIA A100", 8, 0), ("NVIDIA A10", 8, 6), ("NVIDIA L4", 8, 9),
                                                ("NVIDIA H200", 9, 0), ("NVIDIA B200", 10, 0)])
def test_device_sm80_and_newer_is_accepted(monkeypatch, fresh_checks, name, major, minor):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(devices=((name, major, minor),)))
    assert device.check_device_supported(0) == 0
    assert 0 in device._checked_devices


def test_device_index_out_of_range(monkeypatch, fresh_checks):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy())
    with pytest.raises(ValueError, match=r"device: expected a CUDA device index 0\.\.0, got 3"):
        device.check_device_supported(3)


def _gptq_tensors(seed=0):
    w = np.random.default_rng(seed).standard_normal((128, 64)).astype(np.float32)
    return quantize_gptq(w, bits=4, group_size=32)


def test_qmatrix_checks_the_device_capability(monkeypatch, fresh_checks):
    import cupyq

    g = _gptq_tensors()
    before = {k: v.copy() for k, v in g.items()}
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(devices=(("Tesla T4", 7, 5),)))
    with pytest.raises(device.SetupError, match=r"Tesla T4.*7\.5.*8\.0 or newer"):
        cupyq.QMatrix.from_gptq(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], bits=4, device=0)
    e = quantize_exl2(np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32), bits=(4,),
                      proportions=(1.0,))
    with pytest.raises(device.SetupError, match="Tesla T4"):
        cupyq.QMatrix.from_exl2(e["q_weight"], e["q_invperm"], e["q_scale"], e["q_scale_max"], e["q_groups"],
                                device="cuda:0")
    for k, v in g.items():
        np.testing.assert_array_equal(v, before[k])


def test_qmatrix_check_is_one_line():
    # a QMatrix's device is checked in one place: where cupyq.arrays resolves its device= argument
    text = (REPO / "cupyq" / "arrays.py").read_text()
    assert text.count("check_device_supported(") == 1
    assert "check_device_supported(" not in (REPO / "cupyq" / "qmatrix.py").read_text()


def test_info_marks_unsupported_gpu(monkeypatch, fresh_checks, capsys):
    from cupyq import cli

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(devices=(("Tesla V100", 7, 0), ("NVIDIA H100", 9, 0))))
    monkeypatch.setattr(device, "gpu_available", lambda: True)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "warning: GPU 0 (Tesla V100) has compute capability 7.0" in out and "sm_80 and newer" in out
    assert "GPU 1" not in out.split("warning")[1]
    assert cli.main(["info", "--json"]) == 0
    gpus = __import__("json").loads(capsys.readouterr().out)["device_summary"]["gpus"]
    assert [g["supported"] for g in gpus] == [False, True]


# ------------------------------------------------------------------------------------------------ missing CuPy


def test_missing_cupy_named_by_device_check(monkeypatch, fresh_checks, no_cupy):
    with pytest.raises(device.SetupError) as info:
        device.check_device_supported(0)
    assert "CuPy is not installed" in str(info.value) and "cupyq[cuda12]" in str(info.value)


def test_missing_cupy_named_by_qmatrix_on_device(fresh_checks, no_cupy):
    import cupyq

    g = _gptq_tensors(2)
    with pytest.raises(device.SetupError, match=r"CuPy is not installed.*pip install 'cupyq\[cuda12\]'"):
        cupyq.QMatrix.from_gptq(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], bits=4, device=0)


def test_no_driver_is_named_not_insufficient_driver(monkeypatch, fresh_checks):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(driver=0, count_error="cudaErrorInsufficientDriver: ..."))
    with pytest.raises(device.SetupError) as info:
        device.check_device_supported(0)
    assert "no NVIDIA driver found" in str(info.value) and "cudaError" not in str(info.value)


def _cuda_spellings():
    spellings = [0, np.int64(0), "cuda:0", "cuda"]
    if "torch" in sys.modules:
        spellings += [sys.modules["torch"].device("cuda"), sys.modules["torch"].device("cuda", 0)]
    return spellings


def _setup_errors_of_every_cuda_spelling():
    """{spelling: the SetupError message} of QMatrix.from_gptq for each CUDA spelling (the arrays unchanged)."""
    import cupyq

    g = _gptq_tensors(3)
    before = {k: v.copy() for k, v in g.items()}
    messages = {}
    for spelling in _cuda_spellings():
        with pytest.raises(device.SetupError) as info:
            cupyq.QMatrix.from_gptq(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], bits=4, device=spelling)
        messages[repr(spelling)] = str(info.value)
    for k, v in g.items():
        np.testing.assert_array_equal(v, before[k])
    return messages


def test_every_cuda_spelling_names_the_missing_driver(monkeypatch, fresh_checks):
    # the fake has no getDevice: "cuda" must not ask CuPy for its current device before the check
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(driver=0, count_error="cudaErrorInsufficientDriver: ..."))
    for spelling, message in _setup_errors_of_every_cuda_spelling().items():
        assert re.fullmatch(r"device (0|cuda): no NVIDIA driver found: .*nvidia-smi.*", message), (spelling, message)


def test_every_cuda_spelling_gives_the_reason_of_the_availability_check(monkeypatch, fresh_checks):
    monkeypatch.setattr(device, "gpu_unavailable_reason", lambda: "no CUDA device is visible (check ...)")
    for spelling, message in _setup_errors_of_every_cuda_spelling().items():
        assert re.fullmatch(r"device (0|cuda): no CUDA device is visible \(check \.\.\.\)", message), spelling


def test_every_cuda_spelling_on_this_machine_gives_one_reason(fresh_checks):
    reason = device.gpu_unavailable_reason()
    if reason is None:
        pytest.skip("this machine has a usable GPU")
    for spelling, message in _setup_errors_of_every_cuda_spelling().items():
        assert message in (f"device 0: {reason}", f"device cuda: {reason}"), (spelling, message)


def test_old_driver_is_named_with_versions(monkeypatch, fresh_checks):
    fake = _fake_cupy(driver=12040, runtime_version=13000, count_error="cudaErrorInsufficientDriver: CUDA driver")
    monkeypatch.setitem(sys.modules, "cupy", fake)
    reason = device.gpu_unavailable_reason()
    assert "driver supports CUDA 12.4" in reason and "CUDA 13.0 runtime" in reason and "cuda12" in reason


def test_no_visible_device(monkeypatch, fresh_checks):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(devices=()))
    assert "CUDA_VISIBLE_DEVICES" in device.gpu_unavailable_reason()


def test_compile_sources_without_cupy(monkeypatch, no_cupy):
    with pytest.raises(device.SetupError, match=r"cupyq compile \(NVRTC\) needs CuPy.*cupyq\[cuda13\]"):
        nvrtc.compile_sources(["sm_80"])


# ------------------------------------------------------------------------------------------------ CUDA majors


def test_cuda_mismatch_message():
    assert device.cuda_mismatch_message({"torch": 13, "cupy": 13, "nvrtc": 13}) is None
    assert device.cuda_mismatch_message({"cupy": 13, "nvrtc": 13}) is None
    text = device.cuda_mismatch_message({"torch": 12, "cupy": 13, "nvrtc": 13})
    assert "torch CUDA 12" in text and "cupy CUDA 13" in text and "pip install 'cupyq[cuda12]'" in text


def test_cuda_majors_reads_torch_and_cupy(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(runtime_version=13000))
    majors = device.cuda_majors()
    assert majors["torch"] == 12 and majors["cupy"] == 13


def test_first_device_check_warns_on_mismatch(monkeypatch, fresh_checks):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(runtime_version=13000))
    with pytest.warns(RuntimeWarning, match=r"torch CUDA 12.*cupy CUDA 13"):
        device.check_device_supported(0)
    device._checked_devices.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        device.check_device_supported(0)  # once per process


def test_info_warns_on_mismatch(monkeypatch, capsys):
    from cupyq import cli

    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(device, "cuda_majors", lambda: {"torch": 12, "cupy": 13, "nvrtc": 13})
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "warning: CUDA major versions differ" in out and "cupyq[cuda12]" in out


# ------------------------------------------------------------------------------------------------ one option set


def test_compile_check_uses_the_run_time_options(monkeypatch):
    """_compile_source hands NVRTC exactly nvrtc_options(arch); get_function hands RawModule kernel_options()."""
    pytest.importorskip("cupy")
    import cupy_backends.cuda.libs as libs

    seen = {}

    class FakeNvrtc:
        @staticmethod
        def createProgram(code, name, headers, include_names):
            return object()

        addNameExpression = destroyProgram = staticmethod(lambda *a: None)

        @staticmethod
        def compileProgram(prog, options):
            seen["compile"] = list(options)

        getProgramLog = staticmethod(lambda prog: "")
        getCUBIN = staticmethod(lambda prog: b"\0" * 16)
        getLoweredName = staticmethod(lambda prog, e: "_Z" + e)

    monkeypatch.setattr(libs, "nvrtc", FakeNvrtc)
    monkeypatch.setattr(nvrtc, "load_builtins", lambda: None)  # the fake has no library to load beside
    report = nvrtc._compile_source("sm_86", "qgemm.cu")
    assert report.arch == "sm_86"
    assert seen["compile"] == nvrtc.nvrtc_options("sm_86")

    class FakeRawModule:
        def __init__(self, *, code, options, name_expressions):
            seen["raw"] = tuple(options)

        def get_function(self, name):
            return name

    class FakeDevice:
        def __init__(self, i):
            pass

        __enter__ = lambda self: self
        __exit__ = lambda self, *exc: None

    fake = types.SimpleNamespace(RawModule=FakeRawModule, cuda=types.SimpleNamespace(Device=FakeDevice))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(runtime, "_functions", {})
    monkeypatch.setattr(runtime, "_modules", {})
    name = kernels.kernel_names("qgemm.cu")[0]
    runtime.get_function("qgemm.cu", name, 0)
    assert seen["raw"] == nvrtc.kernel_options()


def test_nvrtc_options_are_what_cupy_compiles(monkeypatch):
    """Trace CuPy's own compile (the function RawModule delegates to) down to NVRTC without a GPU and compare."""
    pytest.importorskip("cupy")
    import cupy.cuda.compiler as compiler
    from cupy._core import core

    from cupyq.sources import read_cuda_source

    captured = []

    class Stop(Exception):
        pass

    class FakeProgram:
        def __init__(self, src, *args, **kwargs):
            self.src = src

        def compile(self, options=(), log_stream=None):
            if not self.src:  # CuPy's preprocess of an empty file, for its cache key
                return b"", {}
            captured.append(list(options))
            raise Stop

    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")
    monkeypatch.setattr(compiler, "_NVRTCProgram", FakeProgram)
    monkeypatch.setattr(compiler, "_get_arch", lambda: "90")
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc", lambda arch=None: (f"-arch=sm_{arch}", "cubin"))
    name = kernels.kernel_names("qgemm.cu")[0]
    with pytest.raises(Stop):
        core.compile_with_cache(read_cuda_source("qgemm.cu"), nvrtc.kernel_options(), prepend_cupy_headers=False,
                                name_expressions=[name])
    assert captured == [nvrtc.nvrtc_options("sm_90")]
    assert "-ftz=true" in captured[0] and "--std=c++17" in captured[0]
    assert all(f"-D{k}={v}" in captured[0] for k, v in kernels.NVRTC_DEFINES.items())


def test_a_changed_shared_constant_changes_the_kernel_cache_key(monkeypatch):
    """CuPy names its cached module after a hash of the options RawModule gets: kernels.NVRTC_DEFINES is in it."""
    pytest.importorskip("cupy")
    import cupy.cuda.compiler as compiler
    from cupy._core import core

    from cupyq.sources import read_cuda_source

    class Stop(Exception):
        pass

    class EmptyProgram:  # CuPy preprocesses an empty file for its cache key; nothing else is compiled here
        def __init__(self, src, *args, **kwargs):
            assert not src

        def compile(self, options=(), log_stream=None):
            return b"", {}

    keys = []

    def record(key_src):
        keys.append(key_src)
        raise Stop

    monkeypatch.setattr(compiler, "_NVRTCProgram", EmptyProgram)
    monkeypatch.setattr(compiler, "_get_arch", lambda: "90")
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc", lambda arch=None: (f"-arch=sm_{arch}", "cubin"))
    monkeypatch.setattr(compiler, "_hash_hexdigest", record)
    monkeypatch.setattr(compiler, "_empty_file_preprocess_cache", {})  # keep the fake preprocess out of CuPy's
    code, name = read_cuda_source("qgemm.cu"), kernels.kernel_names("qgemm.cu")[0]
    for step_chunks in (kernels.STEP_CHUNKS, kernels.STEP_CHUNKS * 2, kernels.STEP_CHUNKS):
        monkeypatch.setitem(kernels.NVRTC_DEFINES, "CUPYQ_STEP_CHUNKS", step_chunks)
        with pytest.raises(Stop):
            core.compile_with_cache(code, nvrtc.kernel_options(), prepend_cupy_headers=False, name_expressions=[name])
    assert keys[0] != keys[1] and keys[0] == keys[2]
    assert f"-DCUPYQ_STEP_CHUNKS={kernels.STEP_CHUNKS * 2}".encode() in keys[1]


# ------------------------------------------------------------------------------------------------ architectures


@pytest.mark.parametrize("arch, expected", [("sm_80", "sm_80"), ("90", "sm_90"), ("sm_90a", "sm_90a"),
                                            ("compute_86", "sm_86"), ("8.9", "sm_89"), ("sm_100a", "sm_100a"),
                                            (" SM_120 ", "sm_120")])
def test_normalise_arch(arch, expected):
    assert nvrtc._normalise_arch(arch) == expected


@pytest.mark.parametrize("arch", ["banana", "", "foo", "sm_", "8", "sm_9x", "sm_80;rm", "sm_1000"])
def test_normalise_arch_refuses_garbage(arch):
    with pytest.raises(ValueError, match="expected something like 'sm_80'"):
        nvrtc._normalise_arch(arch)


@pytest.mark.parametrize("arch", ["sm_75", "70", "sm_61"])
def test_normalise_arch_refuses_old_gpus(arch):
    with pytest.raises(ValueError, match="older than the kernels support.*sm_80"):
        nvrtc._normalise_arch(arch)


# ------------------------------------------------------------------------------------------------ docs


def test_readme_install_is_coherent():
    text = (REPO / "README.md").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert "torch.version.cuda" in text
    assert "sm_80" in text and "sm_90" in text
    assert "pip install torch==2.13.0 && pip install -e" not in text  # the cache-only claim is gone


def test_ci_runs_the_readme_commands():
    ci = (REPO / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci
    assert "cupyq compile --check-resources --arch sm_80 --arch sm_86 --arch sm_89 --arch sm_90" in ci
    # the same check under the NVRTC of the cuda12 extra and the oldest of the cuda13 extra
    assert 'nvrtc_check venv12 cupy-cuda12x "12.*" 12' in ci and 'nvrtc_check venv130 cupy-cuda13x "13.0.*" 13.0' in ci


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_real_device_passes_the_check(fresh_checks):
    assert device.check_device_supported(0) == 0
    assert device.gpu_unavailable_reason() is None


@pytest.mark.gpu
def test_cublas_loads_for_the_dense_path():
    """cupy.matmul (the large-batch path) needs libcublas from the extra's wheels."""
    import cupy

    rng = np.random.default_rng()
    a = rng.standard_normal((96, 64)).astype(np.float16)
    b = rng.standard_normal((64, 80)).astype(np.float16)
    got = cupy.matmul(cupy.asarray(a), cupy.asarray(b)).get().astype(np.float32)
    want = a.astype(np.float32) @ b.astype(np.float32)
    # fp16 output rounding: relative 2**-11 per element; 1e-2 of the norm leaves a wide margin
    assert np.linalg.norm(got - want) <= 1e-2 * np.linalg.norm(want)


@pytest.mark.parametrize("statement, what", [
    ("import cupyq.torch_ops", "cupyq.torch_ops"),
    ("import cupyq.awq", "cupyq.awq"),
    ("import cupyq.exllamav2", "cupyq.exllamav2"),
    ("import cupyq.distributed.layers", "cupyq.distributed"),
    ("import cupyq; cupyq.patch_model(None, '.', device='cpu')", "cupyq.patch_model"),
])
def test_torch_front_ends_without_torch_name_the_fix(statement, what):
    """Without torch, every torch front end raises ImportError naming itself and the install command (as a
    missing CuPy does), not a bare ModuleNotFoundError from deep inside."""
    import subprocess

    code = f"import sys\nsys.modules['torch'] = None\n{statement}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: {what}") and "needs torch, which is not installed" in last
    assert last.endswith("pip install torch"), last
