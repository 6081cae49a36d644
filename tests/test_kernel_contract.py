"""The Python side of the kernel contract (cupyq/kernels.py, cupyq/plans.py) against the CUDA sources: parameter
lists parsed from the __global__ signatures, shared constants, and the dispatch rules (no GPU needed)."""

import re
from types import SimpleNamespace

import numpy as np
import pytest

from cupyq import kernels, plans, rules
from cupyq.sources import read_cuda_source


def _signature(source: str, kernel: str, types: bool = False) -> list:
    """Parameter names of ``kernel``'s __global__ definition in ``source``, in order; with ``types``, (name,
    "int" or "pointer") pairs."""
    code = read_cuda_source(source)
    m = re.search(r"__global__[^;{]*?\b" + kernel + r"\s*\(([^)]*)\)\s*\{", code, re.S)
    assert m, f"no __global__ {kernel} in {source}"
    params = [p.strip() for p in m.group(1).split(",")]
    names = [re.findall(r"\w+", p)[-1] for p in params]
    if not types:
        return names
    for p in params:
        assert "*" in p or re.fullmatch(r"int\s+\w+", p), f"{kernel}: parameter {p!r} is neither int nor a pointer"
    return [(n, "pointer" if "*" in p else "int") for n, p in zip(names, params)]


def test_qmma_parameters_match_the_source():
    assert tuple(_signature("qmma.cu", "qmma")) == kernels.QMMA_PARAMS


def test_dequant_t_parameters_match_the_source():
    assert tuple(_signature("qmma.cu", "dequant_t")) == kernels.DEQUANT_T_PARAMS


def test_qgemv_parameters_match_the_source():
    assert tuple(_signature("qgemm.cu", "qgemv")) == kernels.QGEMV_PARAMS


def test_qwgmma_parameters_match_the_source():
    assert tuple(_signature("qwgmma.cu", "qwgmma")) == kernels.QMMA_PARAMS
    assert tuple(_signature("qwgmma.cu", "frag_xw")) == kernels.FRAG_XW_PARAMS
    assert tuple(_signature("qmma.cu", "frag_x")) == kernels.FRAG_X_PARAMS


def test_dequant_and_gather_parameters_match_the_source():
    assert tuple(_signature("qgemm.cu", "dequant")) == kernels.DEQUANT_PARAMS
    assert tuple(_signature("qgemm.cu", "gather_columns")) == kernels.GATHER_PARAMS


@pytest.mark.parametrize("source,kernel,params,ints", [
    ("qgemm.cu", "qgemv", kernels.QGEMV_PARAMS, kernels.QGEMV_INT_PARAMS),
    ("qgemm.cu", "dequant", kernels.DEQUANT_PARAMS, kernels.DEQUANT_INT_PARAMS),
    ("qgemm.cu", "gather_columns", kernels.GATHER_PARAMS, kernels.GATHER_INT_PARAMS),
    ("qmma.cu", "qmma", kernels.QMMA_PARAMS, kernels.QMMA_INT_PARAMS),
    ("qmma.cu", "dequant_t", kernels.DEQUANT_T_PARAMS, kernels.DEQUANT_T_INT_PARAMS),
    ("qmma.cu", "frag_x", kernels.FRAG_X_PARAMS, kernels.FRAG_X_INT_PARAMS),
    ("qwgmma.cu", "qwgmma", kernels.QMMA_PARAMS, kernels.QMMA_INT_PARAMS),
    ("qwgmma.cu", "frag_xw", kernels.FRAG_XW_PARAMS, kernels.FRAG_XW_INT_PARAMS),
])
def test_int_parameters_are_the_sources_ints(source, kernel, params, ints):
    """The launches pass the declared int parameters as 32-bit integers and every other one as a 64-bit pointer:
    the declaration must say which is which as the source does."""
    assert set(_signature(source, kernel, types=True)) == {(n, "int" if n in ints else "pointer") for n in params}


class _RecordedKernel:
    """Stands in for a compiled kernel: keeps the arguments of each CuPy-style call."""

    def __init__(self):
        self.calls = []

    def __call__(self, grid, block, args, stream=None):
        self.calls.append(args)


def _launch_layout():
    arr = lambda ptr: SimpleNamespace(size=1, data=SimpleNamespace(ptr=ptr))  # noqa: E731
    layout = SimpleNamespace(w8=arr(0x1100), w4=arr(0x1200), tile_group=arr(0x1300), zs=arr(0x1400),
                             row_src=arr(0x1500), padded_cols=96, padded_rows=320, chunks8=2, chunks4=3)
    qm = SimpleNamespace(layout=layout, in_features=300, out_features=90, device_id=0)
    return qm, {"w8": 0x1100, "w4": 0x1200, "tile_group": 0x1300, "zs": 0x1400, "row_src": 0x1500}


@pytest.mark.parametrize("which", ["dequant", "dequant_t", "gather"])
def test_launch_arguments_follow_the_declared_order(monkeypatch, which):
    """Each hand-built launch (dequant, dequant_t, gather_columns) passes every parameter in the declared order,
    checked with a distinct value per parameter."""
    from cupyq import launch

    kernel = _RecordedKernel()
    monkeypatch.setattr(launch.runtime, "get_function", lambda source, name, device_id: kernel)
    qm, ptrs = _launch_layout()
    buf = SimpleNamespace(data=SimpleNamespace(ptr=0x2000), shape=(320, 104))
    if which == "dequant":  # N is min(ld_out, Npad): a wide buffer tells N from ld_out, a narrow one from Npad
        launch.dequantize_into(qm, buf, "__half", stream=None)
        params, ints = kernels.DEQUANT_PARAMS, kernels.DEQUANT_INT_PARAMS
        want = dict(ptrs, out=0x2000, ld_out=104, N=96, Npad=96, C8=2, C4=3)
        narrow = SimpleNamespace(data=SimpleNamespace(ptr=0x2000), shape=(320, 88))
        launch.dequantize_into(qm, narrow, "__half", stream=None)
        assert dict(zip(params, kernel.calls.pop())) == dict(want, ld_out=88, N=88)
    elif which == "dequant_t":
        launch.dequantize_t_into(qm, buf, "__half", None, 1, 4)
        params, ints = kernels.DEQUANT_T_PARAMS, kernels.DEQUANT_T_INT_PARAMS
        want = dict(ptrs, outT=0x2000, ld_out=104, Npad=96, C8=2, C4=3, chunk_begin=1, chunk_end=4)
        del want["row_src"]
    else:
        launch._gather_columns(qm, 0x3000, 0x4000, 7, "__half", None)
        params, ints = kernels.GATHER_PARAMS, kernels.GATHER_INT_PARAMS
        want = dict(x=0x3000, row_src=0x1500, out=0x4000, M=7, K=300, Kp=320)
    (args,) = kernel.calls
    assert dict(zip(params, args)) == want and len(args) == len(params)
    for name, arg in zip(params, args):
        assert isinstance(arg, np.int32) if name in ints else type(arg) is int, name


def test_kernel_args_names_what_is_missing_or_unknown():
    assert plans.kernel_args(("p", "n"), {"n"}, {"p": 5, "n": 3}) == (5, np.int32(3))
    with pytest.raises(ValueError, match=r"missing \['n'\], unknown \['q'\]"):
        plans.kernel_args(("p", "n"), {"n"}, {"p": 5, "q": 3})
    pytest.importorskip("cupy")
    kernel = SimpleNamespace(kernel=SimpleNamespace(ptr=1))
    with pytest.raises(ValueError, match=r"missing \['n'\], unknown \['q'\]"):  # the driver launcher's check
        plans._Launcher(kernel, (1, 1, 1), (32, 1, 1), 0, ("p", "n"), {"p": 5, "q": 3}, {"n"})


@pytest.mark.parametrize("limit,cfg", sorted(kernels.QMMA_CONFIGS.items()))
def test_qmma_configs_are_consistent(limit, cfg):
    assert cfg.wk * cfg.wm * cfg.wn == kernels.QMMA_WARPS
    assert cfg.ks % cfg.wk == 0 and (4 % cfg.ks == 0 or cfg.ks % 4 == 0)
    for has8 in (False, True):
        for zr in (1, 4):
            if limit <= 64 or not has8:
                assert cfg.smem_bytes(has8, zr) <= kernels.QMMA_SMEM_LIMIT, (cfg, has8, zr)


def test_choose_qmma_picks_the_smallest_tile_that_holds_the_batch():
    limits = sorted(kernels.QMMA_CONFIGS)
    for m in range(9, 600):
        cfg = rules.choose_qmma(m)
        fits = [lim for lim in limits if m <= lim]
        assert cfg == kernels.QMMA_CONFIGS[fits[0] if fits else limits[-1]]
        small = rules.choose_qmma(m, 4096 * 4096)
        assert small == (kernels.QMMA_CONFIGS[32] if 32 < m <= 64 else cfg)


@pytest.fixture(autouse=True)
def _sm80(monkeypatch):
    """The rules are checked for an sm_80 device unless a test says otherwise (no GPU is asked)."""
    monkeypatch.setattr(rules, "device_compute_capability", lambda device_id: (8, 0))


def _fake(k, n, chunks8=0, uniform=True):
    tile_group = np.repeat(np.arange(k // 128), 8) if uniform else np.arange(k // 16)
    layout = SimpleNamespace(chunks8=chunks8, chunks4=k // 64 - chunks8, padded_cols=n, padded_rows=k,
                             tile_group=tile_group)
    return SimpleNamespace(in_features=k, out_features=n, layout=layout, device_id=0, _plans={})


@pytest.mark.parametrize("k,n", [(4096, 4096), (8192, 28672)])
def test_dispatch_rules(k, n):
    qm = _fake(k, n)
    small = k * n < rules.SMALL_LAYER_WEIGHTS
    assert rules.choose_kernel(qm, 1, "__half")[0] == "qgemv"
    assert rules.choose_kernel(qm, 8, "__nv_bfloat16")[0] == "qgemv"
    assert rules.choose_kernel(qm, 16, "__half")[0] == "qgemv2"
    assert rules.choose_kernel(qm, 16, "__nv_bfloat16")[0] == "qmma"
    assert rules.choose_kernel(_fake(k, n, chunks8=4), 12, "__half")[0] == "qmma"
    assert rules.choose_kernel(qm, 64, "__half")[0] == "qmma"
    assert rules.choose_kernel(qm, 128, "__half")[0] == ("dense" if small else "qmma")
    assert rules.choose_kernel(qm, 129, "__half")[0] == "dense"
    kernel, why = rules.choose_kernel(qm, 4096, "__half", force_cuda=True)
    assert kernel == "qmma" and "4096" in why


@pytest.mark.parametrize("k,n", [(4096, 4096), (8192, 28672)])
def test_dispatch_rules_on_sm90(monkeypatch, k, n):
    monkeypatch.setattr(rules, "device_compute_capability", lambda device_id: (9, 0))
    qm = _fake(k, n)
    small = k * n < rules.SMALL_LAYER_WEIGHTS
    large = k * n >= rules.WIDE_TILE_WEIGHTS
    assert rules.choose_kernel(qm, 8, "__half")[0] == "qgemv"
    assert rules.choose_kernel(qm, 12, "__half")[0] == "qgemv2"
    kernel, why = rules.choose_kernel(qm, 16, "__half")
    assert kernel == ("qwgmma" if large else "qgemv2")
    assert ("two-tile streaming kernel from 13 rows" in why) == large
    assert rules.choose_kernel(qm, 9, "__nv_bfloat16")[0] == "qwgmma"  # no two-tile qgemv for bf16
    assert rules.choose_kernel(qm, 128, "__half")[0] == "qwgmma"
    assert rules.choose_kernel(qm, 256, "__half")[0] == ("dense" if small else "qwgmma")
    assert rules.choose_kernel(qm, 257, "__half")[0] == "dense"
    kernel, why = rules.choose_kernel(qm, 100, "__half")
    assert "sm_90" in why and ("128x128" if large else "32x128" if small else "64x128") in why
    assert ("smaller tiles fill the GPU" in why) == small
    mixed = _fake(k, n, chunks8=4)  # 8-bit and 4-bit storage: qwgmma too, with its dense thresholds
    for m in (9, 16, 64, 129, 257):
        assert rules.choose_kernel(mixed, m, "__half")[0] == ("qwgmma" if m <= rules.dense_threshold(qm) else "dense")
    names = rules.needed_kernels(qm, max_m=256)
    assert ("qwgmma.cu", kernels.frag_xw_name("__half")) in names
    assert ("qwgmma.cu", rules.choose_wgmma(64, k * n).name("__half", 1, False, True)) in names


def test_choose_wgmma():
    cfgs = kernels.WGMMA_CONFIGS
    wide = [rules.choose_wgmma(m) for m in (9, 16, 17, 32, 33, 64, 65, 256)]
    assert wide == [cfgs[n] for n in ("wg16", "wg16", "wg32", "wg32", "wg64", "wg64", "wg128", "wg128")]
    mid = [rules.choose_wgmma(m, 4096 * 14336) for m in (16, 17, 32, 33, 65, 256)]
    assert mid == [cfgs[n] for n in ("wg16k8", "wg32k8", "wg32k8", "wg64", "wg64", "wg64")]
    small = [rules.choose_wgmma(m, 4096 * 4096) for m in (9, 32, 33, 128)]
    assert small == [cfgs[n] for n in ("wg16k8", "wg16k8", "wg32k8", "wg32k8")]
    assert rules.choose_wgmma(64) is cfgs["wg64"]
    # Every tiling the rule picks can run the layout: eight-chunk stages give way where 8-bit storage exceeds shared
    # memory or a storage segment is not a whole number of them (segments are padded to four chunks only).
    for weights in (4096 * 4096, 4096 * 14336, 8192 * 28672):
        for m in (9, 16, 17, 32, 33, 64, 65, 256):
            for c8, c4 in ((0, 64), (0, 172), (64, 0), (12, 52), (8, 56)):
                for zr in (1, 4):
                    cfg = rules.choose_wgmma(m, weights, c8, c4, zr)
                    assert kernels.tiling_misfit(cfg, c8, c4, zr) is None, (cfg, c8, c4, zr)
    assert rules.choose_wgmma(16, 4096 * 4096, 64, 0, 1) is cfgs["wg16"]  # shared memory
    assert rules.choose_wgmma(64, 4096 * 4096, 64, 0, 4) is cfgs["wg32k8"]
    assert rules.choose_wgmma(64, 4096 * 4096, 12, 52, 4) is cfgs["wg32"]  # 12 chunks of 8-bit storage
    assert rules.choose_wgmma(16, 4096 * 11008, 0, 172, 1) is cfgs["wg16"]  # K = 11008: 172 chunks
    assert "do not divide" in kernels.tiling_misfit(cfgs["wg16k8"], 0, 172, 1)
    assert "shared memory" in kernels.tiling_misfit(cfgs["wg16k8"], 64, 0, 1)


def test_needed_kernels_follow_the_rules():
    big = rules.needed_kernels(_fake(8192, 28672), max_m=256)
    assert ("qgemm.cu", "qgemv<__half, 1, false, true>") in big and ("qgemm.cu", "qgemv<__half, 2, false, true>") in big
    for limit in (32, 128):
        assert ("qmma.cu", kernels.QMMA_CONFIGS[limit].name("__half", 1, False, True)) in big
    assert ("qmma.cu", kernels.dequant_t_name("__half", False, True)) in big  # m = 129 and 256: dense
    small = rules.needed_kernels(_fake(4096, 4096, chunks8=8, uniform=False), max_m=64, dtypes=("bfloat16",))
    assert ("qmma.cu", kernels.QMMA_CONFIGS[16].name("__nv_bfloat16", 4, True, True)) in small
    assert not any("128" in n or "__half," in n for _, n in small if n.startswith("qmma"))


def test_runtime_warmup_compiles_every_needed_kernel_first(monkeypatch):
    from cupyq import runtime

    compiled, order = [], []
    monkeypatch.setattr(runtime, "get_function", lambda src, name, dev: compiled.append((dev, src, name)))

    class Fake:
        def __init__(self, names):
            self.names, self.device_id = names, 0

        def needed_kernels(self, *, max_m):
            return self.names

        def warmup(self, *, max_m):
            order.append(len(compiled))

    mats = [Fake({("qgemm.cu", "a"), ("qmma.cu", "b")}), Fake({("qmma.cu", "b"), ("qmma.cu", "c")})]
    for workers in (1, 2):
        compiled.clear()
        order.clear()
        runtime.warmup(mats, max_m=8, workers=workers)
        assert sorted(compiled) == [(0, "qgemm.cu", "a"), (0, "qmma.cu", "b"), (0, "qmma.cu", "c")]
        assert order == [3, 3]  # every kernel loaded before any matrix warms up


def test_runtime_warmup_loads_the_rest_in_threads_after_a_first_load(monkeypatch):
    # Cold or warm kernel cache alike: the first load alone, the others in threads (no test of the first load's
    # time, which took a fast machine's cold cache for a warm one).
    import threading

    from cupyq import runtime

    threads = []
    monkeypatch.setattr(runtime, "get_function", lambda src, name, dev: threads.append(threading.current_thread()))

    class Fake:
        device_id = 0

        def needed_kernels(self, *, max_m):
            return {("qgemm.cu", "a"), ("qgemm.cu", "b"), ("qmma.cu", "c")}

        def warmup(self, *, max_m):
            pass

    runtime.warmup([Fake()], max_m=8, workers=2)
    assert threads[0] is threading.main_thread()
    assert len(threads) == 3 and threading.main_thread() not in threads[1:]
    threads.clear()
    runtime.warmup([Fake()], max_m=8, workers=1)
    assert threads == [threading.main_thread()] * 3
