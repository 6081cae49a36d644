"""Reliability of checkpoint reading and writing: v1 zero encodings by producer (with a checkpoint GPTQModel
made), warnings, desc_act without g_idx, non-finite scales, int16 permutations, malformed headers,
misleading messages, and saving that never leaves a broken directory."""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from cupyq import cli
from cupyq.checkpoint import (
    CheckpointError,
    open_checkpoint,
    read_safetensors_header,
    save_exl2,
    save_gptq,
    v1_zero_encoding,
    zero_point_warnings,
)
from cupyq.formats import gptq as fg
from cupyq.quantize import quantize_exl2, quantize_gptq

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "gptqmodel_asym_v1"
EXPECTED = DATA / "gptqmodel_asym_v1_expected.safetensors"
LAYER = "model.layers.0.mlp.up_proj"
WORD_ONES = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}


# ------------------------------------------------------------------------------------------------ helpers
def write_raw(path, header, data=b""):
    """A safetensors file from a header object (written as given) and raw data bytes."""
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    raw += b" " * (-len(raw) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def write_arrays(path, arrays):
    codes = {"float16": "F16", "float32": "F32", "int32": "I32", "int16": "I16", "int64": "I64"}
    header, blobs, offset = {}, [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        header[name] = {"dtype": codes[a.dtype.name], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        blobs.append(a.tobytes())
        offset += a.nbytes
    write_raw(path, header, b"".join(blobs))


def pack_fields(values, bits, axis):
    """Pack 2/4/8-bit integers into uint32 words along ``axis`` (field i of a word at shift bits*i)."""
    per = 32 // bits
    v = np.moveaxis(np.asarray(values, dtype=np.uint64), axis, 0)
    v = v.reshape(v.shape[0] // per, per, *v.shape[1:])
    words = np.zeros((v.shape[0],) + v.shape[2:], dtype=np.uint64)
    for i in range(per):
        words |= v[:, i] << np.uint64(bits * i)
    return np.moveaxis(words.astype(np.uint32), 0, axis)


def word_encoded_dir(directory, rng, meta, bits=4, k=128, n=64, gs=32, where="quantize_config.json"):
    """A v1 asymmetric checkpoint whose zeros were written word-wise; returns (directory, float32 oracle W)."""
    groups = k // gs
    q = rng.integers(0, 1 << bits, size=(k, n))
    z = rng.integers(0, 1 << bits, size=(groups, n))
    z[rng.random(z.shape) < 0.3] = 0
    s = (rng.random((groups, n)) * 0.05 + 0.01).astype(np.float16)
    g = np.arange(k) // gs
    qzeros = ((pack_fields(z, bits, 1).astype(np.int64) - WORD_ONES[bits]) % (1 << 32)).astype(np.uint32).view(np.int32)
    directory.mkdir(parents=True, exist_ok=True)
    write_arrays(directory / "model.safetensors", {
        f"{LAYER}.qweight": pack_fields(q, bits, 0).view(np.int32), f"{LAYER}.qzeros": qzeros,
        f"{LAYER}.scales": s, f"{LAYER}.g_idx": g.astype(np.int32),
    })
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": gs, "desc_act": False, "sym": False, "format": "gptq"}
    if meta is not None:
        qcfg["meta"] = meta
    if where == "config.json":
        (directory / "config.json").write_text(json.dumps({"quantization_config": qcfg}))
    else:
        (directory / where).write_text(json.dumps(qcfg))
    return directory, s.astype(np.float32)[g] * (q.astype(np.float32) - z.astype(np.float32)[g])


def snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


def expected_tool_outputs():
    from safetensors.numpy import load_file

    return load_file(str(EXPECTED))


# ------------------------------------------------------------------------------------------------ item 0
def test_gptqmodel_checkpoint_decodes_bit_equal_to_the_tool():
    ref = expected_tool_outputs()
    ckpt = open_checkpoint(FIXTURE)
    assert ckpt.quantized_layers and len(ckpt.quantized_layers) == 7
    assert zero_point_warnings(ckpt) == {}
    for name in ckpt.quantized_layers:
        info = ckpt.layers[name]
        assert (info.checkpoint_format, info.v1_encoding, info.v1_encoding_known) == ("gptq", "word", True)
        tool = ref[name + ".dequantized"]  # fp16 [in, out], the tool's dequantize_weight()
        ours = ckpt.dequantize(name).astype(np.float16)
        np.testing.assert_array_equal(ours.view(np.uint16), tool.view(np.uint16), err_msg=name)
        cpu = ckpt.qmatrix(name).reference_weight().astype(np.float16)
        np.testing.assert_array_equal(cpu.view(np.uint16), tool.view(np.uint16), err_msg=name)
        # the file does hold zeros of 0, which a per-field reading gets wrong
        t = ckpt.load_layer(name)
        assert fg.ambiguous_v1_zeros(t["qzeros"], 4) > 0
        from cupyq import reference

        field = reference.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], v1_encoding="field")
        assert np.mean(field.astype(np.float16) != tool) > 0.05


def _copy_fixture(tmp_path, meta):
    d = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, d)
    for fname in ("quantize_config.json", "config.json"):
        cfg = json.loads((d / fname).read_text())
        target = cfg["quantization_config"] if fname == "config.json" else cfg
        if meta is None:
            target.pop("meta", None)
        else:
            target["meta"] = meta
        (d / fname).write_text(json.dumps(cfg))
    return d


def test_unknown_producer_is_read_per_field_and_warned(tmp_path, capsys):
    d = _copy_fixture(tmp_path, None)
    ckpt = open_checkpoint(d)
    info = ckpt.layers[LAYER]
    assert (info.v1_encoding, info.v1_encoding_known) == ("field", False)
    warned = zero_point_warnings(ckpt)
    assert sorted(warned) == sorted(ckpt.quantized_layers)
    msg = warned[LAYER][0]
    assert str(d / "model.safetensors") in msg and f"{LAYER}.qzeros" in msg and "meta.quantizer" in msg
    assert cli.main(["inspect", str(d)]) == 0
    out = capsys.readouterr().out
    assert out.count("warning: ") == 7 and f"{LAYER}.qzeros" in out
    assert cli.main(["verify", str(d), "--cpu", "--m", "1"]) == 0
    assert f"warning: {msg}" in capsys.readouterr().out


def test_fixture_checkpoint_has_no_warning_in_cli(capsys):
    assert cli.main(["inspect", str(FIXTURE)]) == 0
    assert "warning:" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "meta, expected",
    [
        ({"quantizer": ["gptqmodel:0.9.0"]}, "word"),
        ({"quantizer": "gptqmodel:7.7.0"}, "word"),
        ({"quantizer": ["optimum:1.24.0", "gptqmodel:2.2.0"]}, "word"),
        ({"quantizer": ["gptqmodel:0.8.9"]}, None),
        ({"quantizer": ["auto_gptq:0.7.1"]}, None),
        ({"quantizer": ["cupyq:0.1.0"]}, "field"),
        ({"damp_percent": 0.01}, None),
        (None, None),
    ],
)
@pytest.mark.parametrize("where", ["quantize_config.json", "config.json"])
def test_encoding_recognised_from_meta_quantizer(tmp_path, meta, expected, where):
    rng = np.random.default_rng(21)
    d, w = word_encoded_dir(tmp_path / "c", rng, meta, where=where)
    ckpt = open_checkpoint(d)
    assert v1_zero_encoding(ckpt.quant_config) == expected
    info = ckpt.layers[LAYER]
    assert info.v1_encoding == (expected or "field") and info.v1_encoding_known == (expected is not None)
    if expected == "word":
        np.testing.assert_array_equal(ckpt.dequantize(LAYER), w)
        np.testing.assert_array_equal(ckpt.qmatrix(LAYER).reference_weight(), w)
        assert zero_point_warnings(ckpt) == {}
    else:
        assert not np.array_equal(ckpt.dequantize(LAYER), w)  # written word-wise, read per field as declared
        assert (LAYER in zero_point_warnings(ckpt)) == (expected is None)


@pytest.mark.parametrize("bits", [2, 8])
def test_word_encoded_2_and_8_bit_checkpoints(tmp_path, bits):
    d, w = word_encoded_dir(tmp_path / "c", np.random.default_rng(bits), {"quantizer": ["gptqmodel:4.0.0"]}, bits=bits)
    np.testing.assert_array_equal(open_checkpoint(d).dequantize(LAYER), w)


def test_save_gptq_writes_asymmetric_layers_as_v2(tmp_path):
    rng = np.random.default_rng(22)
    w = rng.standard_normal((128, 64)).astype(np.float32) * 0.05
    w[:, 3] = np.abs(w[:, 3]) + 0.01  # a column with zero points of 0
    t = quantize_gptq(w, bits=4, group_size=32, sym=False, checkpoint_format="gptq")
    before = {k: v.copy() for k, v in t.items()}
    d = save_gptq(tmp_path / "asym", {LAYER: t}, bits=4, group_size=32, desc_act=False, sym=False)
    cfg = json.loads((d / "quantize_config.json").read_text())
    assert cfg["format"] == cfg["checkpoint_format"] == "gptq_v2"
    ckpt = open_checkpoint(d)
    assert ckpt.layers[LAYER].checkpoint_format == "gptq_v2"
    zeros = fg.unpack_qzeros(t["qzeros"], 4, 64, checkpoint_format="gptq")
    assert (zeros == 0).any()
    np.testing.assert_array_equal(ckpt.load_tensor(f"{LAYER}.qzeros").view(np.uint32), pack_fields(zeros, 4, 1))
    for k, v in t.items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"{k} was modified")
    sym = quantize_gptq(w, bits=4, group_size=32, sym=True)
    d2 = save_gptq(tmp_path / "sym", {LAYER: sym}, bits=4, group_size=32, desc_act=False, sym=True)
    assert json.loads((d2 / "quantize_config.json").read_text())["format"] == "gptq"
    d3 = save_gptq(tmp_path / "v1", {LAYER: t}, bits=4, group_size=32, desc_act=False, sym=False, write_format="gptq")
    assert open_checkpoint(d3).layers[LAYER].v1_encoding_known  # cupyq's own v1 files are per field
    np.testing.assert_array_equal(open_checkpoint(d3).dequantize(LAYER), ckpt.dequantize(LAYER))
    with pytest.raises(ValueError, match=r"write_format: expected one of \('gptq', 'gptq_v2'\) or None, got 'v3'"):
        save_gptq(tmp_path / "bad", {LAYER: t}, bits=4, group_size=32, desc_act=False, sym=False, write_format="v3")


# ------------------------------------------------------------------------------------------------ item 2
def _old_checkpoint(tmp_path):
    t = quantize_gptq(np.random.default_rng(23).standard_normal((64, 32)).astype(np.float32), bits=4, group_size=32)
    d = save_gptq(tmp_path / "ckpt", {LAYER: t}, bits=4, group_size=32, desc_act=False, sym=True, shard_bytes=4000)
    (d / "tokenizer.json").write_text("{}")
    return d, t


@pytest.mark.parametrize("shard_bytes", [0, -5, 1.5, "big"])
def test_bad_shard_bytes_leaves_old_checkpoint_intact(tmp_path, shard_bytes):
    d, t = _old_checkpoint(tmp_path)
    before = snapshot(d)
    with pytest.raises(ValueError, match=rf"shard_bytes: expected a positive integer, got {shard_bytes!r}"):
        save_gptq(d, {LAYER: t}, bits=4, group_size=32, desc_act=False, sym=True, shard_bytes=shard_bytes, overwrite=True)
    assert snapshot(d) == before
    ex = quantize_exl2(np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32))
    with pytest.raises(ValueError, match="shard_bytes: expected a positive integer"):
        save_exl2(d, {LAYER: ex}, shard_bytes=shard_bytes, overwrite=True)
    assert snapshot(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging directory left behind


def test_failed_write_leaves_old_checkpoint_intact(tmp_path):
    d, t = _old_checkpoint(tmp_path)
    before = snapshot(d)
    with pytest.raises(TypeError):
        save_gptq(d, {LAYER: t}, bits=4, group_size=32, desc_act=False, sym=True, config={"x": object()}, overwrite=True)
    assert snapshot(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_overwrite_replaces_checkpoint_and_keeps_other_files(tmp_path):
    d, t = _old_checkpoint(tmp_path)
    save_gptq(d, {LAYER: t}, bits=4, group_size=32, desc_act=False, sym=True, overwrite=True)
    names = sorted(p.name for p in d.iterdir())
    assert names == ["config.json", "model.safetensors", "quantize_config.json", "tokenizer.json"]
    assert open_checkpoint(d).quantized_layers == [LAYER]
    with pytest.raises(FileExistsError, match="already holds model.safetensors; pass overwrite=True"):
        save_gptq(d, {LAYER: t}, bits=4, group_size=32, desc_act=False, sym=True)


# ------------------------------------------------------------------------------------------------ item 3
def test_desc_act_without_g_idx_refused(tmp_path):
    t = quantize_gptq(np.random.default_rng(24).standard_normal((128, 32)).astype(np.float32), bits=4, group_size=32,
                      act_order=True)
    write_arrays(tmp_path / "model.safetensors", {f"{LAYER}.{k}": v for k, v in t.items() if k != "g_idx"})
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32, "desc_act": True}))
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "model.safetensors") in msg and f"'{LAYER}.qweight'" in msg
    assert "desc_act" in msg and f"'{LAYER}.g_idx'" in msg


def test_loader_uses_the_config_group_size(tmp_path):
    rng = np.random.default_rng(25)
    k, n, gs = 96, 16, 40  # 3 groups of 40, 40, 16 rows; ceil(96 / 3) = 32 would be wrong
    q = rng.integers(0, 16, size=(k, n))
    z = rng.integers(1, 16, size=(3, n))
    s = (rng.random((3, n)) * 0.05 + 0.01).astype(np.float16)
    write_arrays(tmp_path / "model.safetensors", {f"{LAYER}.qweight": pack_fields(q, 4, 0).view(np.int32),
                                                  f"{LAYER}.qzeros": fg.pack_qzeros(z, 4), f"{LAYER}.scales": s})
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": gs}))
    w = s.astype(np.float32)[np.arange(k) // gs] * (q - z[np.arange(k) // gs]).astype(np.float32)
    ckpt = open_checkpoint(tmp_path)
    np.testing.assert_array_equal(ckpt.dequantize(LAYER), w)
    qm = ckpt.qmatrix(LAYER)
    assert qm.group_size == gs
    np.testing.assert_array_equal(qm.reference_weight(), w)
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 64}))
    with pytest.raises(CheckpointError, match=rf"'{LAYER}.scales': has 3 groups, but 96 input rows with group_size 64 need 2"):
        open_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------------ item 4
def test_nan_scales_rejected_by_the_loader(tmp_path):
    t = quantize_gptq(np.random.default_rng(26).standard_normal((64, 32)).astype(np.float32), bits=4, group_size=32)
    t["scales"][1, 4] = np.nan
    write_arrays(tmp_path / "model.safetensors", {f"{LAYER}.{k}": v for k, v in t.items()})
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32}))
    ckpt = open_checkpoint(tmp_path)
    for fn in (lambda: ckpt.load_layer(LAYER), lambda: ckpt.qmatrix(LAYER), lambda: ckpt.dequantize(LAYER)):
        with pytest.raises(CheckpointError) as err:
            fn()
        assert str(err.value) == (f"{tmp_path / 'model.safetensors'}: tensor '{LAYER}.scales': scales: expected finite "
                                  "values, got 1 NaN/Inf, the first at index (1, 4)")


def test_inf_q_scale_max_rejected_by_the_loader(tmp_path):
    t = quantize_exl2(np.random.default_rng(27).standard_normal((64, 32)).astype(np.float32))
    t["q_scale_max"][0] = np.inf
    write_arrays(tmp_path / "model.safetensors", {f"{LAYER}.{k}": v for k, v in t.items() if k != "q_perm"})
    with pytest.raises(CheckpointError, match=rf"tensor '{LAYER}.q_scale_max': q_scale_max: expected finite values"):
        open_checkpoint(tmp_path).qmatrix(LAYER)


# ------------------------------------------------------------------------------------------------ item 8
def test_int16_q_invperm_above_32767_loads(tmp_path):
    k, n = 32800, 8
    t = quantize_exl2(np.random.default_rng(28).standard_normal((k, n)).astype(np.float32))
    inv32 = t["q_invperm"].astype(np.int32)
    tensors = {f"{LAYER}.{p}": t[p] for p in ("q_weight", "q_scale", "q_scale_max", "q_groups")}
    write_arrays(tmp_path / "a" / "model.safetensors" if (tmp_path / "a").mkdir() is None else None,
                 dict(tensors, **{f"{LAYER}.q_invperm": inv32.astype(np.uint16).view(np.int16)}))
    (tmp_path / "b").mkdir()
    write_arrays(tmp_path / "b" / "model.safetensors", dict(tensors, **{f"{LAYER}.q_invperm": inv32}))
    a, b = open_checkpoint(tmp_path / "a"), open_checkpoint(tmp_path / "b")
    assert a.layer_info(LAYER).act_order == b.layer_info(LAYER).act_order
    np.testing.assert_array_equal(a.load_layer(LAYER)["q_invperm"], inv32)
    np.testing.assert_array_equal(a.dequantize(LAYER), b.dequantize(LAYER))
    np.testing.assert_array_equal(a.qmatrix(LAYER).reference_weight(), b.dequantize(LAYER))


# ------------------------------------------------------------------------------------------------ item 9
def _entry(dtype="F16", shape=(2,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    "entries, tensor, fragment",
    [
        ({"a": _entry(offsets=(0, 4)), "b": _entry(offsets=(2, 6))}, "b", "overlaps tensor 'a' [0, 4)"),
        ({"a": _entry(shape=(-2, -1), offsets=(0, 4))}, "a", "shape must be a list of non-negative integers, got [-2, -1]"),
        ({"a": _entry(shape=(2.5,))}, "a", "shape must be a list of non-negative integers"),
        ({"a": {"dtype": "F16", "shape": [2], "data_offsets": ["0", "4"]}}, "a",
         "data_offsets must be two non-negative integers, got ['0', '4']"),
        ({"a": {"dtype": "F16", "shape": [2], "data_offsets": [0]}}, "a", "data_offsets must be two non-negative integers"),
        ({"a": {"dtype": "F16", "shape": [2]}}, "a", "malformed header entry: missing data_offsets"),
        ({"a": [1, 2]}, "a", "malformed header entry: expected an object"),
        ({"a": _entry(dtype=["F16"])}, "a", "unsupported safetensors dtype ['F16']"),
    ],
)
def test_malformed_header_entries_name_file_and_tensor(tmp_path, entries, tensor, fragment):
    path = tmp_path / "model.safetensors"
    write_raw(path, entries, bytes(8))
    with pytest.raises(CheckpointError) as err:
        read_safetensors_header(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: tensor '{tensor}': ") and fragment in msg, msg


def test_deeply_nested_header_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "model.safetensors"
    write_raw(path, b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}")
    with pytest.raises(CheckpointError, match=rf"^{path}: safetensors header is nested too deeply"):
        read_safetensors_header(path)


@pytest.mark.parametrize("arrays, tensor", [
    ({"gptq_bits": np.zeros(0, dtype=np.int32)}, "gptq_bits"),
    ({"gptq_bits": np.array([4.0], dtype=np.float32)}, "gptq_bits"),
    ({"gptq_bits": np.array([4], dtype=np.int32), "gptq_groupsize": np.zeros((0, 2), dtype=np.int32)}, "gptq_groupsize"),
])
def test_bad_tgi_scalar_tensors_are_named(tmp_path, arrays, tensor):
    t = quantize_gptq(np.random.default_rng(29).standard_normal((64, 32)).astype(np.float32), bits=4, group_size=32)
    write_arrays(tmp_path / "model.safetensors", dict({f"{LAYER}.{k}": v for k, v in t.items()}, **arrays))
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'model.safetensors'}: tensor '{tensor}': expected one integer")


# ------------------------------------------------------------------------------------------------ item 16
def test_safetensors_directory_or_broken_link_is_named(tmp_path):
    t = quantize_gptq(np.random.default_rng(30).standard_normal((64, 32)).astype(np.float32), bits=4, group_size=32)
    save_gptq(tmp_path, {LAYER: t}, bits=4, group_size=32, desc_act=False, sym=True)
    (tmp_path / "extra.safetensors").mkdir()
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(tmp_path)
    assert str(err.value) == f"{tmp_path / 'extra.safetensors'}: is a directory, not a safetensors file"
    (tmp_path / "extra.safetensors").rmdir()
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(tmp_path)
    assert str(err.value) == f"{tmp_path / 'link.safetensors'}: is a broken link, not a safetensors file"
    assert "index" not in str(err.value)


def test_new_directory_gets_default_permissions(tmp_path):
    t = quantize_gptq(np.random.default_rng(31).standard_normal((64, 32)).astype(np.float32), bits=4, group_size=32)
    d = save_gptq(tmp_path / "new" / "ckpt", {LAYER: t}, bits=4, group_size=32, desc_act=False, sym=True)
    (tmp_path / "plain").mkdir()
    assert d.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    assert sorted(p.name for p in d.parent.iterdir()) == ["ckpt"]
