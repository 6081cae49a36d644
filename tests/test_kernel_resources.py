"""Register budget of every dispatched kernel, from the ptxas report through NVRTC (no GPU needed).

The qgemv instantiations were measured with at most 128 registers per thread (two CTAs of 256 threads per
multiprocessor) and no local memory; a change that makes them spill slows the m <= 16 path. Every qmma
and qwgmma instantiation dispatch can launch must fit its launch bound (255 registers, or 128 with two CTAs per
multiprocessor). No kernel of any source may need local memory (a stack frame or spills).

One compile per source (the compile check's, with ``-Xptxas -v``) gives the report of every instantiation.
CI runs the same check under other NVRTC releases with ``cupyq compile --check-resources``.
"""

import json
import subprocess
import sys

import pytest

from cupyq import cli, kernels, nvrtc

_ARCH = "sm_90"
_SOURCES = ("qgemm.cu", "qmma.cu", "qwgmma.cu")  # qwgmma.cu for sm_90 is built for sm_90a (kernels.target_arch)
_NAMES = [(source, name) for source in _SOURCES for name in kernels.kernel_names(source)]
_QMMA_MINB = {cfg.name(t, zr, h8, h4): cfg.minb for cfg in kernels.QMMA_CONFIGS.values() for t in kernels.DTYPES
              for zr in (1, 4) for h8, h4 in kernels.STORAGES}


@pytest.fixture(scope="module")
def resources():
    """KernelResources of every kernel of every source for sm_90, by name (the compiles at once in threads)."""
    pytest.importorskip("cupy")
    reports = nvrtc.compile_sources([_ARCH], sources=list(_SOURCES), workers=3, resources=True)
    return {k.name: k for rep in reports for k in rep.resources}


@pytest.mark.parametrize("source,name", _NAMES, ids=[n for _, n in _NAMES])
def test_kernel_without_local_memory(resources, source, name):
    r = resources[name]
    assert r.arch == kernels.target_arch(source, _ARCH)
    assert not r.uses_local_memory, r.describe()
    if name.startswith("qgemv<"):
        assert r.registers <= 128, r.describe()
    if name in _QMMA_MINB:
        assert r.registers <= 65536 // (kernels.QMMA_THREADS * _QMMA_MINB[name]), r.describe()


def test_every_dispatched_qgemv_is_checked():
    """The instantiations dispatch can pick (rules.needed_kernels' rule: one or two m8 tiles) are all compiled."""
    names = set(kernels.kernel_names("qgemm.cu"))
    for t in kernels.DTYPES:
        for h8, h4 in kernels.STORAGES:
            assert kernels.qgemv_name(t, 1, h8, h4) in names
    assert kernels.qgemv_name("__half", 2, False, True) in names
    assert set(_QMMA_MINB) <= set(kernels.kernel_names("qmma.cu"))


def test_ptxas_report_parsing():
    log = ("ptxas info    : Compiling entry function '_Z5qgemm' for 'sm_90'\n"
           "ptxas         .     384 bytes stack frame, 480 bytes spill stores, 644 bytes spill loads\n"
           "ptxas info    : Used 128 registers, used 1 barriers, 384 bytes cumulative stack size, 16 bytes smem\n")
    assert nvrtc._parse_ptxas_report(log) == (128, 384, 480, 644)
    assert nvrtc._parse_ptxas_report("ptxas info    : Compile time = 235.980 ms") is None


_MODULE_LOG = """ptxas info    : 16 bytes gmem
ptxas info    : Compiling entry function '_Z1bv' for 'sm_80'
ptxas info    : Function properties for _Z6helperv
ptxas         .     8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Function properties for _Z1bv
ptxas         .     24 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 24 bytes cumulative stack size, 16 bytes smem
ptxas info    : Compile time = 443.662 ms
ptxas info    : Compiling entry function '_Z1av' for 'sm_80'
ptxas info    : Function properties for _Z1av
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
ptxas info    : Compile time = 4.113 ms
"""


def test_module_log_gives_each_kernel_its_own_report():
    """Each kernel gets the numbers of its own section (not those of a callee listed before it)."""
    report = nvrtc.CompileReport("qgemm.cu", "sm_80", 1.0, 10, [("a<1>", "_Z1av"), ("b<2>", "_Z1bv")])
    a, b = nvrtc._kernel_reports(_MODULE_LOG, report)
    assert (a.name, a.registers, a.uses_local_memory) == ("a<1>", 40, False)
    assert (b.name, b.registers, b.stack_bytes, b.spill_store_bytes, b.spill_load_bytes) == ("b<2>", 128, 24, 40, 36)
    assert b.uses_local_memory and "b<2> for sm_80" in b.describe() and "40 bytes spill stores" in b.describe()
    missing = nvrtc.CompileReport("qgemm.cu", "sm_80", 1.0, 10, [("c<3>", "_Z1cv")])
    with pytest.raises(nvrtc.CompileError, match="c<3> for sm_80: no resource report"):
        nvrtc._kernel_reports(_MODULE_LOG, missing)


def test_ptxas_report_is_no_warning_but_a_warning_stays():
    assert nvrtc._without_ptxas_info(_MODULE_LOG + "\0").strip() == ""  # CuPy's log keeps NVRTC's final NUL
    warning = "qgemm.cu(12): warning #177-D: variable \"x\" was declared but never referenced"
    ptxas_warning = "ptxas warning : Registers are spilled to local memory in function '_Z1bv'"
    kept = nvrtc._without_ptxas_info(_MODULE_LOG + warning + "\n" + ptxas_warning + "\n")
    assert kept.splitlines() == [warning, ptxas_warning]


def test_unknown_kernel_is_a_compile_error():
    with pytest.raises(nvrtc.CompileError, match="qgemv<float"):
        nvrtc.kernel_resources("qgemv<float, 1, false, true>", "sm_90")


def _fake_reports(spill):
    local = (24, 40, 40) if spill else (0, 0, 0)
    spilling = nvrtc.KernelResources("qgemv<__half, 2, false, true>", "sm_80", 128, *local)
    clean = nvrtc.KernelResources("gather_columns<__half>", "sm_80", 14, 0, 0, 0)
    report = nvrtc.CompileReport("qgemm.cu", "sm_80", 1.5, 1000, [("qgemv<__half, 2, false, true>", "_Z1q"),
                                                                      ("gather_columns<__half>", "_Z1g")])
    report.resources = [spilling, clean]
    return [report]


@pytest.mark.parametrize("spill", [True, False])
def test_compile_check_resources_names_each_spilling_kernel(monkeypatch, capsys, spill):
    calls = []

    def fake(archs, *, sources=None, progress=None, resources=False):
        calls.append(resources)
        return _fake_reports(spill)

    monkeypatch.setattr(nvrtc, "compile_sources", fake)
    code = cli.main(["compile", "--arch", "sm_80", "--check-resources"])
    out, _ = capsys.readouterr()
    assert calls == [True]
    if spill:
        assert code == 1
        assert "1 of 2 kernels use local memory" in out
        assert "qgemv<__half, 2, false, true> for sm_80: 128 registers, 24 bytes stack frame, 40 bytes spill stores" in out
        assert "gather_columns" not in out.split("local memory", 1)[1]
    else:
        assert code == 0 and "2 kernels, none with a stack frame or spills (at most 128 registers)" in out
    code = cli.main(["compile", "--arch", "sm_80", "--check-resources", "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == (1 if spill else 0) and payload["ok"] is (not spill)
    assert len(payload["local_memory_kernels"]) == (1 if spill else 0)
    assert payload["reports"][0]["resources"][1] == {"name": "gather_columns<__half>", "arch": "sm_80", "registers": 14,
                                                     "stack_bytes": 0, "spill_store_bytes": 0, "spill_load_bytes": 0}


def test_compile_without_the_flag_asks_for_no_report(monkeypatch, capsys):
    calls = []

    def fake(archs, *, sources=None, progress=None, resources=False):
        calls.append(resources)
        return _fake_reports(True)

    monkeypatch.setattr(nvrtc, "compile_sources", fake)
    assert cli.main(["compile", "--arch", "sm_80"]) == 0  # the spill is not looked at
    assert calls == [False] and "local memory" not in capsys.readouterr().out


_BUILTINS_PROBE = """
import json, os
from cupy_backends.cuda.libs import nvrtc as lib
from cupyq import nvrtc
nvrtc.load_builtins()
major, minor = lib.getVersion()
name = f"libnvrtc-builtins.so.{major}.{minor}"
sibling = os.path.join(os.path.dirname(os.path.realpath(nvrtc.loaded_library_path())), name)
print(json.dumps({"sibling": os.path.isfile(sibling), "mapped": name in open("/proc/self/maps").read()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_nvrtc_builtins_are_loaded_before_any_compile():
    """NVRTC opens libnvrtc-builtins by its bare name, and the nvidia-cuda-nvrtc 13.0 wheel gives the loader no
    path to it: unless that library is already loaded, every compile fails ("failed to open
    libnvrtc-builtins.so.13.0"). nvrtc.load_builtins loads it from beside libnvrtc; checked in a fresh process,
    where nothing has compiled yet."""
    pytest.importorskip("cupy")
    run = subprocess.run([sys.executable, "-c", _BUILTINS_PROBE], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.splitlines()[-1])
    if not found["sibling"]:
        pytest.skip("this NVRTC keeps its builtins elsewhere (a toolkit install with its own search path)")
    assert found["mapped"]
