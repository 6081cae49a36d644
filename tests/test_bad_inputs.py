"""Malformed inputs everywhere: each gets the right exception type and a message that names the tensor or file
and says what was expected; no input array or file is changed by the attempt.

Covers the format checks (cupyq.formats.gptq / exl2), QMatrix.from_gptq / from_exl2 on the CPU, gemm on the
CPU, checkpoint directories, the command line and cupyq.exllamav2. Everything runs on a CPU-only machine.
"""

import hashlib
import json
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

import cupyq
from cupyq import cli
from cupyq.checkpoint import CheckpointError, open_checkpoint, save_exl2, save_gptq
from cupyq.formats import exl2 as fexl2
from cupyq.formats import gptq as fgptq
from cupyq.quantize import quantize_exl2, quantize_gptq

K, N, GROUP = 128, 64, 32


def _gptq(seed, bits=4, act_order=True):
    w = np.random.default_rng(seed).standard_normal((K, N)).astype(np.float32)
    t = quantize_gptq(w, bits=bits, group_size=GROUP, act_order=act_order)
    return {k: t[k] for k in ("qweight", "qzeros", "scales", "g_idx")}


def _exl2(seed):
    w = np.random.default_rng(seed).standard_normal((K, N)).astype(np.float32)
    t = quantize_exl2(w, bits=(8, 4), proportions=(0.5, 0.5))
    return {k: t[k] for k in ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")}


def _copies(tensors):
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in tensors.items()}


def _assert_unchanged(tensors, before):
    for k, v in tensors.items():
        if isinstance(v, np.ndarray):
            assert v.dtype == before[k].dtype, k
            np.testing.assert_array_equal(v, before[k], err_msg=f"{k} was modified")


def _check_message(exc, fragments):
    text = str(exc.value)
    for fragment in fragments:
        assert re.search(fragment, text), f"{fragment!r} not in the message: {text!r}"


# ------------------------------------------------------------------------------------------------ GPTQ tensors
# (id, mutation of the tensors dict -> (tensors, bits), exception type, message fragments: tensor + expectation)

def _set(name, fn, bits=4):
    def mutate(t):
        t = dict(t)
        t[name] = fn(t[name])
        return t, bits

    return mutate


GPTQ_CASES = [
    ("bits-5", lambda t: (t, 5), ValueError, [r"bits", r"expected one of \(2, 3, 4, 8\)", "5"]),
    ("bits-0", lambda t: (t, 0), ValueError, [r"bits", r"expected one of"]),
    ("bits-str", lambda t: (t, "four"), TypeError, [r"bits", r"expected an integer", "four"]),
    ("qweight-float32", _set("qweight", lambda a: a.astype(np.float32)), TypeError,
     [r"qweight", r"expected dtype int32", r"float32"]),
    ("qweight-int64", _set("qweight", lambda a: a.astype(np.int64)), TypeError, [r"qweight", r"int32", r"int64"]),
    ("qweight-uint32", _set("qweight", lambda a: a.view(np.uint32)), TypeError, [r"qweight", r"int32", r"uint32"]),
    ("qweight-1d", _set("qweight", lambda a: a.reshape(-1)), ValueError, [r"qweight", r"2-D"]),
    ("qweight-3d", _set("qweight", lambda a: a[None]), ValueError, [r"qweight", r"2-D"]),
    ("qweight-empty", _set("qweight", lambda a: a[:0]), ValueError, [r"qweight", r"non-empty"]),
    ("qweight-3bit-rows", _set("qweight", lambda a: a[:4], bits=3), ValueError,
     [r"qweight", r"units of 3 words", r"4 rows"]),
    ("qweight-cols", _set("qweight", lambda a: a[:, :48]), ValueError, [r"qzeros|scales", r"expected shape"]),
    ("qzeros-float", _set("qzeros", lambda a: a.astype(np.float32)), TypeError, [r"qzeros", r"int32", r"float32"]),
    ("qzeros-1d", _set("qzeros", lambda a: a.reshape(-1)), ValueError, [r"qzeros", r"2-D"]),
    ("qzeros-width", _set("qzeros", lambda a: a[:, :-1]), ValueError, [r"qzeros", r"expected shape"]),
    ("qzeros-no-groups", _set("qzeros", lambda a: a[:0]), ValueError, [r"qzeros", r"at least one group"]),
    ("scales-int32", _set("scales", lambda a: a.view(np.int16).astype(np.int32)), TypeError,
     [r"scales", r"expected dtype", r"int32"]),
    ("scales-bool", _set("scales", lambda a: a > 0), TypeError, [r"scales", r"float16", r"bool"]),
    ("scales-1d", _set("scales", lambda a: a.reshape(-1)), ValueError, [r"scales", r"2-D"]),
    ("scales-groups", _set("scales", lambda a: a[:-1]), ValueError, [r"scales", r"expected shape"]),
    ("scales-cols", _set("scales", lambda a: a[:, :-8]), ValueError, [r"scales", r"expected shape"]),
    ("g_idx-float", _set("g_idx", lambda a: a.astype(np.float32)), TypeError, [r"g_idx", r"int32 or int64|int32"]),
    ("g_idx-length", _set("g_idx", lambda a: a[:-1]), ValueError, [r"g_idx", r"expected shape \(128,\)"]),
    ("g_idx-too-big", _set("g_idx", lambda a: np.where(np.arange(a.size) == 5, K // GROUP, a).astype(a.dtype)),
     ValueError, [r"g_idx", r"\[0, 4\)"]),
    ("g_idx-negative", _set("g_idx", lambda a: np.where(np.arange(a.size) == 0, -1, a).astype(a.dtype)),
     ValueError, [r"g_idx", r"\[0, 4\)", r"-1"]),
    ("g_idx-2d", _set("g_idx", lambda a: a.reshape(2, -1)), ValueError, [r"g_idx", r"expected shape"]),
]


@pytest.mark.parametrize("case, mutate, exc_type, fragments", GPTQ_CASES, ids=[c[0] for c in GPTQ_CASES])
def test_check_gptq_bad(case, mutate, exc_type, fragments):
    tensors, bits = mutate(_gptq(len(case)))
    before = _copies(tensors)
    with pytest.raises(exc_type) as info:
        fgptq.check_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits)
    _check_message(info, fragments)
    _assert_unchanged(tensors, before)


@pytest.mark.parametrize("case, mutate, exc_type, fragments", GPTQ_CASES, ids=[c[0] for c in GPTQ_CASES])
def test_qmatrix_from_gptq_bad(case, mutate, exc_type, fragments):
    tensors, bits = mutate(_gptq(len(case) + 100))
    before = _copies(tensors)
    with pytest.raises(exc_type) as info:
        cupyq.QMatrix.from_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"],
                                bits=bits, device="cpu")
    _check_message(info, fragments)
    _assert_unchanged(tensors, before)


def test_qmatrix_from_gptq_bad_options():
    t = _gptq(7)
    before = _copies(t)
    with pytest.raises(ValueError, match=r"checkpoint_format: expected 'gptq' or 'gptq_v2', got 'v3'"):
        cupyq.QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4, checkpoint_format="v3")
    with pytest.raises(ValueError, match=r"bias: expected shape \(64,\), got \(63,\)"):
        cupyq.QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bias=np.ones(63, np.float16))
    with pytest.raises(ValueError, match=r"device: expected 'cpu', 'cpu:0', an int, 'cuda', 'cuda:N'.*got 'tpu'"):
        cupyq.QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], device="tpu")
    _assert_unchanged(t, before)


def test_qmatrix_cpu_device_spellings():
    """Every spelling of the CPU that torch.device accepts with index 0 builds a CPU matrix; others are refused."""
    torch = pytest.importorskip("torch")
    t = _gptq(8)
    before = _copies(t)
    x = np.random.default_rng(9).standard_normal((3, K)).astype(np.float32)
    ref = x @ cupyq.reference.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4)
    for device in ("cpu", "cpu:0", torch.device("cpu"), torch.device("cpu", 0), torch.zeros(1).device):
        qm = cupyq.QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4, device=device)
        assert qm.device_id is None and not qm.is_cuda, device
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "no GPU kernel ran": the CPU path is the point
            np.testing.assert_allclose(cupyq.gemm(x, qm), ref, rtol=1e-5, atol=1e-5)
    refused = {"cpu:1": "the CPU is device 'cpu' or 'cpu:0'", torch.device("cpu", 1): "the CPU is device 'cpu'",
               "CPU": r"lower case, as in torch\), got 'CPU'", "cpu ": "got 'cpu '",
               "meta": "meta device, which holds no data", torch.device("meta"): "meta device"}
    for device, message in refused.items():
        with pytest.raises(ValueError, match=rf"^device: .*{message}"):
            cupyq.QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4, device=device)
    _assert_unchanged(t, before)


# ------------------------------------------------------------------------------------------------ EXL2 tensors


def _groups_with(fn):
    def mutate(t):
        t = dict(t)
        g = t["q_groups"].copy()
        t["q_groups"] = fn(g)
        return t

    return mutate


def _eset(name, fn):
    def mutate(t):
        t = dict(t)
        t[name] = fn(t[name])
        return t

    return mutate


def _swap_first_two(a):
    a = a.copy()
    a[[0, 1]] = a[[1, 0]]
    return a


def _repeat_first(a):
    a = a.copy()
    a[1] = a[0]
    return a


EXL2_CASES = [
    ("q_weight-float", _eset("q_weight", lambda a: a.astype(np.float32)), TypeError,
     [r"q_weight", r"int32", r"float32"]),
    ("q_weight-1d", _eset("q_weight", lambda a: a.reshape(-1)), ValueError, [r"q_weight", r"2-D"]),
    ("q_weight-empty", _eset("q_weight", lambda a: a[:0]), ValueError, [r"q_weight", r"non-empty"]),
    ("q_weight-cols", _eset("q_weight", lambda a: a[:, :60]), ValueError, [r"q_weight", r"multiple of 8", r"60"]),
    ("q_weight-rows", _eset("q_weight", lambda a: a[:-3]), ValueError, [r"q_weight|q_groups", r"rows"]),
    ("q_invperm-float", _eset("q_invperm", lambda a: a.astype(np.float32)), TypeError,
     [r"q_invperm", r"int16", r"float32"]),
    ("q_invperm-2d", _eset("q_invperm", lambda a: a.reshape(2, -1)), ValueError, [r"q_invperm", r"1-D"]),
    ("q_invperm-repeat", _eset("q_invperm", _repeat_first), ValueError,
     [r"q_invperm", r"permutation of 0\.\.127", r"repeat"]),
    ("q_invperm-range", _eset("q_invperm", lambda a: np.where(a == 0, K, a).astype(a.dtype)), ValueError,
     [r"q_invperm", r"permutation of 0\.\.127", r"128"]),
    ("q_invperm-short", _eset("q_invperm", lambda a: a[:-8]), ValueError, [r"q_invperm|q_groups", r"permutation|rows"]),
    ("q_scale-float", _eset("q_scale", lambda a: a.astype(np.float32)), TypeError, [r"q_scale", r"int32"]),
    ("q_scale-1d", _eset("q_scale", lambda a: a.reshape(-1)), ValueError, [r"q_scale", r"2-D"]),
    ("q_scale-cols", _eset("q_scale", lambda a: a[:, :-1]), ValueError, [r"q_scale", r"expected shape"]),
    ("q_scale_max-int", _eset("q_scale_max", lambda a: a.astype(np.int32)), TypeError,
     [r"q_scale_max", r"float16", r"int32"]),
    ("q_scale_max-length", _eset("q_scale_max", lambda a: a[:-1]), ValueError, [r"q_scale_max", r"expected shape"]),
    ("q_groups-float", _eset("q_groups", lambda a: a.astype(np.float32)), TypeError, [r"q_groups", r"int16"]),
    ("q_groups-odd", _eset("q_groups", lambda a: a[:-1]), ValueError, [r"q_groups", r"expected shape"]),
    ("q_groups-width-7", _groups_with(lambda g: np.where(np.arange(g.size) == g.size - 2, 7, g).astype(g.dtype)),
     ValueError, [r"q_groups", r"width 7", r"expected one of \(8, 6, 5, 4, 3, 2\)"]),
    ("q_groups-ascending", _groups_with(lambda g: g.reshape(-1, 2)[::-1].reshape(-1).copy()), ValueError,
     [r"q_groups"]),
    ("q_groups-start", _groups_with(lambda g: np.where(np.arange(g.size) == 1, 2, g).astype(g.dtype)), ValueError,
     [r"q_groups", r"packed row 0", r"got 2"]),
    ("q_groups-overlap", _groups_with(lambda g: np.where(np.arange(g.size) == 3, 0, g).astype(g.dtype)), ValueError,
     [r"q_groups", r"group 1"]),
]


@pytest.mark.parametrize("case, mutate, exc_type, fragments", EXL2_CASES, ids=[c[0] for c in EXL2_CASES])
def test_check_exl2_bad(case, mutate, exc_type, fragments):
    tensors = mutate(_exl2(len(case)))
    before = _copies(tensors)
    with pytest.raises(exc_type) as info:
        fexl2.check_exl2(tensors["q_weight"], tensors["q_invperm"], tensors["q_scale"], tensors["q_scale_max"],
                         tensors["q_groups"])
    _check_message(info, fragments)
    _assert_unchanged(tensors, before)


@pytest.mark.parametrize("case, mutate, exc_type, fragments", EXL2_CASES, ids=[c[0] for c in EXL2_CASES])
def test_qmatrix_from_exl2_bad(case, mutate, exc_type, fragments):
    tensors = mutate(_exl2(len(case) + 100))
    before = _copies(tensors)
    with pytest.raises(exc_type) as info:
        cupyq.QMatrix.from_exl2(tensors["q_weight"], tensors["q_invperm"], tensors["q_scale"],
                                tensors["q_scale_max"], tensors["q_groups"], device="cpu")
    _check_message(info, fragments)
    _assert_unchanged(tensors, before)


# ------------------------------------------------------------------------------------------------ gemm (CPU)


@pytest.fixture(scope="module")
def cpu_matrix():
    t = _gptq(11)
    return cupyq.QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4)


def _torch():
    return pytest.importorskip("torch")


def _x(m=3, k=K, dtype=np.float16, seed=5):
    return np.random.default_rng(seed).standard_normal((m, k)).astype(dtype)


GEMM_CASES = [
    ("x-list", lambda: ([[0.5] * K], None), TypeError, [r"x", r"torch tensor, a CuPy array or a NumPy array", "list"]),
    ("x-str", lambda: ("abc", None), TypeError, [r"x", r"NumPy array", "str"]),
    ("x-none", lambda: (None, None), TypeError, [r"x", r"NoneType"]),
    ("x-wrong-k", lambda: (_x(k=K - 8), None), ValueError, [r"x", r"expected shape \(\.\.\., 128\)", r"120"]),
    ("x-0d", lambda: (np.array(1.0, dtype=np.float16), None), ValueError, [r"x", r"expected shape"]),
    ("x-numpy-scalar", lambda: (np.float16(1.0), None), TypeError, [r"x", r"NumPy array", r"float16"]),
    ("x-int", lambda: (np.ones((2, K), np.int32), None), TypeError, [r"x", r"floating dtype", r"int32"]),
    ("x-torch-int", lambda: (_torch().ones((2, K), dtype=_torch().int64), None), TypeError,
     [r"x", r"floating dtype", r"int64"]),
    ("out-shape", lambda: (_x(), np.zeros((3, N + 1), np.float16)), ValueError, [r"out", r"expected shape \(3, 64\)"]),
    ("out-dtype", lambda: (_x(), np.zeros((3, N), np.float32)), TypeError, [r"out", r"float16", r"float32"]),
    ("out-strided", lambda: (_x(), np.zeros((3, 2 * N), np.float16)[:, ::2]), ValueError, [r"out", r"contiguous"]),
]


@pytest.mark.filterwarnings("ignore:cupyq. no GPU kernel ran")
@pytest.mark.parametrize("case, make, exc_type, fragments", GEMM_CASES, ids=[c[0] for c in GEMM_CASES])
def test_gemm_bad(cpu_matrix, case, make, exc_type, fragments):
    x, out = make()
    x_before = x.copy() if isinstance(x, np.ndarray) else x
    out_before = None if out is None else out.copy()
    with pytest.raises(exc_type) as info:
        cupyq.gemm(x, cpu_matrix, out)
    _check_message(info, fragments)
    if isinstance(x, np.ndarray):
        np.testing.assert_array_equal(x, x_before)
    if out is not None:
        np.testing.assert_array_equal(out, out_before)


def test_gemm_bad_matrix():
    with pytest.raises(TypeError, match=r"qm: expected a cupyq.QMatrix, got ndarray"):
        cupyq.gemm(_x(), np.zeros((K, N), np.float16))


# ------------------------------------------------------------------------------------------------ checkpoints


def _digest_tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _gptq_dir(path: Path, seed=0) -> Path:
    w = np.random.default_rng(seed).standard_normal((K, N)).astype(np.float32) * 0.05
    layer = quantize_gptq(w, bits=4, group_size=GROUP, act_order=True)
    return save_gptq(path, {"model.layers.0.mlp.up_proj": layer}, bits=4, group_size=GROUP, desc_act=True,
                     sym=True)


def _exl2_dir(path: Path, seed=0) -> Path:
    w = np.random.default_rng(seed).standard_normal((K, N)).astype(np.float32) * 0.05
    layer = quantize_exl2(w, bits=(8, 4), proportions=(0.5, 0.5))
    return save_exl2(path, {"model.layers.0.self_attn.q_proj": layer}, bits=6.0)


def _rewrite_header(file: Path, edit):
    """Rewrite a safetensors header with ``edit(header dict)``, keeping the data bytes."""
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def _drop_tensor(name):
    def edit(h):
        del h[name]

    return edit


def _set_dtype(name, dtype):
    def edit(h):
        h[name]["dtype"] = dtype

    return edit


def _set_shape(name, shape):
    def edit(h):
        h[name]["shape"] = shape

    return edit


def _only(make):
    """Mutations applied to a fresh directory; they return what the test opens."""
    return make


def _m_config_garbage(d):
    (d / "config.json").write_text("{not json")
    return d


def _m_config_list(d):
    (d / "config.json").write_text("[1, 2]")
    return d


def _m_quant_bits(d):
    (d / "quantize_config.json").write_text(json.dumps({"bits": 5, "group_size": GROUP, "desc_act": True}))
    return d


def _m_quant_not_object(d):
    (d / "quantize_config.json").write_text("[4]")
    return d


def _m_missing_qzeros(d):
    _rewrite_header(d / "model.safetensors", _drop_tensor("model.layers.0.mlp.up_proj.qzeros"))
    return d


def _m_scales_dtype(d):
    _rewrite_header(d / "model.safetensors", _set_dtype("model.layers.0.mlp.up_proj.scales", "I16"))
    return d


def _m_qweight_dtype(d):
    _rewrite_header(d / "model.safetensors", _set_dtype("model.layers.0.mlp.up_proj.qweight", "F32"))
    return d


def _m_unknown_dtype(d):
    _rewrite_header(d / "model.safetensors", _set_dtype("model.layers.0.mlp.up_proj.g_idx", "Q7"))
    return d


def _m_scales_shape(d):
    # same byte count, other shape: [4, 64] -> [8, 32]
    _rewrite_header(d / "model.safetensors", _set_shape("model.layers.0.mlp.up_proj.scales", [8, N // 2]))
    return d


def _m_truncated_data(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return d


def _m_truncated_header(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:20])
    return d


def _m_tiny_file(d):
    (d / "model.safetensors").write_bytes(b"\x01\x02\x03")
    return d


def _m_header_garbage(d):
    f = d / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 16) + b"{{{{{{{{{{{{{{{{" + b"\0" * 64)
    return d


def _m_header_list(d):
    f = d / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 8) + b"[1, 2]  " + b"\0" * 8)
    return d


def _m_index_missing_file(d):
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.layers.0.mlp.up_proj.qweight": "model-00002-of-00002.safetensors"}}))
    return d


def _m_index_path(d):
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.layers.0.mlp.up_proj.qweight": "../model.safetensors"}}))
    return d


def _m_index_empty(d):
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    return d


def _m_duplicate(d):
    f = d / "model.safetensors"
    (d / "copy.safetensors").write_bytes(f.read_bytes())
    return d


def _m_no_files(d):
    (d / "model.safetensors").unlink()
    return d


def _m_text_file(d):
    f = d / "weights.bin"
    f.write_bytes(b"not a checkpoint")
    return f


def _m_exl2_missing_scale(d):
    _rewrite_header(d / "model.safetensors", _drop_tensor("model.layers.0.self_attn.q_proj.q_scale"))
    return d


def _m_exl2_invperm_dtype(d):
    _rewrite_header(d / "model.safetensors", _set_dtype("model.layers.0.self_attn.q_proj.q_invperm", "F16"))
    return d


def _m_exl2_q_weight_cols(d):
    def edit(h):  # same byte count, a column count that is not a multiple of 8: [Q, 64] -> [16 Q, 4]
        rec = h["model.layers.0.self_attn.q_proj.q_weight"]
        rec["shape"] = [rec["shape"][0] * rec["shape"][1] // 4, 4]

    _rewrite_header(d / "model.safetensors", edit)
    return d


CKPT_CASES = [
    ("config-not-json", _gptq_dir, _m_config_garbage, [r"config\.json", r"cannot parse JSON"]),
    ("config-list", _gptq_dir, _m_config_list, [r"config\.json", r"JSON object"]),
    ("quant-bits-5", _gptq_dir, _m_quant_bits, [r"quantize_config\.json", r"'bits'"]),
    ("quant-list", _gptq_dir, _m_quant_not_object, [r"quantize_config\.json", r"JSON object"]),
    ("missing-qzeros", _gptq_dir, _m_missing_qzeros, [r"model\.safetensors", r"up_proj\.qzeros"]),
    ("scales-dtype", _gptq_dir, _m_scales_dtype, [r"model\.safetensors", r"up_proj\.scales", r"expected dtype",
                                                  r"I16"]),
    ("qweight-dtype", _gptq_dir, _m_qweight_dtype, [r"model\.safetensors", r"up_proj\.qweight", r"I32", r"F32"]),
    ("unknown-dtype", _gptq_dir, _m_unknown_dtype, [r"model\.safetensors", r"g_idx", r"unsupported safetensors "
                                                                                     r"dtype 'Q7'"]),
    ("scales-shape", _gptq_dir, _m_scales_shape, [r"model\.safetensors", r"up_proj\.", r"expected"]),
    ("truncated-data", _gptq_dir, _m_truncated_data, [r"model\.safetensors", r"bytes|truncated"]),
    ("truncated-header", _gptq_dir, _m_truncated_header, [r"model\.safetensors", r"header length"]),
    ("tiny-file", _gptq_dir, _m_tiny_file, [r"model\.safetensors", r"not a safetensors file", r"8-byte"]),
    ("header-not-json", _gptq_dir, _m_header_garbage, [r"model\.safetensors", r"not valid JSON"]),
    ("header-list", _gptq_dir, _m_header_list, [r"model\.safetensors", r"JSON object"]),
    ("index-missing-file", _gptq_dir, _m_index_missing_file, [r"model\.safetensors\.index\.json",
                                                              r"model-00002-of-00002\.safetensors"]),
    ("index-path", _gptq_dir, _m_index_path, [r"model\.safetensors\.index\.json", r"plain file name"]),
    ("index-empty", _gptq_dir, _m_index_empty, [r"model\.safetensors\.index\.json", r"weight_map"]),
    ("duplicate-tensor", _gptq_dir, _m_duplicate, [r"safetensors", r"duplicate name"]),
    ("no-safetensors", _gptq_dir, _m_no_files, [r"no \.safetensors files"]),
    ("not-safetensors-file", _gptq_dir, _m_text_file, [r"weights\.bin", r"expected a checkpoint directory or a "
                                                                        r"\.safetensors file"]),
    ("exl2-missing-q_scale", _exl2_dir, _m_exl2_missing_scale, [r"model\.safetensors", r"q_proj\.q_scale"]),
    ("exl2-invperm-dtype", _exl2_dir, _m_exl2_invperm_dtype, [r"model\.safetensors", r"q_invperm", r"F16"]),
    ("exl2-q_weight-cols", _exl2_dir, _m_exl2_q_weight_cols, [r"model\.safetensors", r"q_weight", r"multiple of 8"]),
]


def _open_and_load(path):
    ckpt = open_checkpoint(path)
    for name in ckpt.quantized_layers:
        ckpt.qmatrix(name)
    return ckpt


@pytest.mark.parametrize("case, make, mutate, fragments", CKPT_CASES, ids=[c[0] for c in CKPT_CASES])
def test_checkpoint_bad(tmp_path, case, make, mutate, fragments):
    target = mutate(make(tmp_path / "ckpt"))
    before = _digest_tree(tmp_path)
    with pytest.raises(CheckpointError) as info:
        _open_and_load(target)
    _check_message(info, fragments)
    assert _digest_tree(tmp_path) == before


def test_checkpoint_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope: no such checkpoint directory or file"):
        open_checkpoint(tmp_path / "nope")


# ------------------------------------------------------------------------------------------------ command line


CLI_CASES = [
    ("inspect-broken-config", ["inspect", "{dir}"], _m_config_garbage, [r"config\.json", r"cannot parse JSON"]),
    ("inspect-truncated", ["inspect", "{dir}"], _m_truncated_header, [r"model\.safetensors", r"header length"]),
    ("verify-missing-qzeros", ["verify", "{dir}", "--cpu", "--m", "1"], _m_missing_qzeros, [r"up_proj\.qzeros"]),
    ("verify-out-onto-weights", ["verify", "{dir}", "--cpu", "-o", "{dir}/model.safetensors"], None,
     [r"model\.safetensors", r"not a JSON report written by cupyq"]),
    ("inspect-out-onto-config", ["inspect", "{dir}", "--json-out", "{dir}/config.json"], None,
     [r"config\.json", r"refusing to overwrite"]),
    ("inspect-out-dir", ["inspect", "{dir}", "--json-out", "{dir}"], None, [r"is a directory"]),
    ("verify-m-zero", ["verify", "{dir}", "--cpu", "--m", "0"], None, [r"--m", r"positive integers"]),
    ("verify-m-swallow", ["verify", "--cpu", "--m", "1", "7", "{dir}"], None, [r"7: no such checkpoint", r"--m 1,7"]),
    ("verify-tolerance", ["verify", "{dir}", "--tolerance", "-1"], None, [r"--tolerance", r"positive number"]),
    ("verify-tolerance-nan", ["verify", "{dir}", "--tolerance", "nan"], None, [r"--tolerance", r"positive number"]),
    ("compile-arch", ["compile", "--arch", "banana"], None, [r"--arch", r"sm_80"]),
    ("compile-source", ["compile", "--source", "../x"], None, [r"--source", r"qgemm\.cu"]),
    ("inspect-text-file", ["inspect", "{dir}/config.json"], None, [r"config\.json", r"\.safetensors file"]),
    ("warmup-max-m", ["warmup", "--max-m", "0"], None, [r"--max-m", r"positive integer"]),
]


@pytest.mark.parametrize("case, argv, mutate, fragments", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad(tmp_path, capsys, case, argv, mutate, fragments):
    d = _gptq_dir(tmp_path / "ckpt")
    if mutate is not None:
        mutate(d)
    before = _digest_tree(tmp_path)
    code = cli.main([a.replace("{dir}", str(d)) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in err
    for fragment in fragments:
        assert re.search(fragment, err), f"{fragment!r} not in stderr: {err!r}"
    assert _digest_tree(tmp_path) == before


# ------------------------------------------------------------------------------------------------ exllamav2


try:
    import torch
except ImportError:  # cupyq.exllamav2 needs torch
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="cupyq.exllamav2 needs torch")


def _torch_gptq(seed):
    return {k: torch.from_numpy(v) for k, v in _gptq(seed, act_order=False).items()}


def _snapshot(tensors):
    return {k: v.clone() for k, v in tensors.items() if isinstance(v, torch.Tensor)}


def _torch_unchanged(tensors, before):
    for k, v in before.items():
        assert torch.equal(tensors[k], v), f"{k} was modified"


@needs_torch
def test_quantlinear_numpy_qweight():
    from cupyq.exllamav2 import QuantLinear

    t = _gptq(21)
    before = _copies(t)
    with pytest.raises(TypeError) as info:
        QuantLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], None, 4, GROUP)
    _check_message(info, [r"qweight", r"expected a torch tensor", r"numpy\.ndarray", r"torch\.from_numpy"])
    _assert_unchanged(t, before)


EXL2V_CASES = [
    ("bits-3", dict(bits=3), ValueError, [r"bits=4", r"got bits=3"]),
    ("qzeros-numpy", dict(qzeros="numpy"), TypeError, [r"qzeros", r"torch tensor", r"ndarray"]),
    ("scales-numpy", dict(scales="numpy"), TypeError, [r"scales", r"torch tensor"]),
    ("g_idx-list", dict(g_idx=[0] * K), TypeError, [r"g_idx", r"torch tensor or None", r"list"]),
    ("groupsize-0", dict(groupsize=0), ValueError, [r"groupsize", r"positive int or -1"]),
    ("groupsize-mismatch", dict(groupsize=16), ValueError, [r"groupsize", r"8 groups", r"qzeros/scales have 4"]),
    ("qweight-float", dict(qweight="float"), TypeError, [r"qweight", r"int32", r"float32"]),
]


@needs_torch
@pytest.mark.parametrize("case, change, exc_type, fragments", EXL2V_CASES, ids=[c[0] for c in EXL2V_CASES])
def test_quantlinear_bad(case, change, exc_type, fragments):
    from cupyq.exllamav2 import QuantLinear

    t = _torch_gptq(len(case))
    before = _snapshot(t)
    args = {"qweight": t["qweight"], "qzeros": t["qzeros"], "scales": t["scales"], "g_idx": None, "bias": None,
            "bits": 4, "groupsize": GROUP}
    for key, value in change.items():
        if value == "numpy":
            args[key] = t[key].numpy()
        elif value == "float":
            args[key] = t[key].float()
        else:
            args[key] = value
    with pytest.raises(exc_type) as info:
        QuantLinear(**args)
    _check_message(info, fragments)
    _torch_unchanged(t, before)


@needs_torch
def test_quantlinear_weight_object_without_tensors():
    from cupyq.exllamav2 import QuantLinear

    with pytest.raises(TypeError, match=r"weight: expected a GPTQ \(qweight, qzeros, scales, g_idx, bits\) or EXL2"):
        QuantLinear(object())


@needs_torch
def test_ext_make_q_matrix_missing_fields():
    from cupyq.exllamav2 import ext_make_q_matrix

    t = _torch_gptq(31)
    before = _snapshot(t)
    with pytest.raises(ValueError, match=r"GPTQ weights lack scales"):
        ext_make_q_matrix({"qweight": t["qweight"], "qzeros": t["qzeros"]})
    _torch_unchanged(t, before)


@needs_torch
def test_make_group_map_numpy():
    from cupyq.exllamav2 import make_group_map

    e = _exl2(41)
    with pytest.raises(TypeError, match=r"q_groups: expected a torch tensor, got ndarray"):
        make_group_map(e["q_groups"], e["q_weight"].shape[0])
