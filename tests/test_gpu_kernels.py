"""GPU kernels against the float32 reference: both formats, every width and mix, every dispatch path.

Tolerance: weights are dequantised to fp16 (relative rounding 2**-11 per weight), products accumulate in fp32
and the output is rounded to fp16 (2**-11 relative), so the kernel's relative error to the float32 product is
about 1e-3 in the Frobenius norm; the bound 4e-3 leaves room for cancellation in individual outputs while
still catching any wrong weight, group, zero or row (those give errors of order 1).
"""

import numpy as np
import pytest

from cupyq import reference
from cupyq.formats import exl2 as E
from cupyq.formats import gptq as G

pytestmark = pytest.mark.gpu

REL_TOL = 4e-3


def _cupy():
    import cupy

    return cupy


def random_gptq(rng, k, n, *, bits=4, group_size=128, act_order=False, checkpoint_format="gptq", bias=False):
    groups = 1 if group_size == -1 else -(-k // group_size)
    q = rng.integers(0, 2 ** bits, size=(k, n))
    zeros = rng.integers(0, 2 ** bits, size=(groups, n))
    zeros[0, :4] = [0, 2 ** bits - 1, 0, 2 ** bits - 1]  # the v1 edge cases: stored all-ones and zero
    scales = (rng.uniform(0.5, 1.5, size=(groups, n)) * 2.0 / 2 ** bits * 0.05).astype(np.float16)
    gs = k if group_size == -1 else group_size
    if act_order:
        g_idx = (rng.permutation(k) // gs).astype(np.int32)
    else:
        g_idx = (np.arange(k) // gs).astype(np.int32)
    t = dict(
        qweight=G.pack_qweight(q, bits),
        qzeros=G.pack_qzeros(zeros, bits, checkpoint_format=checkpoint_format),
        scales=scales,
        g_idx=g_idx,
    )
    if bias:
        t["bias"] = (rng.standard_normal(n) * 0.1).astype(np.float16)
    return t


def random_exl2(rng, k, n, mix, *, bias=False, permute=True):
    """mix: list of (bits, rows, group_size) in descending width order; rows sum to k."""
    group_bits, group_rows = [], []
    for bits, rows, gs in mix:
        while rows > 0:
            r = min(gs, rows)
            group_bits.append(bits)
            group_rows.append(r)
            rows -= r
    assert sum(group_rows) == k
    q = np.concatenate([rng.integers(0, 2 ** b, size=(r, n)) for b, r in zip(group_bits, group_rows)])
    q_weight, q_groups = E.pack_q_weight(q, group_bits, group_rows)
    codes = rng.integers(0, 16, size=(len(group_bits), n))
    q_scale = E.encode_scale_codes(codes)
    q_scale_max = (rng.uniform(0.5, 1.5, size=len(group_bits)) * 0.02 / np.array([2.0 ** (b - 2) for b in group_bits])).astype(np.float16)
    perm = rng.permutation(k) if permute else np.arange(k)
    t = dict(q_weight=q_weight, q_invperm=np.argsort(perm).astype(np.int32), q_scale=q_scale,
             q_scale_max=q_scale_max, q_groups=q_groups)
    if bias:
        t["bias"] = (rng.standard_normal(n) * 0.1).astype(np.float16)
    return t


def build(fmt, t, bits=4, checkpoint_format="gptq", device=0, as_torch=False):
    import cupyq

    if as_torch:
        import torch

        t = {k: torch.from_numpy(v).cuda(device) for k, v in t.items()}
    if fmt == "gptq":
        return cupyq.QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], t.get("bias"),
                                       bits=bits, checkpoint_format=checkpoint_format, device=device)
    return cupyq.QMatrix.from_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"],
                                   t.get("bias"), device=device)


def ref_weight(fmt, t, bits=4, checkpoint_format="gptq"):
    if fmt == "gptq":
        return reference.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=bits,
                                         checkpoint_format=checkpoint_format)
    return reference.dequantize_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"])


def rel_err(y, y_ref):
    y = np.asarray(y, dtype=np.float64)
    assert np.isfinite(y).all(), "output has NaN/inf (unwritten or overflow)"
    return float(np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref))


def check_gemm(qm, w_ref, bias, m, rng, *, force_cuda=False, dtype="float16"):
    import cupyq
    import torch

    k = w_ref.shape[0]
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).cuda(qm.device_id)
    x = x.to(torch.bfloat16 if dtype == "bfloat16" else torch.float16)
    out = torch.full((m, w_ref.shape[1]), float("nan"), dtype=x.dtype, device=x.device)  # poison
    y = cupyq.gemm(x, qm, out=out, force_cuda=force_cuda)
    assert y.data_ptr() == out.data_ptr()
    y_ref = x.float().cpu().numpy().astype(np.float64) @ w_ref.astype(np.float64)
    if bias is not None:
        y_ref += bias.astype(np.float64)
    return rel_err(y.float().cpu().numpy(), y_ref)


M_SMALL = [1, 2, 3, 5, 8]
M_MID = [9, 16, 23, 40, 64]
M_LARGE = [65, 130, 300]


@pytest.mark.parametrize("bits", [4, 2, 3, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [128, 32, -1, 48])
def test_gptq_widths_groups(bits, act_order, group_size):
    rng = np.random.default_rng(hash((bits, act_order, group_size)) & 0xFFFF)
    k, n = 768, 320
    t = random_gptq(rng, k, n, bits=bits, group_size=group_size, act_order=act_order, bias=True)
    qm = build("gptq", t, bits=bits)
    w = ref_weight("gptq", t, bits=bits)
    for m in (1, 7, 12, 33, 100):
        e = check_gemm(qm, w, t["bias"].astype(np.float32), m, rng)
        assert e < REL_TOL, (m, e)
    e = check_gemm(qm, w, t["bias"].astype(np.float32), 130, rng, force_cuda=True)
    assert e < REL_TOL


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("m", M_SMALL + M_MID + M_LARGE)
def test_gptq_m_sweep(checkpoint_format, m):
    rng = np.random.default_rng(m)
    t = random_gptq(rng, 1024, 512, group_size=128, act_order=True, checkpoint_format=checkpoint_format)
    qm = build("gptq", t, checkpoint_format=checkpoint_format)
    w = ref_weight("gptq", t, checkpoint_format=checkpoint_format)
    assert check_gemm(qm, w, None, m, rng) < REL_TOL


EXL2_MIXES = {
    "4": [(4, 1024, 32)],
    "8_4": [(8, 256, 32), (4, 768, 64)],
    "6_5": [(6, 512, 32), (5, 512, 32)],
    "3_2": [(3, 512, 64), (2, 512, 16)],
    "5_4_3": [(5, 320, 32), (4, 384, 64), (3, 320, 64)],
    "all": [(8, 96, 32), (6, 160, 32), (5, 192, 32), (4, 224, 64), (3, 192, 64), (2, 160, 32)],
    "partial_last": [(4, 992, 128), (2, 32, 32)],
}


@pytest.mark.parametrize("mix", sorted(EXL2_MIXES))
@pytest.mark.parametrize("m", [1, 6, 8, 12, 17, 64, 65, 200])
def test_exl2_mixes(mix, m):
    rng = np.random.default_rng(m * 31 + len(mix))
    t = random_exl2(rng, 1024, 256, EXL2_MIXES[mix], bias=(m % 2 == 1))
    qm = build("exl2", t)
    w = ref_weight("exl2", t)
    b = t["bias"].astype(np.float32) if "bias" in t else None
    assert check_gemm(qm, w, b, m, rng) < REL_TOL


@pytest.mark.parametrize("k,n", [(128, 64), (256, 40), (4096, 4096), (8192, 1024), (1024, 8192), (4096, 11008)])
@pytest.mark.parametrize("m", [1, 4, 32, 128])
def test_shapes(k, n, m):
    rng = np.random.default_rng(k + n + m)
    t = random_gptq(rng, k, n, group_size=128 if k >= 128 else -1, act_order=(m % 2 == 0))
    qm = build("gptq", t)
    w = ref_weight("gptq", t)
    assert check_gemm(qm, w, None, m, rng) < REL_TOL


def test_bfloat16_activations():
    rng = np.random.default_rng(5)
    t = random_gptq(rng, 512, 256, group_size=64, act_order=True, bias=True)
    qm = build("gptq", t)
    w = ref_weight("gptq", t)
    # bf16 inputs and outputs carry 8 mantissa bits: relative error about 4e-3
    for m in (1, 12, 20, 100):
        assert check_gemm(qm, w, t["bias"].astype(np.float32), m, rng, dtype="bfloat16") < 1.5e-2


@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (8, False)])
@pytest.mark.parametrize("aligned", [True, False])
def test_bfloat16_streaming_kernel_outside_the_fp16_range(bits, act_order, aligned):
    """The streaming kernel multiplies bf16 activations in fp16, each batch row of a CTA's rows scaled by a power
    of two: rows far above fp16's range (1e30) or below it (1e-30), rows with one outlier, K split over several
    CTAs (each with its own scale) and misaligned rows (staged element by element) must all keep bf16 accuracy."""
    import torch

    import cupyq
    from cupyq import rules

    rng = np.random.default_rng(40 + bits + 2 * act_order + 4 * aligned)
    k, n = 8192, 384
    t = random_gptq(rng, k, n, bits=bits, group_size=128, act_order=act_order)
    qm, w = build("gptq", t, bits=bits), ref_weight("gptq", t, bits=bits).astype(np.float64)
    for m in (1, 3, 8):
        assert rules.choose_kernel(qm, m, "__nv_bfloat16")[0] == "qgemv"
        x = rng.standard_normal((m, k)) * np.array([1e30, 1e-30, 3.0, 1e5, 1.0, 1e-8, 1e20, 2.0])[:m, None]
        x[-1, rng.integers(k)] *= 1e4  # one outlier in the last row
        xb = torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
        flat = torch.empty(m * k + (0 if aligned else 1), dtype=torch.bfloat16, device="cuda")
        xd = flat[(0 if aligned else 1):].view(m, k)
        xd.copy_(xb)
        assert (xd.data_ptr() % 16 == 0) == aligned
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")  # poison
        y = cupyq.gemm(xd, qm, out=out).double().cpu().numpy()
        y_ref = xb.double().numpy() @ w
        for r in range(m):  # each row against its own magnitude; bf16 output: about 4e-3
            assert rel_err(y[r], y_ref[r]) < 1.5e-2, (m, r)
        assert qm._plans[(m, "__nv_bfloat16")].launcher.grid[1] > 1  # K was split: several scales per row


@pytest.mark.parametrize("fmt,group_size", [("gptq", 128), ("gptq", 32), ("exl2", None)])
def test_bfloat16_streaming_kernel_on_8bit_storage(fmt, group_size):
    """bf16 activations on 8-bit storage, alone (GPTQ: groups of 128 take the per-chunk scaling, groups of 32
    the per-tile one) and mixed with 4-bit (EXL2 8_4), through the streaming kernel (m <= 8)."""
    from cupyq import rules

    rng = np.random.default_rng(17 + (group_size or 0))
    if fmt == "gptq":
        t, bits = random_gptq(rng, 768, 320, bits=8, group_size=group_size, act_order=True, bias=True), 8
    else:
        t, bits = random_exl2(rng, 1024, 256, EXL2_MIXES["8_4"], bias=True), 4
    qm = build(fmt, t, bits=bits)
    w = ref_weight(fmt, t, bits=bits)
    assert qm.layout.chunks8 > 0 and (qm.layout.chunks4 > 0) == (fmt == "exl2")
    for m in (1, 5, 8):
        assert rules.choose_kernel(qm, m, "__nv_bfloat16")[0] == "qgemv"
        # the bound of test_bfloat16_activations: bf16 inputs and outputs carry 8 mantissa bits
        assert check_gemm(qm, w, t["bias"].astype(np.float32), m, rng, dtype="bfloat16") < 1.5e-2, m


def test_dequantize_matches_reference():
    rng = np.random.default_rng(11)
    for fmt, t in (("gptq", random_gptq(rng, 512, 96, group_size=32, act_order=True)),
                   ("exl2", random_exl2(rng, 1024, 96, EXL2_MIXES["all"]))):
        qm = build(fmt, t)
        w = ref_weight(fmt, t)
        d = qm.dequantize()
        assert d.dtype == np.float16 and d.shape == w.shape
        # fp16 rounding of s (subnormal below 2**-14: absolute error 2**-25) times |q - z| <= 255, then of the
        # product (relative 2**-11)
        np.testing.assert_allclose(d.get().astype(np.float32), w, rtol=2 ** -10, atol=255 * 2 ** -25)


def test_inputs_not_mutated_and_torch_inputs():
    rng = np.random.default_rng(12)
    t = random_gptq(rng, 512, 128, group_size=128, act_order=True)
    before = {k: v.copy() for k, v in t.items()}
    qm = build("gptq", t, as_torch=True)
    for k in t:
        np.testing.assert_array_equal(t[k], before[k])
    w = ref_weight("gptq", t)
    assert check_gemm(qm, w, None, 5, rng) < REL_TOL


def test_cupy_front_end_and_stream():
    cp = _cupy()
    import cupyq

    rng = np.random.default_rng(13)
    t = random_exl2(rng, 1024, 128, EXL2_MIXES["8_4"], bias=True)
    qm = build("exl2", t)
    w = ref_weight("exl2", t)
    for m in (3, 90):
        x = cp.asarray(rng.standard_normal((2, m, 1024)).astype(np.float16))
        with cp.cuda.Stream(non_blocking=True) as s:
            y = cupyq.gemm(x, qm)
            s.synchronize()
        assert isinstance(y, cp.ndarray) and y.shape == (2, m, 128) and y.dtype == np.float16
        y_ref = x.get().astype(np.float64) @ w + t["bias"].astype(np.float64)
        assert rel_err(y.get(), y_ref) < REL_TOL


def test_torch_non_default_stream_and_determinism():
    import torch
    import cupyq

    rng = np.random.default_rng(14)
    t = random_gptq(rng, 4096, 1024, group_size=128, act_order=True)
    qm = build("gptq", t)
    x = torch.randn(4, 4096, device="cuda", dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ys = [cupyq.gemm(x, qm) for _ in range(5)]
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    for y in ys[1:]:
        assert torch.equal(y, ys[0])  # split-K partials are summed in a fixed order
    w = ref_weight("gptq", t)
    assert rel_err(ys[0].float().cpu().numpy(), x.float().cpu().numpy().astype(np.float64) @ w) < REL_TOL


def test_cuda_graph_capture_and_replay():
    import torch
    import cupyq

    rng = np.random.default_rng(15)
    t = random_exl2(rng, 1024, 256, EXL2_MIXES["5_4_3"], bias=True)
    qm = build("exl2", t)
    w = ref_weight("exl2", t)
    x = torch.randn(3, 1024, device="cuda", dtype=torch.float16)
    qm.warmup(max_m=8)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = cupyq.gemm(x, qm)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = cupyq.gemm(x, qm)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        y.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        y_ref = x.float().cpu().numpy().astype(np.float64) @ w + t["bias"].astype(np.float64)
        assert rel_err(y.float().cpu().numpy(), y_ref) < REL_TOL


def test_errors():
    import torch
    import cupyq

    rng = np.random.default_rng(16)
    t = random_gptq(rng, 256, 64, group_size=64)
    qm = build("gptq", t)
    with pytest.raises(ValueError, match="x: expected shape"):
        cupyq.gemm(torch.zeros(2, 255, device="cuda", dtype=torch.float16), qm)
    with pytest.raises(TypeError, match="x: expected dtype"):
        cupyq.gemm(torch.zeros(2, 256, device="cuda", dtype=torch.float32), qm)
    with pytest.raises(ValueError, match="contiguous"):
        cupyq.gemm(torch.zeros(256, 4, device="cuda", dtype=torch.float16).t(), qm)
    with pytest.raises(ValueError, match="out: expected shape"):
        cupyq.gemm(torch.zeros(2, 256, device="cuda", dtype=torch.float16), qm,
                   out=torch.empty(2, 63, device="cuda", dtype=torch.float16))


def test_chunked_dense_path_with_small_scratch():
    cp = _cupy()
    rng = np.random.default_rng(17)
    t = random_gptq(rng, 2048, 512, group_size=128, act_order=True, bias=True)
    qm = build("gptq", t)
    # 1 MiB: half of K*N*2 = 2 MiB, and it must also hold the gathered activations (m*K*2 = 400 KiB)
    qm.set_scratch(cp.empty(1 << 20, dtype=cp.uint8))
    w = ref_weight("gptq", t)
    assert check_gemm(qm, w, t["bias"].astype(np.float32), 100, rng) < REL_TOL


def test_dense_path_tiny_scratch_and_cupy_chunks():
    import cupyq

    cp = _cupy()
    rng = np.random.default_rng(19)
    t = random_gptq(rng, 1024, 256, group_size=64, act_order=True, bias=True)
    qm = build("gptq", t)
    w = ref_weight("gptq", t)
    b = t["bias"].astype(np.float32)
    # 4 KiB holds no chunk of 64 dequantised rows: the batch goes through the quantized kernel instead
    qm.set_scratch(cp.empty(4096, dtype=cp.uint8))
    assert check_gemm(qm, w, b, 100, rng) < REL_TOL
    # 300 KiB: the gathered activations (200 KiB) and chunks of 192 rows, through the CuPy front end
    qm.set_scratch(cp.empty(300 * 1024, dtype=cp.uint8))
    x = rng.standard_normal((100, 1024)).astype(np.float16)
    out = cp.full((100, 256), cp.nan, dtype=cp.float16)  # poison
    y = cupyq.gemm(cp.asarray(x), qm, out=out)
    assert y.data.ptr == out.data.ptr
    assert rel_err(y.get(), x.astype(np.float64) @ w + b) < REL_TOL


@pytest.mark.parametrize("case", ["g128", "g128_act", "g32_bias", "gfull"])
def test_golden_gptq(case):
    _golden("gptq", case)


@pytest.mark.parametrize("case", ["b4_g32", "b8_4", "b6_5_bias", "b3_2"])
def test_golden_exl2(case):
    _golden("exl2", case)


def _golden(fmt, case):
    import pathlib

    import torch
    import cupyq
    from safetensors.numpy import load_file

    data = load_file(str(pathlib.Path(__file__).parent / "data" / f"golden_{fmt}.safetensors"))
    t = {k.split(".", 1)[1]: v for k, v in data.items() if k.startswith(case + ".")}
    qm = build(fmt, {k: v for k, v in t.items() if not (k.startswith("a_m") or k.startswith("c_m") or k == "w_dq")})
    w_ref = ref_weight(fmt, t)
    ms = sorted(int(k[3:]) for k in t if k.startswith("a_m"))
    assert ms
    for m in ms:
        a = t[f"a_m{m}"]
        y_ref = a.astype(np.float64) @ w_ref.astype(np.float64)
        if "bias" in t:
            y_ref += t["bias"].astype(np.float64)
        y = cupyq.gemm(torch.from_numpy(a).cuda(), qm).float().cpu().numpy()
        ours = rel_err(y, y_ref)
        upstream = rel_err(t[f"c_m{m}"].astype(np.float32), y_ref)
        assert ours <= max(upstream * 1.5, 1.5e-3), (m, ours, upstream)


@pytest.mark.parametrize("fmt,act_order", [("gptq", False), ("gptq", True), ("exl2", True)])
@pytest.mark.parametrize("m", [9, 17, 33, 100, 200])
def test_qmma_activation_staging(fmt, act_order, m):
    """qmma reads its activations through frag_x: 16-byte loads for aligned rows of non-permuted matrices,
    element loads through the row permutation otherwise. Rows that are not 16-byte aligned (a view one element
    into its storage), a K that is not a multiple of the 64-row chunk (padding rows), batches that are not a
    multiple of 16 and batches of several m blocks all go through it."""
    import cupyq
    import torch

    rng = np.random.default_rng(m * 7 + act_order)
    k, n = 1000, 200
    if fmt == "gptq":
        t = random_gptq(rng, k, n, group_size=40, act_order=act_order)
    else:
        t = random_exl2(rng, 1024, n, EXL2_MIXES["all"])
        k = 1024
    qm = build(fmt, t)
    w = ref_weight(fmt, t).astype(np.float64)
    for offset in (0, 1):
        store = torch.from_numpy(rng.standard_normal(m * k + offset).astype(np.float32)).cuda().half()
        x = store[offset:].view(m, k)
        assert (x.data_ptr() % 16 != 0) == (offset == 1)
        x_before = x.clone()
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        cupyq.gemm(x, qm, out=out, force_cuda=True)
        assert torch.equal(x, x_before)
        y_ref = x.float().cpu().numpy().astype(np.float64) @ w
        assert rel_err(out.float().cpu().numpy(), y_ref) < REL_TOL


def _sm90():
    import cupy

    return cupy.cuda.Device(0).compute_capability == "90"


@pytest.mark.parametrize("layout", ["gptq4", "gptq4_act", "gptq8", "gptq3_act", "exl2_3_2", "exl2_6_5", "exl2_8_4",
                                    "exl2_all"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("nb,nw", [(16, 1), (16, 2), (32, 1), (64, 1), (64, 2), (128, 1), (128, 2)])
def test_qwgmma_matches_reference(layout, dtype, nb, nw):
    """The sm_90a warpgroup kernel on every storage (4-bit: GPTQ 2-4 bits, EXL2 mixes of 2-4 bits; 8-bit: GPTQ 8
    bits, EXL2 mixes of 5-8 bits; both: EXL2 mixes across 4 bits), with act-order and EXL2 row permutations, both activation
    types, batch tiles of 16-128 rows (16 rows on chunk-uniform groups: post-scaled chunks) and CTAs of one or
    two column sets (320 columns: a partial last column block), batches that are not a multiple of 8 and span
    several m blocks, outputs poisoned."""
    from cupyq import kernels

    if not _sm90():
        pytest.skip("qwgmma needs an sm_90 GPU")
    rng = np.random.default_rng(nb + 7 * nw + len(layout) + len(dtype))
    _check_qwgmma(rng, layout, dtype, kernels.WgmmaConfig(nb, 2, 3, nw))


@pytest.mark.parametrize("layout", ["gptq4", "gptq8", "gptq3_act", "exl2_8_4"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["wg16", "wg16k8", "wg32", "wg32k8", "wg64", "wg128"])
def test_qwgmma_dispatched_tilings_match_reference(layout, dtype, name):
    """Every tiling dispatch runs (kernels.WGMMA_CONFIGS, stages of four and eight chunks) against the reference;
    a tiling that cannot run a layout (kernels.tiling_misfit) is refused by the plan, and the rules never pick it."""
    from cupyq import kernels

    if not _sm90():
        pytest.skip("qwgmma needs an sm_90 GPU")
    assert set(kernels.WGMMA_CONFIGS) == {"wg16", "wg16k8", "wg32", "wg32k8", "wg64", "wg128"}
    cfg = kernels.WGMMA_CONFIGS[name]
    rng = np.random.default_rng(len(name) + 3 * len(layout) + len(dtype))
    _check_qwgmma(rng, layout, dtype, cfg)


def _check_qwgmma(rng, layout, dtype, cfg):
    """qwgmma of tiling ``cfg`` on a 1024 x 320 matrix of ``layout`` against the float64 product, at batches of a
    partial tile, several m blocks and not a multiple of 8, outputs poisoned; a tiling that cannot run the layout
    must be refused by the plan and never chosen by the rules."""
    import torch

    from cupyq import kernels, launch, plans, rules
    from cupyq.device import torch_stream

    if layout.startswith("gptq"):
        bits = int(layout[4])
        t = random_gptq(rng, 1024, 320, bits=bits, group_size=64, act_order=layout.endswith("act"), bias=True)
        qm, w = build("gptq", t, bits=bits), ref_weight("gptq", t, bits=bits)
    else:
        t = random_exl2(rng, 1024, 320, EXL2_MIXES[layout[5:]], bias=True)
        qm, w = build("exl2", t), ref_weight("exl2", t)
    assert rules.wgmma_supported(qm)
    ct = "__half" if dtype == "float16" else "__nv_bfloat16"
    tol = REL_TOL if dtype == "float16" else 1.5e-2
    nb = cfg.m_tile
    for m in (1, 13, 64, nb + 9, 2 * nb + 40):
        x = torch.from_numpy(rng.standard_normal((m, 1024)).astype(np.float32)).cuda().to(getattr(torch, dtype))
        out = torch.full((m, 320), float("nan"), dtype=x.dtype, device="cuda")
        lay, zr = qm.layout, rules.scale_rows_per_chunk(qm)
        if kernels.tiling_misfit(cfg, lay.chunks8, lay.chunks4, zr):
            with pytest.raises(ValueError, match="cannot run this layout"):
                plans._qmma_plan(qm, m, ct, cfg)
            assert all(rules.choose_wgmma(mm, w, lay.chunks8, lay.chunks4, zr) is not cfg
                       for mm in (16, 32, 64) for w in (1 << 24, 1 << 26))
            return
        plan = plans._qmma_plan(qm, m, ct, cfg)
        launch._launch_plan(qm, plan, x.data_ptr(), out.data_ptr(), m, ct, torch_stream(0),
                            torch.cuda.is_current_stream_capturing)
        y_ref = x.float().cpu().numpy().astype(np.float64) @ w.astype(np.float64) + t["bias"].astype(np.float64)
        assert rel_err(out.float().cpu().numpy(), y_ref) < tol, m
