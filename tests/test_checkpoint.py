"""Checkpoint directories: config variants, sharding, mixed formats, lazy reads, errors, round trips and
the tensor/config conventions of public GPTQ and EXL2 models."""

import json
import struct

import numpy as np
import pytest

from cupyq import checkpoint as ck
from cupyq.checkpoint import CheckpointError, open_checkpoint, read_quant_config, save_exl2, save_gptq
from cupyq.quantize import quantize_exl2, quantize_gptq

LLAMA = "model.layers.0.self_attn.q_proj"


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def write_raw_safetensors(path, tensors):
    """Minimal independent safetensors writer: {name: (dtype string, shape, bytes)}."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)


def np_entry(a):
    codes = {"float16": "F16", "float32": "F32", "int32": "I32", "int16": "I16", "int64": "I64"}
    a = np.ascontiguousarray(a)
    return codes[a.dtype.name], a.shape, a.tobytes()


def bf16_entry(a):
    bits = (np.asarray(a, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return "BF16", bits.shape, bits.tobytes()


def write_tensors(path, arrays):
    write_raw_safetensors(path, {k: (v if isinstance(v, tuple) else np_entry(v)) for k, v in arrays.items()})


def gptq_layer(rng, k=256, n=128, bits=4, group_size=64, act_order=False, fmt="gptq", bias=False):
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    return w, quantize_gptq(w, bits=bits, group_size=group_size, act_order=act_order, checkpoint_format=fmt, bias=b)


def exl2_layer(rng, k=256, n=128, bits=(6, 4), props=(0.25, 0.75), bias=False):
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    return w, quantize_exl2(w, bits=bits, proportions=props, bias=b)


def write_config(directory, name, content):
    (directory / name).write_text(json.dumps(content))


def gptq_dir(tmp_path, rng, **cfg):
    """A directory with one 4-bit g64 GPTQ layer and no config file."""
    _, t = gptq_layer(rng)
    write_tensors(tmp_path / "model.safetensors", {f"{LLAMA}.{k}": v for k, v in t.items()})
    return tmp_path, t


# ------------------------------------------------------------------------------------------------
# quantization config: files, order, key synonyms, hints
# ------------------------------------------------------------------------------------------------

HINTS = {
    "use_exllama": True,
    "exllama_config": {"version": 2},
    "disable_exllama": False,
    "use_cuda_fp16": False,
    "max_input_length": 4096,
    "backend": "auto",
}


@pytest.mark.parametrize("fname", ["quantize_config.json", "quant_config.json", "config.json"])
def test_config_from_each_file(tmp_path, fname):
    cfg = {"quant_method": "gptq", "bits": 8, "group_size": 32, "desc_act": True, "sym": False, **HINTS}
    write_config(tmp_path, fname, {"quantization_config": cfg, "model_type": "llama"} if fname == "config.json" else cfg)
    qc = read_quant_config(tmp_path)
    assert qc.source.name == fname
    assert (qc.quant_method, qc.bits, qc.group_size, qc.desc_act, qc.sym, qc.checkpoint_format) == (
        "gptq", 8, 32, True, False, "gptq")
    assert qc.hints == HINTS  # accepted, recorded, and without effect on the format


def test_config_search_order(tmp_path):
    # The sources agree on every setting they share; the first one found is used as it is.
    write_config(tmp_path, "config.json", {"quantization_config": {"bits": 4, "group_size": 128, "sym": False}})
    write_config(tmp_path, "quant_config.json", {"bits": 4, "group_size": 128})
    qc = read_quant_config(tmp_path)
    assert (qc.source.name, qc.sym) == ("quant_config.json", True)
    write_config(tmp_path, "quantize_config.json", {"bits": 4})
    qc = read_quant_config(tmp_path)
    assert (qc.source.name, qc.group_size) == ("quantize_config.json", None)
    (tmp_path / "quantize_config.json").unlink()
    (tmp_path / "quant_config.json").unlink()
    qc = read_quant_config(tmp_path)
    assert (qc.source.name, qc.group_size, qc.sym) == ("config.json", 128, False)


def test_config_json_without_quantization_config(tmp_path):
    write_config(tmp_path, "config.json", {"model_type": "llama", "hidden_size": 64})
    assert read_quant_config(tmp_path) is None


@pytest.mark.parametrize(
    "keys, expected",
    [
        ({}, "gptq"),
        ({"format": "gptq_v2"}, "gptq_v2"),
        ({"checkpoint_format": "gptq_v2"}, "gptq_v2"),
        ({"format": "gptq", "checkpoint_format": "gptq"}, "gptq"),
        ({"format": "GPTQ_V2", "checkpoint_format": "gptq_v2"}, "gptq_v2"),
    ],
)
def test_format_key_synonyms(tmp_path, keys, expected):
    write_config(tmp_path, "quantize_config.json", {"bits": 4, "group_size": 128, **keys})
    assert read_quant_config(tmp_path).checkpoint_format == expected


def test_defaults_when_keys_missing(tmp_path):
    write_config(tmp_path, "quantize_config.json", {"bits": 4})
    qc = read_quant_config(tmp_path)
    assert (qc.group_size, qc.desc_act, qc.sym, qc.checkpoint_format) == (None, False, True, "gptq")


def test_method_key_and_exl2_config(tmp_path):
    write_config(tmp_path, "quantize_config.json", {"method": "gptq", "quant_method": "gptq", "bits": 4})
    assert read_quant_config(tmp_path).quant_method == "gptq"
    (tmp_path / "quantize_config.json").unlink()
    write_config(tmp_path, "config.json", {"quantization_config": {
        "quant_method": "exl2", "version": "0.2.3", "bits": 4.65, "head_bits": 6,
        "calibration": {"rows": 115, "length": 2048, "dataset": "(default)"}}})
    qc = read_quant_config(tmp_path)
    assert (qc.quant_method, qc.bits, qc.head_bits) == ("exl2", 4.65, 6)


@pytest.mark.parametrize(
    "content, fragment",
    [
        ({"bits": 5, "group_size": 128}, "'bits'"),
        ({"bits": "4", "group_size": 128}, "'bits'"),
        ({"group_size": 128}, "'bits': missing"),
        ({"bits": 4, "group_size": 0}, "'group_size'"),
        ({"bits": 4, "desc_act": "yes"}, "'desc_act'"),
        ({"bits": 4, "sym": 1}, "'sym'"),
        ({"bits": 4, "format": "marlin"}, "'format'"),
        ({"bits": 4, "format": "gptq", "checkpoint_format": "gptq_v2"}, "'format'"),
        ({"bits": 4, "quant_method": "bitsandbytes"}, "'quant_method'"),
        ({"w_bit": 4, "q_group_size": 128, "zero_point": True, "version": "GEMV"}, "AWQ version 'GEMV'"),
        ({"bits": 4, "dynamic": {"+:(": {"bits": 8}}}, "'dynamic'"),
        ([4, 128], "JSON object"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, content, fragment):
    write_config(tmp_path, "quantize_config.json", content)
    with pytest.raises(CheckpointError) as exc:
        read_quant_config(tmp_path)
    assert "quantize_config.json" in str(exc.value)
    assert fragment in str(exc.value)


def test_unparsable_config_names_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json.*JSON"):
        read_quant_config(tmp_path)


def test_group_size_inferred_from_shapes(tmp_path):
    rng = np.random.default_rng(1)
    gptq_dir(tmp_path, rng)
    write_config(tmp_path, "quantize_config.json", {"bits": 4})
    assert open_checkpoint(tmp_path).layers[LLAMA].group_size == 64


def test_dynamic_override_per_module(tmp_path):
    rng = np.random.default_rng(2)
    _, t4 = gptq_layer(rng, bits=4)
    _, t8 = gptq_layer(rng, bits=8)
    names = {"model.layers.0.mlp.up_proj": t4, "model.layers.1.mlp.up_proj": t8}
    write_tensors(tmp_path / "model.safetensors", {f"{n}.{k}": v for n, t in names.items() for k, v in t.items()})
    write_config(tmp_path, "quantize_config.json",
                 {"bits": 4, "group_size": 64, "dynamic": {r"+:.*\.1\..*": {"bits": 8}}})
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.layers["model.layers.0.mlp.up_proj"].bits == (4,)
    assert ckpt.layers["model.layers.1.mlp.up_proj"].bits == (8,)


def test_tgi_scalar_tensors_instead_of_config(tmp_path):
    rng = np.random.default_rng(3)
    _, t = gptq_layer(rng, bits=4, group_size=64)
    arrays = {f"{LLAMA}.{k}": v for k, v in t.items()}
    arrays["gptq_bits"] = np.array([4], dtype=np.int32)
    arrays["gptq_groupsize"] = np.array([64], dtype=np.int32)
    write_tensors(tmp_path / "model.safetensors", arrays)
    info = open_checkpoint(tmp_path).layers[LLAMA]
    assert (info.bits, info.group_size, info.act_order) == ((4,), 64, False)


def test_gptq_tensors_without_any_config(tmp_path):
    gptq_dir(tmp_path, np.random.default_rng(4))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{LLAMA}.qweight'.*no GPTQ quantization config"):
        open_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------------
# sharding and index
# ------------------------------------------------------------------------------------------------


def _sharded_sample(tmp_path, rng, shard_bytes=40_000):
    layers = {f"model.layers.{i}.mlp.down_proj": gptq_layer(rng, bits=4, group_size=64)[1] for i in range(3)}
    extra = {"lm_head.weight": rng.standard_normal((64, 256)).astype(np.float16)}
    save_gptq(tmp_path, layers, bits=4, group_size=64, desc_act=False, sym=True, extra_tensors=extra,
              shard_bytes=shard_bytes)
    return layers, extra


def test_sharded_with_index(tmp_path):
    rng = np.random.default_rng(5)
    layers, extra = _sharded_sample(tmp_path, rng)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / ck.INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(a.nbytes for t in layers.values() for a in t.values()) + 64 * 256 * 2
    ckpt = open_checkpoint(tmp_path)
    assert len(ckpt.files) == len(files)
    # a layer's tensors may straddle shards; they are found wherever they are
    for name, t in layers.items():
        got = ckpt.load_layer(name)
        for k, v in t.items():
            np.testing.assert_array_equal(got[k], v)
    np.testing.assert_array_equal(ckpt.load_layer("lm_head")["weight"], extra["lm_head.weight"])


def test_sharded_without_index(tmp_path):
    rng = np.random.default_rng(6)
    layers, _ = _sharded_sample(tmp_path, rng)
    (tmp_path / ck.INDEX_FILE).unlink()
    ckpt = open_checkpoint(tmp_path)
    assert sorted(ckpt.quantized_layers) == sorted(layers)
    np.testing.assert_array_equal(ckpt.load_layer("model.layers.2.mlp.down_proj")["qweight"],
                                  layers["model.layers.2.mlp.down_proj"]["qweight"])


def test_index_dangling_entry_names_index_and_tensor(tmp_path):
    rng = np.random.default_rng(7)
    _sharded_sample(tmp_path, rng)
    index = json.loads((tmp_path / ck.INDEX_FILE).read_text())
    first = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.layers.9.mlp.down_proj.qweight"] = first
    (tmp_path / ck.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(tmp_path)
    msg = str(exc.value)
    assert ck.INDEX_FILE in msg and "model.layers.9.mlp.down_proj.qweight" in msg and first in msg


def test_index_names_missing_file(tmp_path):
    rng = np.random.default_rng(8)
    _sharded_sample(tmp_path, rng)
    index = json.loads((tmp_path / ck.INDEX_FILE).read_text())
    index["weight_map"]["lm_head.weight"] = "model-00099-of-00099.safetensors"
    (tmp_path / ck.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index.json.*model-00099-of-00099.safetensors.*does not exist"):
        open_checkpoint(tmp_path)


def test_duplicate_tensor_across_shards_without_index(tmp_path):
    rng = np.random.default_rng(9)
    _, t = gptq_layer(rng)
    write_tensors(tmp_path / "a.safetensors", {f"{LLAMA}.{k}": v for k, v in t.items()})
    write_tensors(tmp_path / "b.safetensors", {f"{LLAMA}.qweight": t["qweight"]})
    write_config(tmp_path, "quantize_config.json", {"bits": 4, "group_size": 64})
    with pytest.raises(CheckpointError, match=rf"b.safetensors: tensor '{LLAMA}.qweight'.*a.safetensors"):
        open_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------------
# mixed directories
# ------------------------------------------------------------------------------------------------


def test_mixed_gptq_exl2_and_fp16(tmp_path):
    rng = np.random.default_rng(10)
    wg, g = gptq_layer(rng, k=256, n=128, bits=4, group_size=64, act_order=True, bias=True)
    we, e = exl2_layer(rng, k=256, n=128, bits=(8, 4), props=(0.5, 0.5), bias=True)
    head = rng.standard_normal((96, 128)).astype(np.float16)
    extra = {f"model.layers.0.mlp.up_proj.{k}": v for k, v in e.items()}
    extra["lm_head.weight"] = head
    extra["model.norm.weight"] = rng.standard_normal(128).astype(np.float16)
    save_gptq(tmp_path, {LLAMA: g}, bits=4, group_size=64, desc_act=True, sym=True, extra_tensors=extra)
    ckpt = open_checkpoint(tmp_path)
    assert {n: i.format for n, i in ckpt.layers.items()} == {
        "lm_head": "fp16", LLAMA: "gptq", "model.layers.0.mlp.up_proj": "exl2"}
    assert list(ckpt.layers) == ["lm_head", "model.layers.0.mlp.up_proj", LLAMA]
    assert set(ckpt.extra_tensor_names()) == {"lm_head.weight", "model.norm.weight"}
    info = ckpt.layer_info("model.layers.0.mlp.up_proj")
    assert info.bits == (8, 4) and info.bit_mix == ((8, 128), (4, 128)) and info.act_order
    assert (info.in_features, info.out_features) == (256, 128)
    # GPTQ round to nearest: every weight within half a step of its group's scale
    dq = ckpt.dequantize(LLAMA)
    half_step = 0.5 * g["scales"].astype(np.float32)[g["g_idx"]]
    assert np.all(np.abs(dq - wg) <= half_step * (1 + 1e-3) + 1e-7)
    # EXL2 (8-bit for half the rows, 4-bit for the rest): close to the original overall
    dq = ckpt.dequantize("model.layers.0.mlp.up_proj")
    assert np.linalg.norm(dq - we) / np.linalg.norm(we) < 0.08
    np.testing.assert_array_equal(ckpt.dequantize("lm_head"), head.astype(np.float32).T)


def test_qmatrix_from_checkpoint_matches_reference(tmp_path):
    rng = np.random.default_rng(11)
    _, g = gptq_layer(rng, bits=3, group_size=64, act_order=True, fmt="gptq_v2", bias=True)
    _, e = exl2_layer(rng, bits=(5, 3), props=(0.5, 0.5))
    extra = {f"exl2_layer.{k}": v for k, v in e.items()}
    save_gptq(tmp_path, {"gptq_layer": g}, bits=3, group_size=64, desc_act=True, sym=True,
              checkpoint_format="gptq_v2", extra_tensors=extra)
    ckpt = open_checkpoint(tmp_path)
    x = rng.standard_normal((5, 256)).astype(np.float32)
    for name in ("gptq_layer", "exl2_layer"):
        qm = ckpt.qmatrix(name)
        assert not qm.is_cuda and qm.format == ckpt.layers[name].format
        assert (qm.in_features, qm.out_features) == (256, 128)
        w = ckpt.dequantize(name)
        bias = ckpt.load_layer(name).get("bias")
        expected = x @ w + (0 if bias is None else bias.astype(np.float32))
        np.testing.assert_allclose(qm.reference_weight(), w, rtol=0, atol=1e-6)
        np.testing.assert_allclose(x @ qm.reference_weight() + (0 if bias is None else bias.astype(np.float32)),
                                   expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="no layer named 'nope'"):
        ckpt.qmatrix("nope")


def test_single_file_path(tmp_path):
    rng = np.random.default_rng(12)
    _, g = gptq_layer(rng)
    save_gptq(tmp_path, {LLAMA: g}, bits=4, group_size=64, desc_act=False, sym=True,
              extra_tensors={"lm_head.weight": np.ones((32, 128), np.float16)})
    ckpt = open_checkpoint(tmp_path / "model.safetensors")
    assert ckpt.path == tmp_path and set(ckpt.layers) == {LLAMA, "lm_head"}
    with pytest.raises(CheckpointError, match="not a quantized layer"):
        ckpt.qmatrix("lm_head")


# ------------------------------------------------------------------------------------------------
# lazy loading
# ------------------------------------------------------------------------------------------------


def test_open_reads_headers_only(tmp_path, monkeypatch):
    rng = np.random.default_rng(13)
    layers, _ = _sharded_sample(tmp_path, rng)
    reads = []
    real = ck._read_record
    monkeypatch.setattr(ck.directory, "_read_record", lambda rec: reads.append(rec.name) or real(rec))  # where load_tensor looks it up
    ckpt = open_checkpoint(tmp_path)
    assert reads == []
    assert ckpt.layers["model.layers.1.mlp.down_proj"].nbytes == sum(a.nbytes for a in layers["model.layers.1.mlp.down_proj"].values())
    ckpt.load_layer("model.layers.1.mlp.down_proj")
    assert sorted(reads) == sorted(f"model.layers.1.mlp.down_proj.{k}" for k in ("qweight", "qzeros", "scales", "g_idx"))


def test_huge_file_is_not_read(tmp_path):
    """An 8 GiB (sparse) file opens instantly: only its header is read."""
    k, n = 65536, 16384
    header = {
        f"{LLAMA}.qweight": {"dtype": "I32", "shape": [k // 8, n], "data_offsets": [0, k // 8 * n * 4]},
        f"{LLAMA}.qzeros": {"dtype": "I32", "shape": [k // 128, n // 8],
                            "data_offsets": [k // 8 * n * 4, k // 8 * n * 4 + k // 128 * n // 8 * 4]},
    }
    end = header[f"{LLAMA}.qzeros"]["data_offsets"][1]
    header[f"{LLAMA}.scales"] = {"dtype": "F16", "shape": [k // 128, n], "data_offsets": [end, end + k // 128 * n * 2]}
    raw = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + end + k // 128 * n * 2)
    write_config(tmp_path, "quantize_config.json", {"bits": 4, "group_size": 128})
    ckpt = open_checkpoint(tmp_path)
    info = ckpt.layers[LLAMA]
    assert (info.in_features, info.out_features, info.group_size) == (k, n, 128)
    assert info.nbytes > 2**29


# ------------------------------------------------------------------------------------------------
# malformed checkpoints
# ------------------------------------------------------------------------------------------------


def _break(tmp_path, rng, edit, cfg=None, exl2=False):
    _, t = exl2_layer(rng) if exl2 else gptq_layer(rng, bits=4, group_size=64)
    arrays = {f"{LLAMA}.{k}": v for k, v in t.items()}
    edit(arrays)
    write_tensors(tmp_path / "model.safetensors", arrays)
    if not exl2:
        write_config(tmp_path, "quantize_config.json", cfg or {"bits": 4, "group_size": 64})
    return tmp_path


@pytest.mark.parametrize(
    "edit, tensor, fragment",
    [
        (lambda a: a.pop(f"{LLAMA}.qzeros"), "qzeros", "has qweight but no"),
        (lambda a: a.pop(f"{LLAMA}.scales"), "scales", "has qweight but no"),
        (lambda a: a.update({f"{LLAMA}.scales": a[f"{LLAMA}.scales"][:, :64]}), "scales", "expected shape [4, 128]"),
        (lambda a: a.update({f"{LLAMA}.qzeros": a[f"{LLAMA}.qzeros"][:2]}), "qzeros", "expected shape [4, 16]"),
        (lambda a: a.update({f"{LLAMA}.g_idx": a[f"{LLAMA}.g_idx"][:100]}), "g_idx", "expected shape [256]"),
        (lambda a: a.update({f"{LLAMA}.qweight": a[f"{LLAMA}.qweight"].astype(np.float32)}), "qweight", "expected dtype I32"),
        (lambda a: a.update({f"{LLAMA}.bias": np.ones(64, np.float16)}), "bias", "expected shape [128]"),
        (lambda a: a.update({"model.layers.3.mlp.qzeros": a[f"{LLAMA}.qzeros"]}), "model.layers.3.mlp.qzeros", "dangling"),
        (lambda a: a.update({f"{LLAMA}.q_weight": a[f"{LLAMA}.qweight"]}), "qweight", "both GPTQ"),
        (lambda a: a.update({f"{LLAMA}.weight": np.ones((128, 256), np.float16)}), "weight", "both a plain weight"),
    ],
)
def test_malformed_gptq_names_file_and_tensor(tmp_path, edit, tensor, fragment):
    path = _break(tmp_path, np.random.default_rng(14), edit)
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    msg = str(exc.value)
    full = tensor if "." in tensor else f"{LLAMA}.{tensor}"
    assert "model.safetensors" in msg and f"'{full}'" in msg and fragment in msg, msg


def test_wrong_group_size_in_config(tmp_path):
    path = _break(tmp_path, np.random.default_rng(15), lambda a: None, cfg={"bits": 4, "group_size": 128})
    with pytest.raises(CheckpointError, match=rf"'{LLAMA}.scales': has 4 groups, but 256 input rows with group_size 128 need 2"):
        open_checkpoint(path)


def test_wrong_bits_in_config(tmp_path):
    path = _break(tmp_path, np.random.default_rng(16), lambda a: None, cfg={"bits": 8, "group_size": 64})
    with pytest.raises(CheckpointError, match=rf"'{LLAMA}.g_idx': expected shape \[128\]"):
        open_checkpoint(path)


def test_g_idx_out_of_range_found_at_load(tmp_path):
    def edit(a):
        g = a[f"{LLAMA}.g_idx"].copy()
        g[7] = 9
        a[f"{LLAMA}.g_idx"] = g

    ckpt = open_checkpoint(_break(tmp_path, np.random.default_rng(17), edit))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{LLAMA}.g_idx': g_idx: values must lie in \[0, 4\)"):
        ckpt.load_layer(LLAMA)


@pytest.mark.parametrize(
    "edit, tensor, fragment",
    [
        (lambda a: a.pop(f"{LLAMA}.q_scale"), "q_scale", "has q_weight but no"),
        (lambda a: a.pop(f"{LLAMA}.q_groups"), "q_groups", "has q_weight but no"),
        (lambda a: a.update({f"{LLAMA}.q_scale_max": a[f"{LLAMA}.q_scale_max"][:-1]}), "q_scale_max", "one per group"),
        (lambda a: a.update({f"{LLAMA}.q_scale": a[f"{LLAMA}.q_scale"][:, :8]}), "q_scale", "expected shape"),
        (lambda a: a.update({f"{LLAMA}.q_invperm": a[f"{LLAMA}.q_invperm"].astype(np.float32)}), "q_invperm", "expected dtype"),
        (lambda a: a.update({"model.layers.5.mlp.q_groups": a[f"{LLAMA}.q_groups"]}), "model.layers.5.mlp.q_groups", "dangling"),
    ],
)
def test_malformed_exl2_names_file_and_tensor(tmp_path, edit, tensor, fragment):
    path = _break(tmp_path, np.random.default_rng(18), edit, exl2=True)
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    msg = str(exc.value)
    full = tensor if "." in tensor else f"{LLAMA}.{tensor}"
    assert "model.safetensors" in msg and f"'{full}'" in msg and fragment in msg, msg


def test_exl2_bad_invperm_and_q_perm_found_at_load(tmp_path):
    def dup(a):
        p = a[f"{LLAMA}.q_invperm"].copy()
        p[3] = p[4]
        a[f"{LLAMA}.q_invperm"] = p

    (tmp_path / "a").mkdir()
    ckpt = open_checkpoint(_break(tmp_path / "a", np.random.default_rng(19), dup, exl2=True))
    with pytest.raises(CheckpointError, match=rf"'{LLAMA}.q_invperm'.*permutation"):
        ckpt.load_layer(LLAMA)

    def bad_perm(a):
        a[f"{LLAMA}.q_perm"] = np.arange(256, dtype=np.int32)[::-1].copy()

    (tmp_path / "b").mkdir()
    ckpt = open_checkpoint(_break(tmp_path / "b", np.random.default_rng(19), bad_perm, exl2=True))
    with pytest.raises(CheckpointError, match=rf"'{LLAMA}.q_perm': stored q_perm is not the inverse of q_invperm"):
        ckpt.load_layer(LLAMA)


def test_exl2_bad_q_groups_found_at_load(tmp_path):
    def edit(a):
        g = a[f"{LLAMA}.q_groups"].copy()
        g[0] = 7  # not an EXL2 width
        a[f"{LLAMA}.q_groups"] = g

    ckpt = open_checkpoint(_break(tmp_path, np.random.default_rng(20), edit, exl2=True))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{LLAMA}.q_groups'"):
        ckpt.layer_info(LLAMA)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{LLAMA}.q_groups'"):
        ckpt.load_layer(LLAMA)


def test_truncated_and_garbage_files(tmp_path):
    rng = np.random.default_rng(21)
    _, t = gptq_layer(rng)
    path = tmp_path / "model.safetensors"
    write_tensors(path, {f"{LLAMA}.{k}": v for k, v in t.items()})
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.*': data range .* \(truncated file\?\)"):
        open_checkpoint(tmp_path)
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{abc}")
    with pytest.raises(CheckpointError, match="model.safetensors: safetensors header is not valid JSON"):
        open_checkpoint(tmp_path)
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="model.safetensors: not a safetensors file"):
        open_checkpoint(tmp_path)
    path.unlink()
    with pytest.raises(CheckpointError, match="no .safetensors files"):
        open_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        open_checkpoint(tmp_path / "missing")


# ------------------------------------------------------------------------------------------------
# dtypes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_dtype", ["bf16", "fp32"])
def test_bf16_and_fp32_scales_cast_to_fp16(tmp_path, scale_dtype):
    rng = np.random.default_rng(22)
    _, t = gptq_layer(rng, bias=True)
    scales32 = t["scales"].astype(np.float32)
    arrays = {f"{LLAMA}.{k}": v for k, v in t.items()}
    if scale_dtype == "bf16":
        arrays[f"{LLAMA}.scales"] = bf16_entry(scales32)
        arrays[f"{LLAMA}.bias"] = bf16_entry(t["bias"].astype(np.float32))
        truncated = (scales32.view(np.uint32) & 0xFFFF0000).view(np.float32)
        expected = truncated.astype(np.float16)
    else:
        arrays[f"{LLAMA}.scales"] = scales32
        expected = t["scales"]
    write_tensors(tmp_path / "model.safetensors", arrays)
    write_config(tmp_path, "quantize_config.json", {"bits": 4, "group_size": 64})
    got = open_checkpoint(tmp_path).load_layer(LLAMA)
    assert got["scales"].dtype == np.float16 and got["bias"].dtype == np.float16
    np.testing.assert_array_equal(got["scales"], expected)


def test_fp32_scales_beyond_fp16_refused(tmp_path):
    rng = np.random.default_rng(24)
    _, t = gptq_layer(rng)
    arrays = {f"{LLAMA}.{k}": v for k, v in t.items()}
    scales = t["scales"].astype(np.float32)
    scales[0, 2] = -7.0e4
    arrays[f"{LLAMA}.scales"] = scales
    write_tensors(tmp_path / "model.safetensors", arrays)
    write_config(tmp_path, "quantize_config.json", {"bits": 4, "group_size": 64})
    with pytest.raises(CheckpointError, match=r"scales': scales: expected magnitudes of at most 65504.*-70000 at "
                                              r"index \(0, 2\)"):
        open_checkpoint(tmp_path).load_layer(LLAMA)


def test_missing_g_idx_gets_default(tmp_path):
    rng = np.random.default_rng(23)
    _, t = gptq_layer(rng, group_size=64)
    t.pop("g_idx")
    write_tensors(tmp_path / "model.safetensors", {f"{LLAMA}.{k}": v for k, v in t.items()})
    write_config(tmp_path, "quantize_config.json", {"bits": 4, "group_size": 64})
    got = open_checkpoint(tmp_path).load_layer(LLAMA)
    np.testing.assert_array_equal(got["g_idx"], np.arange(256) // 64)
    assert got["g_idx"].dtype == np.int32


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt, act", [("gptq", True), ("gptq_v2", False)])
def test_gptq_round_trip(tmp_path, bits, fmt, act):
    rng = np.random.default_rng(100 + bits)
    layers = {
        "model.layers.0.self_attn.q_proj": gptq_layer(rng, k=256, n=128, bits=bits, group_size=32, act_order=act, fmt=fmt, bias=True)[1],
        "model.layers.0.mlp.down_proj": gptq_layer(rng, k=512, n=64, bits=bits, group_size=32, act_order=act, fmt=fmt)[1],
    }
    extra = {"model.embed_tokens.weight": rng.standard_normal((32, 256)).astype(np.float16)}
    save_gptq(tmp_path, layers, bits=bits, group_size=32, desc_act=act, sym=True, checkpoint_format=fmt, extra_tensors=extra)
    ckpt = open_checkpoint(tmp_path)
    assert set(ckpt.quantized_layers) == set(layers)
    for name, t in layers.items():
        info = ckpt.layers[name]
        assert (info.bits, info.group_size, info.act_order, info.checkpoint_format) == ((bits,), 32, act, fmt)
        got = ckpt.load_layer(name)
        assert set(got) == set(t)
        for k, v in t.items():
            assert got[k].dtype == v.dtype
            np.testing.assert_array_equal(got[k], v)
    np.testing.assert_array_equal(ckpt.load_tensor("model.embed_tokens.weight"), extra["model.embed_tokens.weight"])


@pytest.mark.parametrize("shard_bytes", [None, 30_000])
def test_exl2_round_trip(tmp_path, shard_bytes):
    rng = np.random.default_rng(31)
    layers = {
        "model.layers.0.self_attn.q_proj": exl2_layer(rng, k=256, n=128, bits=(8, 4), props=(0.25, 0.75))[1],
        "model.layers.0.mlp.gate_proj": exl2_layer(rng, k=256, n=96, bits=(6, 5, 4), props=(0.2, 0.3, 0.5), bias=True)[1],
        "lm_head": exl2_layer(rng, k=256, n=64, bits=(6,), props=(1.0,))[1],
    }
    save_exl2(tmp_path, layers, bits=4.65, shard_bytes=shard_bytes)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "exl2" and cfg["bits"] == 4.65 and cfg["head_bits"] == 6.0
    assert not (tmp_path / "quantize_config.json").exists()
    ckpt = open_checkpoint(tmp_path)
    for name, t in layers.items():
        got = ckpt.load_layer(name)
        for k, v in t.items():
            if k == "bias":
                np.testing.assert_array_equal(got[k][: v.shape[0]], v)
                assert not got[k][v.shape[0]:].any()  # padding columns get a zero bias
            else:
                np.testing.assert_array_equal(got[k], v)
        np.testing.assert_array_equal(got["q_perm"], np.argsort(t["q_invperm"]))
    info = ckpt.layer_info("model.layers.0.mlp.gate_proj")
    assert info.out_features == 96 and info.bits == (6, 5, 4)
    assert sum(r for _, r in info.bit_mix) == 256


def test_save_writes_both_format_keys_and_refuses_to_overwrite(tmp_path):
    rng = np.random.default_rng(32)
    layers = {LLAMA: gptq_layer(rng, fmt="gptq_v2")[1]}
    save_gptq(tmp_path, layers, bits=4, group_size=64, desc_act=False, sym=True, checkpoint_format="gptq_v2",
              config={"model_type": "llama", "hidden_size": 256})
    cfg = json.loads((tmp_path / "config.json").read_text())
    qcfg = json.loads((tmp_path / "quantize_config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["quantization_config"] == qcfg
    assert qcfg["format"] == qcfg["checkpoint_format"] == "gptq_v2"
    assert (qcfg["bits"], qcfg["group_size"], qcfg["desc_act"], qcfg["sym"]) == (4, 64, False, True)
    with pytest.raises(FileExistsError):
        save_gptq(tmp_path, layers, bits=4, group_size=64, desc_act=False, sym=True)
    save_gptq(tmp_path, layers, bits=4, group_size=64, desc_act=False, sym=True, checkpoint_format="gptq_v2", overwrite=True)


@pytest.mark.parametrize(
    "kwargs, layers_edit, err, fragment",
    [
        ({"bits": 5}, None, ValueError, "bits"),
        ({"group_size": 0}, None, ValueError, "group_size"),
        ({"checkpoint_format": "marlin"}, None, ValueError, "checkpoint_format"),
        ({"bits": 8}, None, ValueError, "layers['l']"),
        ({"group_size": 32}, None, ValueError, "groups"),
        ({}, lambda t: t.pop("qzeros"), ValueError, "missing tensor 'qzeros'"),
        ({}, lambda t: t.update(qweights=t["qweight"]), ValueError, "unexpected tensors ['qweights']"),
    ],
)
def test_save_gptq_validates(tmp_path, kwargs, layers_edit, err, fragment):
    rng = np.random.default_rng(33)
    t = dict(gptq_layer(rng, bits=4, group_size=64)[1])
    if layers_edit:
        layers_edit(t)
    args = dict(bits=4, group_size=64, desc_act=False, sym=True)
    args.update(kwargs)
    with pytest.raises(err) as exc:
        save_gptq(tmp_path, {"l": t}, **args)
    assert fragment in str(exc.value)
    assert not list(tmp_path.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------------
# public model conventions, tensors built by hand (independent of cupyq's packers)
# ------------------------------------------------------------------------------------------------


def _pack_rows_4bit(q):
    """4-bit values [K, N] -> int32 [K/8, N], value 8r+i at bits 4i of word r (independent packer)."""
    q = q.astype(np.uint32).reshape(q.shape[0] // 8, 8, q.shape[1])
    words = np.zeros((q.shape[0], q.shape[2]), dtype=np.uint32)
    for i in range(8):
        words |= q[:, i, :] << np.uint32(4 * i)
    return words.view(np.int32)


def _pack_cols_4bit(q):
    """4-bit values [G, N] -> int32 [G, N/8], column 8j+i at bits 4i of word j."""
    return np.ascontiguousarray(_pack_rows_4bit(np.ascontiguousarray(q.T)).T)


PUBLIC_GPTQ_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 256,
    "model_type": "llama",
    "quantization_config": {
        "batch_size": 1, "bits": 4, "block_name_to_quantize": None, "cache_block_outputs": True,
        "damp_percent": 0.01, "dataset": None, "desc_act": True, "exllama_config": {"version": 1},
        "group_size": 128, "max_input_length": None, "model_seqlen": None, "module_name_preceding_first_block": None,
        "modules_in_block_to_quantize": None, "pad_token_id": None, "quant_method": "gptq", "sym": True,
        "tokenizer": None, "true_sequential": True, "use_cuda_fp16": False, "use_exllama": True,
    },
    "torch_dtype": "float16",
}
PUBLIC_QUANTIZE_CONFIG = {
    "bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": True, "static_groups": False, "sym": True,
    "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model", "quant_method": "gptq",
    "checkpoint_format": "gptq",
}


def test_public_gptq_llama_conventions(tmp_path):
    rng = np.random.default_rng(40)
    k, n, gs = 256, 128, 128
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"]
    arrays, expected = {}, {}
    for name in names:
        q = rng.integers(0, 16, size=(k, n))
        g_idx = (rng.permutation(k) // gs).astype(np.int32)  # act-order: non-monotonic map
        scales = (rng.random((k // gs, n)) * 0.01 + 0.001).astype(np.float16)
        arrays[f"{name}.qweight"] = _pack_rows_4bit(q)
        arrays[f"{name}.qzeros"] = np.full((k // gs, n // 8), 0x77777777, dtype=np.int32)  # v1 sym: z-1 = 7
        arrays[f"{name}.scales"] = scales
        arrays[f"{name}.g_idx"] = g_idx
        arrays[f"{name}.bias"] = np.zeros(n, dtype=np.float16)  # exporters often write an all-zero bias
        expected[name] = scales.astype(np.float32)[g_idx] * (q - 8)
    arrays["model.embed_tokens.weight"] = rng.standard_normal((64, k)).astype(np.float16)
    arrays["model.layers.0.input_layernorm.weight"] = np.ones(k, np.float16)
    arrays["lm_head.weight"] = rng.standard_normal((64, k)).astype(np.float16)
    write_tensors(tmp_path / "model.safetensors", arrays)
    write_config(tmp_path, "config.json", PUBLIC_GPTQ_CONFIG)
    write_config(tmp_path, "quantize_config.json", PUBLIC_QUANTIZE_CONFIG)

    ckpt = open_checkpoint(tmp_path)
    assert ckpt.quant_config.source.name == "quantize_config.json"
    assert set(ckpt.quantized_layers) == set(names)
    assert {ckpt.layers["lm_head"].format, ckpt.layers["model.embed_tokens"].format} == {"fp16"}
    assert "model.layers.0.input_layernorm.weight" in ckpt.extra_tensor_names()
    for name in names:
        info = ckpt.layers[name]
        assert (info.bits, info.group_size, info.act_order, info.checkpoint_format) == ((4,), 128, True, "gptq")
        np.testing.assert_allclose(ckpt.dequantize(name), expected[name], rtol=1e-6, atol=1e-7)

    # the same directory without quantize_config.json is read from config.json (with its hints)
    (tmp_path / "quantize_config.json").unlink()
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.quant_config.source.name == "config.json"
    assert ckpt.quant_config.hints == {"exllama_config": {"version": 1}, "use_cuda_fp16": False,
                                       "use_exllama": True, "max_input_length": None}
    np.testing.assert_allclose(ckpt.dequantize(names[0]), expected[names[0]], rtol=1e-6, atol=1e-7)


def test_public_exl2_conventions(tmp_path):
    rng = np.random.default_rng(41)
    k, n, rows_per_group = 256, 128, 32
    groups = k // rows_per_group
    arrays, expected = {}, {}
    for name in ("model.layers.0.self_attn.q_proj", "lm_head"):
        q_sorted = rng.integers(0, 16, size=(k, n))
        codes = rng.integers(0, 16, size=(groups, n))
        q_scale_max = (rng.random(groups) * 0.02 + 0.01).astype(np.float16)
        invperm = rng.permutation(k).astype(np.int32)
        arrays[f"{name}.q_weight"] = _pack_rows_4bit(q_sorted)
        arrays[f"{name}.q_invperm"] = invperm
        arrays[f"{name}.q_scale"] = _pack_cols_4bit(codes)
        arrays[f"{name}.q_scale_max"] = q_scale_max
        arrays[f"{name}.q_groups"] = np.array(
            [v for g in range(groups) for v in (4, g * rows_per_group * 4 // 32)], dtype=np.int16)
        scale = (codes + 1.0) ** 2 * q_scale_max.astype(np.float64)[:, None] / 256.0
        w_sorted = (q_sorted - 8) * np.repeat(scale, rows_per_group, axis=0)
        expected[name] = w_sorted[invperm]  # W[row] = Wp[invperm[row]]
    arrays["model.embed_tokens.weight"] = rng.standard_normal((n, k)).astype(np.float16)
    write_tensors(tmp_path / "output.safetensors", arrays)
    write_config(tmp_path, "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "quantization_config": {"quant_method": "exl2", "version": "0.2.3", "bits": 4.65, "head_bits": 6,
                                "calibration": {"rows": 115, "length": 2048, "dataset": "(default)"}}})
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.quant_config.quant_method == "exl2" and ckpt.quant_config.bits == 4.65
    assert set(ckpt.quantized_layers) == {"model.layers.0.self_attn.q_proj", "lm_head"}
    for name, w in expected.items():
        info = ckpt.layer_info(name)
        assert (info.format, info.bits, info.group_size, info.act_order) == ("exl2", (4,), 32, True)
        assert info.bits_per_weight == pytest.approx(4 + 4 / 32 + 16 * groups / (k * n))
        np.testing.assert_allclose(ckpt.dequantize(name), w, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(ckpt.load_layer(name)["q_perm"], np.argsort(arrays[f"{name}.q_invperm"]))


# ------------------------------------------------------------------------------------------------
# the built-in sample
# ------------------------------------------------------------------------------------------------


def test_make_sample(tmp_path):
    import time

    from cupyq.sample import SAMPLE_RECIPES, make_sample

    start = time.perf_counter()
    made = make_sample(tmp_path, seed=3)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0  # about 0.5 s on one core; generous for loaded CI machines
    assert set(made) == set(SAMPLE_RECIPES)
    gptq4 = open_checkpoint(made["gptq-4bit-g128-act"])
    for name in gptq4.quantized_layers:
        info = gptq4.layers[name]
        assert (info.bits, info.group_size, info.act_order, info.checkpoint_format) == ((4,), 128, True, "gptq")
    gptq3 = open_checkpoint(made["gptq-3bit-g64-asym-v2"])
    assert {gptq3.layers[n].bits for n in gptq3.quantized_layers} == {(3,)}
    assert not gptq3.quant_config.sym and gptq3.quant_config.checkpoint_format == "gptq_v2"
    exl2 = open_checkpoint(made["exl2-mixed"])
    mixes = {exl2.layer_info(n).bits for n in exl2.quantized_layers}
    assert mixes == {(8, 4), (6, 5, 4), (4, 3, 2)}
    shapes = {(i.in_features, i.out_features) for c in (gptq4, gptq3, exl2) for i in c.layers.values() if i.quantized}
    assert all(256 <= min(s) and max(s) <= 2048 for s in shapes) and len(shapes) >= 3
    # same seed, same tensors
    again = make_sample(tmp_path / "again", seed=3)
    a = open_checkpoint(again["exl2-mixed"]).load_layer("model.layers.0.mlp.gate_proj")
    b = exl2.load_layer("model.layers.0.mlp.gate_proj")
    assert all(np.array_equal(a[k], b[k]) for k in a)
