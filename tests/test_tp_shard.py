"""Shards of GPTQ / EXL2 / AWQ layers (cupyq.distributed), one process: every rank's dequantised shard is
exactly the matching slice of the dequantised full matrix, and the ranks' products add up to the full one
(CPU reference path; GPU kernels under the ``gpu`` marker)."""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cupyq import QMatrix, reference
from cupyq.checkpoint import open_checkpoint, save_exl2, save_gptq
from cupyq.distributed import CheckpointLayer, shard_awq, shard_exl2, shard_gptq
from cupyq.formats.common import unit_rows
from cupyq.quantize import quantize_exl2, quantize_gptq

K, N = 256, 128
GPTQ_CASES = [  # bits, group_size, act_order, checkpoint_format
    (4, 32, False, "gptq"),
    (4, 32, True, "gptq"),
    (4, 48, False, "gptq"),  # groups straddle the rank boundaries
    (3, 64, True, "gptq_v2"),
    (2, -1, False, "gptq"),
    (8, 128, True, "gptq"),
    (2, 16, True, "gptq_v2"),
]
GPTQ_IDS = [f"{b}bit-g{g}-{'act' if a else 'noact'}-{f}" for b, g, a, f in GPTQ_CASES]
EXL2_MIXES = [((4,), (1.0,)), ((8, 4), (0.25, 0.75)), ((6, 5, 3), (0.3, 0.3, 0.4)), ((5, 4, 2), (0.2, 0.5, 0.3))]


def _weight(seed, k=K, n=N):
    return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)


def _gptq(case, seed=0, bias=True):
    bits, gs, act, fmt = case
    rng = np.random.default_rng(seed + 100)
    return quantize_gptq(_weight(seed), bits=bits, group_size=gs, act_order=act, sym=bits != 3,
                         checkpoint_format=fmt, importance=rng.random(K), bias=rng.standard_normal(N) if bias else None)


def _exl2(mix, seed=0):
    rng = np.random.default_rng(seed + 200)
    return quantize_exl2(_weight(seed), bits=mix[0], proportions=mix[1], importance=rng.random(K),
                         bias=rng.standard_normal(N))


def _dq_gptq(t, case):
    return reference.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"), bits=case[0],
                                     checkpoint_format=case[3], group_size=None if "g_idx" in t else case[1])


def _dq_exl2(t):
    return reference.dequantize_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"])


# ------------------------------------------------------------------------------------------------ GPTQ
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("case", GPTQ_CASES, ids=GPTQ_IDS)
def test_gptq_column_shards_are_column_slices(case, world_size):
    full = _gptq(case)
    w = _dq_gptq(full, case)
    part = N // world_size
    for rank in range(world_size):
        s = shard_gptq(full, rank=rank, world_size=world_size, mode="column", bits=case[0])
        assert sorted(s) == sorted(full)
        cols = slice(rank * part, (rank + 1) * part)
        np.testing.assert_array_equal(_dq_gptq(s, case), w[:, cols])
        np.testing.assert_array_equal(s["bias"], full["bias"][cols])
        np.testing.assert_array_equal(s["g_idx"], full["g_idx"])


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("case", GPTQ_CASES, ids=GPTQ_IDS)
def test_gptq_row_shards_are_row_slices(case, world_size):
    bits, gs, act, _ = case
    full = _gptq(case, seed=1)
    w = _dq_gptq(full, case)
    part = K // world_size
    for rank in range(world_size):
        s = shard_gptq(full, rank=rank, world_size=world_size, mode="row")  # bits from qweight and g_idx
        rows = slice(rank * part, (rank + 1) * part)
        np.testing.assert_array_equal(_dq_gptq(s, case), w[rows])
        np.testing.assert_array_equal(s["bias"], full["bias"])  # whole: added once after the reduce
        if act and gs != -1:  # absolute groups, all of them
            np.testing.assert_array_equal(s["g_idx"], full["g_idx"][rows])
            assert s["scales"].shape == full["scales"].shape
        else:  # a contiguous range of groups, rebased
            first, last = full["g_idx"][rows][[0, -1]]
            assert s["g_idx"][0] == 0 and s["scales"].shape[0] == last - first + 1
            np.testing.assert_array_equal(s["scales"], full["scales"][first : last + 1])


def test_gptq_row_shard_without_g_idx_adds_one_only_when_needed():
    # 52-row groups: 5 groups over 256 rows. Rank 0 starts on a group boundary (its k // 52 holds, the last group
    # partial); rank 1 starts inside a group, so it gets a g_idx.
    case = (4, 52, False, "gptq")
    with_g = _gptq(case)
    w = _dq_gptq(with_g, case)
    full = {k: v for k, v in with_g.items() if k != "g_idx"}
    for rank in range(2):
        s = shard_gptq(full, rank=rank, world_size=2, mode="row", bits=4, group_size=52)
        rows = np.arange(rank * 128, (rank + 1) * 128)
        assert ("g_idx" in s) == (rank == 1)
        if rank == 1:
            np.testing.assert_array_equal(s["g_idx"], rows // 52 - rows[0] // 52)
        np.testing.assert_array_equal(_dq_gptq(s, case), w[rows])
    # 64-row groups: each rank holds whole groups, so the implied k // 64 stays right and no g_idx is added.
    case = (4, 64, False, "gptq")
    with_g = _gptq(case)
    full = {k: v for k, v in with_g.items() if k != "g_idx"}
    s = shard_gptq(full, rank=1, world_size=2, mode="row", bits=4, group_size=64)
    assert sorted(s) == sorted(full)
    np.testing.assert_array_equal(_dq_gptq(s, case), _dq_gptq(with_g, case)[128:])
    # Without g_idx or group_size, 5 groups over 256 rows fit sizes 52..63: no guess is taken.
    with pytest.raises(ValueError, match=r"group_size: .*g_idx is absent.*52\.\.63: pass group_size="):
        shard_gptq({k: v for k, v in _gptq((4, 52, False, "gptq")).items() if k != "g_idx"}, rank=0, world_size=2,
                   mode="row", bits=4)


# ------------------------------------------------------------------------------------------------ EXL2
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("mix", EXL2_MIXES, ids=["-".join(map(str, m[0])) for m in EXL2_MIXES])
def test_exl2_column_shards_are_column_slices(mix, world_size):
    full = _exl2(mix)
    w = _dq_exl2(full)
    part = N // world_size
    for rank in range(world_size):
        s = shard_exl2(full, rank=rank, world_size=world_size, mode="column")
        assert sorted(s) == sorted(full)
        np.testing.assert_array_equal(_dq_exl2(s), w[:, rank * part : (rank + 1) * part])
        np.testing.assert_array_equal(s["q_invperm"], full["q_invperm"])


def _check_exl2_groups(t):
    """Every group but the last fills whole packing units and widths descend (what the format requires)."""
    pairs = t["q_groups"].astype(np.int64).reshape(-1, 2)
    ends = list(pairs[1:, 1]) + [t["q_weight"].shape[0]]
    for (b, start), end in list(zip(pairs, ends))[:-1]:
        assert (end - start) * 32 % (b * unit_rows(b)) == 0
    assert np.all(np.diff(pairs[:, 0]) <= 0)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("mix", EXL2_MIXES, ids=["-".join(map(str, m[0])) for m in EXL2_MIXES])
def test_exl2_row_shards_are_row_slices(mix, world_size):
    full = _exl2(mix, seed=2)
    w = _dq_exl2(full)
    part = K // world_size
    for rank in range(world_size):
        s = shard_exl2(full, rank=rank, world_size=world_size, mode="row")
        assert sorted(s) == sorted(full)
        _check_exl2_groups(s)
        w_s = _dq_exl2(s)
        rows = slice(rank * part, (rank + 1) * part)
        np.testing.assert_array_equal(w_s[:part], w[rows])
        assert not np.any(w_s[part:])  # padding rows are zero
        if world_size == 1:  # whole groups need neither padding nor wider storage
            assert w_s.shape[0] == K and np.array_equal(s["q_groups"], full["q_groups"])
        qm = QMatrix.from_exl2(s["q_weight"], s["q_invperm"], s["q_scale"], s["q_scale_max"], s["q_groups"],
                               in_features=part)
        assert qm.in_features == part
        np.testing.assert_array_equal(qm.reference_weight(), w[rows])
        np.testing.assert_array_equal(s["bias"], full["bias"])


def test_exl2_row_padding_uses_the_kernel_storage_width():
    """3- and 5-bit groups (packing units of 32 rows) that a rank holds part of are stored as 4- and 8-bit, whose
    units are 8 and 4 rows, so a shard never carries more than 7 padding rows per group."""
    full = _exl2(((5, 3), (0.5, 0.5)), seed=3)
    s = shard_exl2(full, rank=1, world_size=4, mode="row")
    widths = set(s["q_groups"][::2].tolist())
    assert widths <= {8, 5, 4, 3}
    groups = s["q_scale"].shape[0]
    assert s["q_invperm"].shape[0] - K // 4 <= 7 * groups


def test_from_exl2_in_features_rejects_nonzero_padding_rows():
    s = shard_exl2(_exl2(EXL2_MIXES[1]), rank=0, world_size=4, mode="row")
    parts = [s[p] for p in ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")]
    with pytest.raises(ValueError, match="in_features"):
        QMatrix.from_exl2(*parts, in_features=s["q_invperm"].shape[0] + 1)
    with pytest.raises(ValueError, match="padding rows"):  # a real row of the shard is not zero
        QMatrix.from_exl2(*parts, in_features=K // 4 - 1)


# ------------------------------------------------------------------------------------------------ AWQ
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a word holds output 8*word + AWQ_ORDER[i]


def _awq_pack(values):
    """uint8 [R, N] 4-bit values -> int32 [R, N/8] in the AutoAWQ GEMM order."""
    r, n = values.shape
    v = values.reshape(r, n // 8, 8).astype(np.uint32)
    words = np.zeros((r, n // 8), dtype=np.uint32)
    for i, col in enumerate(AWQ_ORDER):
        words |= v[:, :, col] << np.uint32(4 * i)
    return words.view(np.int32)


def _awq_dequantize(t, group_size):
    """float32 [K, N]: W[k, n] = (q[k, n] - z[k // gs, n]) * s[k // gs, n], read nibble by nibble."""
    def unpack(words):
        u = words.view(np.uint32)
        out = np.empty((u.shape[0], u.shape[1] * 8), dtype=np.float32)
        for i, col in enumerate(AWQ_ORDER):
            out[:, col::8] = (u >> np.uint32(4 * i)) & 15
        return out

    q, z = unpack(t["qweight"]), unpack(t["qzeros"])
    g = np.arange(q.shape[0]) // group_size
    return (q - z[g]) * t["scales"].astype(np.float32)[g]


def _awq(group_size, seed=0, k=K, n=N):
    rng = np.random.default_rng(seed)
    groups = k // group_size
    return {
        "qweight": _awq_pack(rng.integers(0, 16, (k, n), dtype=np.uint8)),
        "qzeros": _awq_pack(rng.integers(0, 16, (groups, n), dtype=np.uint8)),
        "scales": (rng.random((groups, n)) * 0.02 + 0.001).astype(np.float16),
        "bias": rng.standard_normal(n).astype(np.float16),
    }


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("group_size", [32, 64, K])
def test_awq_shards_are_slices(group_size, world_size):
    full = _awq(group_size)
    w = _awq_dequantize(full, group_size)
    for rank in range(world_size):
        c = shard_awq(full, rank=rank, world_size=world_size, mode="column")
        cols = slice(rank * N // world_size, (rank + 1) * N // world_size)
        np.testing.assert_array_equal(_awq_dequantize(c, group_size), w[:, cols])
        np.testing.assert_array_equal(c["bias"], full["bias"][cols])
        r = shard_awq(full, rank=rank, world_size=world_size, mode="row", group_size=group_size)
        rows = slice(rank * K // world_size, (rank + 1) * K // world_size)
        local_gs = min(group_size, K // world_size)  # one group over all rows stays one group
        np.testing.assert_array_equal(_awq_dequantize(r, local_gs), w[rows])
        np.testing.assert_array_equal(r["bias"], full["bias"])


def test_awq_row_shard_needs_whole_groups():
    with pytest.raises(ValueError, match="whole groups"):
        shard_awq(_awq(128), rank=0, world_size=4, mode="row")


# ------------------------------------------------------------------------------------------------ sums
@pytest.mark.parametrize("kind", ["gptq-act", "gptq", "exl2"])
def test_row_partial_products_sum_to_the_full_product_cpu(kind):
    world_size = 4
    if kind == "exl2":
        full = _exl2(EXL2_MIXES[2], seed=4)
        whole = QMatrix.from_exl2(*(full[p] for p in ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")))
    else:
        case = (4, 32, kind == "gptq-act", "gptq")
        full = _gptq(case, seed=4, bias=False)
        whole = QMatrix.from_gptq(full["qweight"], full["qzeros"], full["scales"], full["g_idx"], bits=4)
    x = np.random.default_rng(5).standard_normal((3, K)).astype(np.float32)
    total = np.zeros((3, N), dtype=np.float64)
    part = K // world_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "no GPU kernel ran"
        for rank in range(world_size):
            qm = _rank_qmatrix(full, kind, rank, world_size, device=None)
            total += qm_gemm(x[:, rank * part : (rank + 1) * part], qm)
        ref = qm_gemm(x, whole)
    # float32 products of 64-term partial sums against one 256-term sum: rounding only (~1e-7 relative).
    assert np.linalg.norm(total - ref) / np.linalg.norm(ref) < 1e-5


def qm_gemm(x, qm):
    from cupyq import gemm

    return gemm(np.ascontiguousarray(x), qm).astype(np.float64)


def _rank_qmatrix(full, kind, rank, world_size, device, mode="row"):
    if kind == "exl2":
        s = shard_exl2(full, rank=rank, world_size=world_size, mode=mode)
        k = full["q_invperm"].shape[0] // world_size if mode == "row" else None
        return QMatrix.from_exl2(s["q_weight"], s["q_invperm"], s["q_scale"], s["q_scale_max"], s["q_groups"],
                                 device=device, in_features=k)
    s = shard_gptq(full, rank=rank, world_size=world_size, mode=mode, bits=4)
    return QMatrix.from_gptq(s["qweight"], s["qzeros"], s["scales"], s["g_idx"], bits=4, device=device)


# ------------------------------------------------------------------------------------------------ checkpoint
@pytest.mark.parametrize("kind", ["gptq", "exl2"])
def test_checkpoint_layer_shards_equal_shards_of_the_loaded_layer(tmp_path, kind):
    name = "model.layers.0.mlp.down_proj"
    if kind == "gptq":
        save_gptq(tmp_path, {name: _gptq((4, 32, True, "gptq"))}, bits=4, group_size=32, desc_act=True, sym=True)
        shard = shard_gptq
    else:
        layer = _exl2(EXL2_MIXES[2])
        layer["bias"] = layer["bias"][:100]  # an unpadded bias: both readers pad it with zeros
        save_exl2(tmp_path, {name: layer})
        shard = shard_exl2
    ckpt = open_checkpoint(tmp_path)
    lazy, loaded = CheckpointLayer(ckpt, name), ckpt.load_layer(name)
    loaded.pop("q_perm", None)
    assert sorted(lazy) == sorted(loaded)
    for mode in ("column", "row"):
        for rank in range(2):
            got = shard(lazy, rank=rank, world_size=2, mode=mode)
            want = shard(loaded, rank=rank, world_size=2, mode=mode)
            assert sorted(got) == sorted(want)
            for key in want:
                assert got[key].dtype == want[key].dtype, key
                np.testing.assert_array_equal(got[key], want[key])


def test_checkpoint_layer_column_read_touches_only_the_slice(tmp_path, monkeypatch):
    import cupyq.checkpoint.directory

    name = "model.layers.0.self_attn.q_proj"
    save_gptq(tmp_path, {name: _gptq((4, 32, False, "gptq"))}, bits=4, group_size=32, desc_act=False, sym=True)
    lazy = CheckpointLayer(open_checkpoint(tmp_path), name)

    def no_whole_reads(rec):
        raise AssertionError(f"read the whole of {rec.name}")

    monkeypatch.setattr(cupyq.checkpoint.directory, "_read_record", no_whole_reads)  # where load_tensor looks it up
    for mode in ("column", "row"):
        shard_gptq(lazy, rank=1, world_size=2, mode=mode)  # memory-mapped slices only
    part = lazy.read("qweight", cols=slice(64, 128))
    assert part.shape == (K // 8, 64) and part.flags.owndata
    with pytest.raises(KeyError, match="q_weight"):
        lazy.read("q_weight")


@settings(max_examples=25)
@given(
    world_size=st.integers(1, 5),
    rows_per_rank=st.sampled_from([16, 32, 48, 96]),
    mix=st.sampled_from([((8, 6), (0.5, 0.5)), ((5, 3, 2), (0.3, 0.3, 0.4)), ((6, 4, 3), (0.2, 0.3, 0.5)), ((2,), (1.0,))]),
    two_bit_groups=st.sampled_from([16, 32]),
    seed=st.integers(0, 2**16),
)
def test_exl2_row_shards_of_any_split_are_row_slices(world_size, rows_per_rank, mix, two_bit_groups, seed):
    k, n = world_size * rows_per_rank, 32
    rng = np.random.default_rng(seed)
    full = quantize_exl2(rng.standard_normal((k, n)).astype(np.float32), bits=mix[0], proportions=mix[1],
                         group_sizes={2: two_bit_groups}, importance=rng.random(k))
    w = _dq_exl2(full)
    for rank in range(world_size):
        s = shard_exl2(full, rank=rank, world_size=world_size, mode="row")
        _check_exl2_groups(s)
        w_s = _dq_exl2(s)
        np.testing.assert_array_equal(w_s[:rows_per_rank], w[rank * rows_per_rank : (rank + 1) * rows_per_rank])
        assert not np.any(w_s[rows_per_rank:])


# ------------------------------------------------------------------------------------------------ errors
def test_bad_arguments_name_what_is_wrong():
    full = _gptq((4, 32, False, "gptq"))
    with pytest.raises(ValueError, match="mode"):
        shard_gptq(full, rank=0, world_size=2, mode="diagonal")
    with pytest.raises(ValueError, match="rank"):
        shard_gptq(full, rank=2, world_size=2, mode="row")
    with pytest.raises(ValueError, match="out_features"):  # 128 / 3 does not split
        shard_gptq(full, rank=0, world_size=3, mode="column")
    three = _gptq((3, 64, True, "gptq_v2"))
    with pytest.raises(ValueError, match="multiple of 32"):  # 3-bit zero fields: 32 columns per word group
        shard_gptq(three, rank=0, world_size=8, mode="column", bits=3)
    with pytest.raises(ValueError, match="missing"):
        shard_exl2({"q_weight": np.zeros((1, 8), np.int32)}, rank=0, world_size=1, mode="row")
    with pytest.raises(TypeError, match="mapping"):
        shard_awq([1, 2], rank=0, world_size=1, mode="row")


@pytest.mark.parametrize("argument, value", [("group_size", "32"), ("group_size", 32.0), ("group_size", True),
                                             ("rank", "0"), ("world_size", 2.0), ("bits", "4"), ("bits", 4.0)])
def test_argument_of_the_wrong_type_is_named(argument, value):
    layers = {"gptq": _gptq((4, 32, False, "gptq")), "exl2": _exl2(EXL2_MIXES[1]), "awq": _awq(32)}
    before = {fmt: {k: v.copy() for k, v in t.items()} for fmt, t in layers.items()}
    shard = {"gptq": shard_gptq, "exl2": shard_exl2, "awq": shard_awq}
    takes = {"group_size": ("gptq", "awq"), "bits": ("gptq",)}.get(argument, ("gptq", "exl2", "awq"))
    for fmt in takes:
        with pytest.raises(TypeError, match=rf"^{argument}: expected an int, got {type(value).__name__} "):
            shard[fmt](layers[fmt], **{"rank": 0, "world_size": 2, "mode": "row", argument: value})
    for fmt, t in layers.items():
        for k, v in t.items():
            np.testing.assert_array_equal(v, before[fmt][k])


def test_int_arguments_may_be_numpy_integers():
    full = _awq(32)
    w = _awq_dequantize(full, 32)
    r = shard_awq(full, rank=np.int64(1), world_size=np.int32(2), mode="row", group_size=np.int64(32))
    np.testing.assert_array_equal(_awq_dequantize(r, 32), w[K // 2 :])


# ------------------------------------------------------------------------------------------------ GPU
def _gpu_case(kind, seed):
    if kind == "exl2":
        return _exl2(EXL2_MIXES[3], seed=seed)
    return _gptq((4, 32, kind == "gptq-act", "gptq"), seed=seed, bias=False)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["row", "column"])
@pytest.mark.parametrize("kind", ["gptq", "gptq-act", "exl2"])
def test_rank_shards_on_gpu_match_slices_of_the_full_product(kind, mode):
    """Each rank's shard on the GPU kernels gives the matching slice (column) or partial product (row) of the
    float32 reference, and the row partials add up to the full product."""
    torch = pytest.importorskip("torch")
    import cupyq

    full = _gpu_case(kind, seed=6)
    w = _dq_exl2(full) if kind == "exl2" else _dq_gptq(full, (4, 32, kind == "gptq-act", "gptq"))
    world_size = 4
    for m in (1, 5, 40, 100):  # streaming kernel, tiled kernel, dense path
        x = torch.randn(m, K, dtype=torch.float16, device="cuda")
        xf = x.float().cpu().numpy()
        total = np.zeros((m, N), dtype=np.float64)
        for rank in range(world_size):
            qm = _rank_qmatrix(full, kind, rank, world_size, device=0, mode=mode)
            if mode == "row":
                rows = slice(rank * K // world_size, (rank + 1) * K // world_size)
                xr, wr = x[:, rows].contiguous(), w[rows]
            else:
                xr, wr = x, w[:, rank * N // world_size : (rank + 1) * N // world_size]
            out = torch.full((m, qm.out_features), float("nan"), dtype=torch.float16, device="cuda")
            got = cupyq.gemm(xr, qm, out=out).float().cpu().numpy()
            ref = xr.float().cpu().numpy() @ wr
            dense16 = (xr @ torch.from_numpy(wr).half().cuda()).float().cpu().numpy()
            err, err16 = np.abs(got - ref).max(), np.abs(dense16 - ref).max()
            # fp32 accumulation, fp16 output rounding: like a dense fp16 matmul, with a floor for tiny errors.
            assert err <= 2 * err16 + 1e-2 * np.abs(ref).max(), (kind, mode, m, rank, err, err16)
            if mode == "row":
                total += got
        if mode == "row":  # the partials add up to the full product, and to the unsharded matrix's product
            whole = _rank_qmatrix(full, kind, 0, 1, device=0, mode="row")
            unsharded = cupyq.gemm(x, whole).float().cpu().numpy()
            ref = xf @ w
            assert np.linalg.norm(total - ref) / np.linalg.norm(ref) < 2e-3, (kind, m)
            assert np.linalg.norm(total - unsharded) / np.linalg.norm(ref) < 3e-3, (kind, m)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gptq-act", "exl2"])
def test_parallel_modules_replay_in_a_cuda_graph(kind):
    """Column and row modules (one rank, no process group) captured in a CUDA graph recompute from new inputs
    and match their eager results (no host synchronisation or allocation but the outputs in forward)."""
    torch = pytest.importorskip("torch")
    from cupyq.distributed import ColumnParallelQuantLinear, RowParallelQuantLinear

    full = _gpu_case(kind, seed=7)
    column = ColumnParallelQuantLinear(_rank_qmatrix(full, kind, 1, 2, device=0, mode="column"))
    bias = torch.randn(N, dtype=torch.float16, device="cuda")
    row = RowParallelQuantLinear(_rank_qmatrix(full, kind, 1, 2, device=0, mode="row"), bias)
    x_col = torch.randn(4, K, dtype=torch.float16, device="cuda")
    x_row = torch.randn(4, K // 2, dtype=torch.float16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compile and size the workspace outside the capture
        column(x_col), row(x_row)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_col, y_row = column(x_col), row(x_row)
    x_col.copy_(torch.randn_like(x_col))
    x_row.copy_(torch.randn_like(x_row))
    graph.replay()
    torch.cuda.synchronize()
    # Same kernels and inputs; a split-K sum may add its partials in another order (fp16 outputs).
    torch.testing.assert_close(y_col, column(x_col), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(y_row, row(x_row), rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------------------------------------ inconsistent layers
def _resized(t, key, rows=None, cols=None):
    """A copy of layer ``t`` whose ``key`` is cut to ``rows`` / ``cols`` or, given more than it has, repeated."""
    a = t[key]
    if rows is not None:
        a = np.concatenate([a, a])[:rows]
    if cols is not None:
        a = np.concatenate([a, a], axis=1)[:, :cols]
    return {**t, key: a}


@pytest.mark.parametrize("mode", ["column", "row"])
@pytest.mark.parametrize("key, rows, cols, expected", [
    ("scales", None, N + 8, rf"scales: expected shape \(8, {N}\), got \(8, {N + 8}\)"),
    ("qzeros", None, N // 16, rf"qzeros: expected shape \(8, {N // 8}\), got \(8, {N // 16}\)"),
    ("g_idx", K - 56, None, rf"g_idx: expected shape \({K},\), got \({K - 56},\)"),
    ("g_idx", 2 * K, None, rf"g_idx: expected shape \({K},\), got \({2 * K},\)"),
    ("bias", N - 28, None, rf"bias: expected shape \({N},\), got \({N - 28},\)"),
])
def test_gptq_shard_of_tensors_that_do_not_fit_qweight_is_refused(mode, key, rows, cols, expected):
    """Every rank's slice of such a layer may look whole (extra scale columns, a g_idx too long); no shard of it
    is made, on any rank, and the caller's arrays stay as they were."""
    full = _gptq((4, 32, True, "gptq"), seed=5)
    bad = _resized(full, key, rows, cols)
    before = {k: v.copy() for k, v in bad.items()}
    for rank in range(2):
        with pytest.raises(ValueError, match=expected):
            shard_gptq(bad, rank=rank, world_size=2, mode=mode, bits=4)
    for k, v in bad.items():
        np.testing.assert_array_equal(v, before[k])


def test_exl2_column_shard_of_q_scale_that_does_not_fit_q_weight_is_refused():
    full = _exl2(EXL2_MIXES[1], seed=6)
    groups = full["q_scale"].shape[0]
    with pytest.raises(ValueError, match=rf"q_scale: expected shape \({groups}, {N // 8}\), got \({groups}, {N // 16}\)"):
        shard_exl2(_resized(full, "q_scale", cols=N // 16), rank=0, world_size=2, mode="column")
    with pytest.raises(ValueError, match=rf"q_groups: expected shape \({2 * groups},\)"):
        shard_exl2(_resized(full, "q_groups", rows=2 * groups - 2), rank=0, world_size=2, mode="column")


@pytest.mark.parametrize("mode", ["column", "row"])
def test_exl2_shards_of_an_unpadded_bias_hold_zeros_for_the_padding_columns(mode):
    """A bias stored without the padding columns (100 of 128): the last rank's column shard holds its 28 values
    and 36 zeros, as a shard read from the checkpoint does, so the gathered bias is the bias padded."""
    full = _exl2(EXL2_MIXES[2], seed=7)
    short = {**full, "bias": full["bias"][:100].copy()}
    padded = np.concatenate([short["bias"], np.zeros(N - 100, short["bias"].dtype)])
    got = [shard_exl2(short, rank=r, world_size=2, mode=mode)["bias"] for r in range(2)]
    np.testing.assert_array_equal(np.concatenate(got) if mode == "column" else got[1], padded)
    np.testing.assert_array_equal(short["bias"], full["bias"][:100])
    with pytest.raises(ValueError, match=rf"bias: expected shape \({N},\) \(q_weight's columns, or fewer than 32 less\), "
                                         r"got \(96,\)"):
        shard_exl2({**full, "bias": full["bias"][:96]}, rank=0, world_size=2, mode=mode)


@pytest.mark.parametrize("mode", ["column", "row"])
def test_awq_shard_of_a_bias_that_does_not_fit_scales_is_refused(mode):
    full = _awq(32, seed=8)
    for width in (N - 8, N + 8):
        bad = {**full, "bias": np.resize(full["bias"], width)}
        with pytest.raises(ValueError, match=rf"bias: expected shape \({N},\), got \({width},\)"):
            shard_awq(bad, rank=0, world_size=2, mode=mode)
    with pytest.raises(ValueError, match=rf"qzeros: expected shape \({K // 32}, {N // 8}\), got \({K // 32}, {N // 16}\)"):
        shard_awq({**full, "qzeros": full["qzeros"][:, : N // 16]}, rank=0, world_size=2, mode=mode)


@pytest.mark.parametrize("mode", ["column", "row"])
def test_gptq_group_size_is_checked_against_the_groups_in_both_modes(mode):
    full = {k: v for k, v in _gptq((4, 32, False, "gptq"), seed=9).items() if k != "g_idx"}
    with pytest.raises(ValueError, match=r"group_size: 1000 over 256 input rows needs 1 groups, but scales/qzeros have 8"):
        shard_gptq(full, rank=0, world_size=2, mode=mode, bits=4, group_size=1000)
    w = _dq_gptq(full, (4, 32, False, "gptq"))
    s = shard_gptq(full, rank=1, world_size=2, mode=mode, bits=4, group_size=32)
    rows, cols = (slice(None), slice(N // 2, N)) if mode == "column" else (slice(K // 2, K), slice(None))
    np.testing.assert_array_equal(_dq_gptq(s, (4, 32, False, "gptq")), w[rows, cols])


def test_shard_range_checks_its_arguments():
    from cupyq.distributed import shard_range

    assert [shard_range(96, r, 3, multiple=8) for r in range(3)] == [(0, 32), (32, 64), (64, 96)]
    with pytest.raises(ValueError, match=r"^rank: expected 0\.\.1, got 5"):  # would give (25, 30) of 10 elements
        shard_range(10, 5, 2)
    with pytest.raises(ValueError, match="^world_size: expected at least 1, got 0"):
        shard_range(10, 0, 0)
    with pytest.raises(ValueError, match="^size, multiple: expected positive ints, got 10 and 0"):
        shard_range(10, 0, 2, multiple=0)
    with pytest.raises(TypeError, match="^size: expected an int, got float 10.5"):
        shard_range(10.5, 0, 2)
    with pytest.raises(ValueError, match=r"^q_invperm in_features: 10 does not split into 3 equal parts"):
        shard_range(10, 0, 3, what="q_invperm in_features")
