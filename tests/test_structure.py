"""Structure of the package: no import cycle between cupyq's modules (counting imports inside functions too),
and the constants the CUDA sources and the launches share agree (no GPU needed)."""

import ast
from pathlib import Path

import cupyq
from cupyq import kernels, plans
from cupyq.sources import read_cuda_source

ROOT = Path(cupyq.__file__).parent


def _modules() -> dict:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = ("cupyq",) + p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def _imports(name: str, path: Path, mods: dict) -> set:
    """cupyq modules that ``name`` imports anywhere in its file (the package face ``cupyq`` excluded: it only
    exposes submodules lazily)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                cand = f"{base}.{alias.name}"
                found.add(cand if cand in mods else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in mods and m not in (name, "cupyq")}


def test_no_import_cycles():
    mods = _modules()
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    state: dict = {}

    def visit(node, trail):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycle = trail[trail.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, trail + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_qmatrix_and_launch_do_not_import_dispatch():
    mods = _modules()
    for name in ("cupyq.qmatrix", "cupyq.launch", "cupyq.plans", "cupyq.kernels"):
        assert "cupyq.dispatch" not in _imports(name, mods[name], mods), name
    for name in ("cupyq.launch", "cupyq.plans"):
        assert "cupyq.qmatrix" not in _imports(name, mods[name], mods), name
    assert "cupyq.launch" not in _imports("cupyq.plans", mods["cupyq.plans"], mods)


# Where each shared constant is defined in CUDA: (source, constexpr) per NVRTC define of kernels.py.
_DEFINED_IN = {
    "CUPYQ_CHUNK_ROWS": ("qdq.cuh", "kChunkRows"),
    "CUPYQ_GEMV_THREADS": ("qgemm.cu", "kThreads"),
    "CUPYQ_STEP_CHUNKS": ("qgemm.cu", "kStepChunks"),
    "CUPYQ_TC_THREADS": ("tensor_tiles.cuh", "kThreads"),
    "CUPYQ_DEQUANT_T_CHUNKS": ("tensor_tiles.cuh", "kDequantTChunks"),
}


def test_shared_constants_reach_the_sources_as_nvrtc_defines():
    """Each constant the CUDA sources share with Python has its value only in kernels.py: the sources take it from
    the -D option (and refuse to compile without it), and the launches and the layout read kernels.py."""
    import re

    from cupyq import layout, nvrtc

    assert set(kernels.NVRTC_DEFINES) == set(_DEFINED_IN)
    options = nvrtc.kernel_options()
    for name, value in kernels.NVRTC_DEFINES.items():
        assert isinstance(value, int) and f"-D{name}={value}" in options
        source, constant = _DEFINED_IN[name]
        code = read_cuda_source(source)
        assert re.search(rf"constexpr int {constant} = {name};", code), (source, constant)
        assert re.search(rf"#(ifndef {name}|if [^\n]*!defined\({name}\)[^\n]*)\n#error", code), (source, name)
        assert not re.search(rf"constexpr int {constant} = \d", code)  # no second, literal definition
    assert plans._THREADS == kernels.GEMV_THREADS and plans._STEP_CHUNKS == kernels.STEP_CHUNKS
    assert layout.CHUNK_ROWS == kernels.CHUNK_ROWS and layout.STEP_ROWS == kernels.STEP_CHUNKS * kernels.CHUNK_ROWS


def test_sources_refuse_to_compile_without_the_defines(monkeypatch):
    import pytest

    pytest.importorskip("cupy")
    from cupyq import nvrtc

    every = dict(kernels.NVRTC_DEFINES)
    for name in every:
        defines = {k: v for k, v in every.items() if k != name}
        monkeypatch.setattr(kernels, "NVRTC_DEFINES", defines)
        source = _DEFINED_IN[name][0]
        if source == "tensor_tiles.cuh":  # included by qmma.cu
            kernel, source = kernels.dequant_t_name("__half", False, True), "qmma.cu"
        else:
            kernel, source = kernels.qgemv_name("__half", 1, False, True), "qgemm.cu"
        with pytest.raises(nvrtc.CompileError, match=rf"#error.*{name}"):
            nvrtc.kernel_resources(kernel, "sm_80", source=source)


def test_device_index_accepts_the_usual_spellings(monkeypatch):
    import sys
    import types

    import pytest

    import numpy as np

    from cupyq import device
    from cupyq.arrays import device_index

    torch = pytest.importorskip("torch")  # before cupy is faked: importing torch may import the real cupyx
    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDevice=lambda: 3)))
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setattr(device, "gpu_unavailable_reason", lambda: None)  # the current device is asked only then
    assert device_index(0) == 0 and device_index(2) == 2 and device_index(np.int64(2)) == 2
    assert device_index("cuda:1") == 1 and device_index("cuda") == 3 and device_index(None) == 3
    assert device_index(torch.device("cuda", 1)) == 1 and device_index(torch.device("cuda")) == 3

    class Device:  # CuPy's Device spelling: an integer .id
        __module__ = "cupy.cuda.device"

        def __init__(self, i):
            self.id = i

    assert device_index(Device(5)) == 5
    for bad in ("cuda:x", "gpu", "cuda:-1", "cuda:01", "CUDA", -1, True, np.bool_(False), 1.5, torch.device("cpu")):
        with pytest.raises(ValueError, match="device"):
            device_index(bad)


def test_slow_kernel_compile_says_so(monkeypatch, capsys):
    import contextlib
    import sys
    import time
    import types

    from cupyq import nvrtc, runtime

    class RawModule:
        def __init__(self, code, options, name_expressions):
            time.sleep(0.3)  # a compile, not a cache hit

        def get_function(self, name):
            return ("fn", name)

    fake = types.SimpleNamespace(RawModule=RawModule,
                                 cuda=types.SimpleNamespace(Device=lambda i: contextlib.nullcontext()))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(nvrtc, "kernel_options", lambda: ())
    monkeypatch.setattr(runtime, "COMPILE_NOTICE_S", 0.05)
    assert runtime.get_function("qmma.cu", "qmma<test-only>", 7) == ("fn", "qmma<test-only>")
    assert "compiling qmma<test-only> with NVRTC" in capsys.readouterr().err
    monkeypatch.setattr(runtime, "COMPILE_NOTICE_S", 5.0)
    runtime.get_function("qmma.cu", "qmma<test-only-2>", 7)
    assert capsys.readouterr().err == ""  # quick loads stay silent
    for key in [k for k in runtime._functions if k[2] == 7]:
        del runtime._functions[key], runtime._modules[key]


def test_sm90a_kernels_compile_to_a_whole_cubin_cached_on_disk(monkeypatch, tmp_path):
    """qwgmma's cubin (built for sm_90a by NVRTC directly, no GPU needed) is a complete ELF image, and a second
    request reads it from the cache directory without compiling."""
    import struct

    import pytest

    pytest.importorskip("cupy")
    from cupyq import kernels, runtime

    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    name = kernels.frag_xw_name("__half")
    cubin, lowered = runtime._compile_cubin("qwgmma.cu", name, "sm_90a")
    phoff, shoff = struct.unpack_from("<QQ", cubin, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", cubin, 0x36)
    assert cubin[:4] == b"\x7fELF" and len(cubin) >= max(phoff + phentsize * phnum, shoff + shentsize * shnum)
    assert lowered.startswith("_Z") and "frag_xw" in lowered
    assert len(list(tmp_path.glob("cupyq_sm_90a_*.cubin"))) == 1 and not list(tmp_path.glob("*.tmp"))

    from cupy_backends.cuda.libs import nvrtc as libnvrtc

    monkeypatch.setattr(libnvrtc, "createProgram", lambda *a: pytest.fail("compiled again"))
    assert runtime._compile_cubin("qwgmma.cu", name, "sm_90a") == (cubin, lowered)


def test_every_format_exposes_the_same_property_types():
    """GPTQ, EXL2 and AWQ matrices answer the same questions with the same types (CPU matrices; the builders set
    these before any device work)."""
    import numpy as np

    from cupyq.quantize import quantize_awq, quantize_exl2, quantize_gptq

    rng = np.random.default_rng(11)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    g = quantize_gptq(w, bits=4, group_size=64, act_order=True)
    e = quantize_exl2(w, bits=(6, 4), proportions=(0.5, 0.5))
    a = quantize_awq(w, group_size=128)
    mats = {
        "gptq": cupyq.QMatrix.from_gptq(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], group_size=64),
        "exl2": cupyq.QMatrix.from_exl2(e["q_weight"], e["q_invperm"], e["q_scale"], e["q_scale_max"], e["q_groups"]),
        "awq": cupyq.QMatrix.from_awq(a["qweight"], a["qzeros"], a["scales"], group_size=128),
    }
    for fmt, qm in mats.items():
        assert qm.format == fmt
        assert isinstance(qm.bits, tuple) and all(type(b) is int for b in qm.bits)
        assert list(qm.bits) == sorted(qm.bits, reverse=True)
        assert type(qm.group_size) is int and isinstance(qm.group_sizes, dict)
        assert set(qm.group_sizes) == set(qm.bits) and qm.group_size == min(qm.group_sizes.values())
        assert type(qm.act_order) is bool and isinstance(qm.bits_per_weight, float)
        assert qm.device_id is None and qm.shape == (256, 64)
    assert mats["gptq"].group_sizes == {4: 64} and mats["gptq"].act_order
    assert mats["awq"].group_sizes == {4: 128} and not mats["awq"].act_order
    assert mats["exl2"].bits == (6, 4) and mats["exl2"].group_sizes == {6: 32, 4: 32}


def test_cpu_and_gpu_matrices_are_separate_types_behind_one_constructor():
    """The builders return a CpuQMatrix for tensors on the CPU (the reference path); the GPU type refuses to be
    built there, with an error that names the way out."""
    import numpy as np
    import pytest

    from cupyq.qmatrix import CpuQMatrix, GpuQMatrix, QMatrix
    from cupyq.quantize import quantize_gptq

    rng = np.random.default_rng(12)
    g = quantize_gptq(rng.standard_normal((128, 32)).astype(np.float32), bits=4, group_size=64)
    args = (g["qweight"], g["qzeros"], g["scales"], g["g_idx"])
    qm = QMatrix.from_gptq(*args)
    assert type(qm) is CpuQMatrix and isinstance(qm, QMatrix) and not qm.is_cuda
    assert type(CpuQMatrix.from_gptq(*args)) is CpuQMatrix
    assert qm.needed_kernels() == set() and qm.dequant_scratch_bytes == 128 * 32 * 2 + 128
    with pytest.raises(ValueError, match="GpuQMatrix cannot live on the CPU"):
        GpuQMatrix.from_gptq(*args)
    assert not hasattr(qm, "_plans") and not hasattr(qm, "layout")  # no device state on the CPU type


def test_modules_stay_small_or_say_why():
    """A module over ~400 lines gives the reason in its docstring (naming its size), so growth is a decision."""
    for name, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 420:
            doc = ast.get_docstring(ast.parse(text)) or ""
            assert "lines" in doc, f"{name}: {text.count(chr(10))} lines and no reason in its docstring"
