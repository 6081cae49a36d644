"""Register budget of the dispatched kernels, from the ptxas report through NVRTC (no GPU needed).

The qgemv instantiations that dispatch uses were measured with at most 128 registers per thread (two CTAs of
256 threads per multiprocessor) and no local memory; a change that makes them spill slows the m <= 16 path.
Every qmma instantiation dispatch can launch must fit its launch bound (255 registers, or 128 with two CTAs
per multiprocessor) without local memory, and so must the transposed dequantisation of the dense path.
"""

import pytest

from cupyq import kernels, nvrtc

_QMMA = [(cfg, cfg.name(t, zr, h8, h4)) for cfg in kernels.QMMA_CONFIGS.values() for t in kernels.DTYPES
         for zr in (1, 4) for h8, h4 in kernels.STORAGES]


@pytest.mark.parametrize("name", [
    "qgemv<__half, 1, false, true>",  # fp16, 2-4-bit storage, m <= 8
    "qgemv<__half, 2, false, true>",  # the same, m = 9-16
    "qgemv<__half, 1, true, true>",  # fp16, 8-bit and 4-bit storage (EXL2 mixes), m <= 8
    "qgemv<__nv_bfloat16, 1, false, true>",
])
def test_streaming_kernel_registers_without_spills(name):
    r = nvrtc.kernel_resources(name, "sm_90")
    assert r.registers <= 128, r
    assert r.stack_bytes == 0 and r.spill_store_bytes == 0 and r.spill_load_bytes == 0, r


def test_ptxas_report_parsing():
    log = ("ptxas info    : Compiling entry function '_Z5qgemm' for 'sm_90'\n"
           "ptxas         .     384 bytes stack frame, 480 bytes spill stores, 644 bytes spill loads\n"
           "ptxas info    : Used 128 registers, used 1 barriers, 384 bytes cumulative stack size, 16 bytes smem\n")
    assert nvrtc._parse_ptxas_report(log) == (128, 384, 480, 644)
    assert nvrtc._parse_ptxas_report("ptxas info    : Compile time = 235.980 ms") is None


def test_unknown_kernel_is_a_compile_error():
    with pytest.raises(nvrtc.CompileError, match="qgemv<float"):
        nvrtc.kernel_resources("qgemv<float, 1, false, true>", "sm_90")


@pytest.mark.parametrize("cfg,name", _QMMA, ids=[n for _, n in _QMMA])
def test_qmma_registers_without_spills(cfg, name):
    r = nvrtc.kernel_resources(name, "sm_90", source="qmma.cu")
    assert r.registers <= 65536 // (kernels.QMMA_THREADS * cfg.minb), r
    assert r.stack_bytes == 0 and r.spill_store_bytes == 0 and r.spill_load_bytes == 0, r


@pytest.mark.parametrize("name", [kernels.dequant_t_name(t, h8, h4) for t in kernels.DTYPES
                                  for h8, h4 in kernels.STORAGES])
def test_dense_path_dequantisation_without_spills(name):
    r = nvrtc.kernel_resources(name, "sm_90", source="qmma.cu")
    assert r.stack_bytes == 0 and r.spill_store_bytes == 0, r


_QWGMMA = [n for n in kernels.qwgmma_kernel_names() if n.startswith("qwgmma")]


@pytest.mark.parametrize("name", _QWGMMA)
def test_qwgmma_registers_without_spills(name):
    # sm_90a: the wgmma target; one CTA of 256 threads per multiprocessor (launch bound 255 registers)
    r = nvrtc.kernel_resources(name, "sm_90a", source="qwgmma.cu")
    assert r.registers <= 255, r
    assert r.stack_bytes == 0 and r.spill_store_bytes == 0 and r.spill_load_bytes == 0, r
