"""Checkpoint inputs that must be refused with a clear error: bad per-module overrides, integer tensors whose
stored values are out of range before they are narrowed, incomplete shard indexes and config files that
disagree; and `cupyq verify` given one checkpoint under several paths."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from cupyq import cli, reference
from cupyq.checkpoint import INDEX_FILE, CheckpointError, open_checkpoint, read_quant_config, save_gptq
from cupyq.formats import perm_from_invperm
from cupyq.quantize import quantize_exl2, quantize_gptq

LAYER = "model.layers.0.mlp.up_proj"


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def gptq_tensors(rng, k=128, n=64, group_size=64, act_order=False, fmt="gptq", sym=True):
    w = rng.standard_normal((k, n)).astype(np.float32)
    return quantize_gptq(w, bits=4, group_size=group_size, act_order=act_order, checkpoint_format=fmt, sym=sym)


def saved_gptq(directory, rng, **kwargs):
    """A saved one-layer 4-bit g64 GPTQ directory (quantize_config.json and config.json)."""
    save_gptq(directory, {LAYER: gptq_tensors(rng)}, bits=4, group_size=64, desc_act=False, sym=True, **kwargs)
    return directory


def edit_json(path, edit):
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def set_dynamic(directory, dynamic):
    edit_json(directory / "quantize_config.json", lambda c: c.update(dynamic=dynamic))


# ------------------------------------------------------------------------------------------------
# GPTQModel 'dynamic' overrides
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        ({"group_size": "128"}, "group_size", "expected -1 or a positive integer, got '128'"),
        ({"group_size": 0}, "group_size", "expected -1 or a positive integer, got 0"),
        ({"group_size": -2}, "group_size", "expected -1 or a positive integer, got -2"),
        ({"desc_act": "no"}, "desc_act", "expected true or false, got 'no'"),
        ({"sym": 1}, "sym", "expected true or false, got 1"),
        ({"bits": 5}, "bits", "expected one of (2, 3, 4, 8), got 5"),
        ({"bits": True}, "bits", "expected one of (2, 3, 4, 8), got True"),
        ({"format": "marlin"}, "format", "marlin"),
        ({"checkpoint_format": "gptq_v2"}, "format", "per-module checkpoint formats are not supported"),
    ],
)
def test_dynamic_override_checked_like_top_level_key(tmp_path, override, key, fragment):
    d = saved_gptq(tmp_path / "ckpt", np.random.default_rng(100))
    set_dynamic(d, {r"+:.*\.mlp\..*": {"bits": 4, **override}})
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(d)
    msg = str(exc.value)
    assert "quantize_config.json" in msg and r"'+:.*\\.mlp\\..*'" in msg and f"key '{key}'" in msg, msg
    assert fragment in msg, msg


def test_dynamic_overrides_apply_group_size_and_act_order(tmp_path):
    rng = np.random.default_rng(101)
    t = gptq_tensors(rng, group_size=32, act_order=True)
    save_file({f"{LAYER}.{k}": v for k, v in t.items()}, str(tmp_path / "model.safetensors"))
    dynamic = {r"+:.*up_proj": {"group_size": 32, "desc_act": True, "sym": True, "format": "gptq"}, r"-:.*down_proj": {}}
    (tmp_path / "quantize_config.json").write_text(json.dumps(
        {"bits": 4, "group_size": 64, "desc_act": False, "dynamic": dynamic}))
    ckpt = open_checkpoint(tmp_path)
    info = ckpt.layers[LAYER]
    assert (info.group_size, info.act_order) == (32, True)
    want = reference.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4, group_size=32)
    np.testing.assert_array_equal(ckpt.dequantize(LAYER), want)


def test_dynamic_unknown_override_keys_are_ignored(tmp_path):
    # As unknown top-level keys are: GPTQModel writes tuning keys that do not change the format.
    d = saved_gptq(tmp_path / "ckpt", np.random.default_rng(102))
    set_dynamic(d, {r"+:.*": {"damp_percent": "0.05", "mse": 2.4, "v2": None}})
    assert read_quant_config(d).for_layer(LAYER) == (4, 64, False, True)
    assert open_checkpoint(d).layers[LAYER].group_size == 64


def test_bad_dynamic_override_is_a_cli_input_error(tmp_path, capsys):
    d = saved_gptq(tmp_path / "ckpt", np.random.default_rng(103))
    set_dynamic(d, {"+:.*": {"group_size": "128"}})
    code, out, err = run(["inspect", str(d)], capsys)
    assert code == 2 and "Traceback" not in err
    assert "cupyq inspect: error:" in err and "'dynamic'" in err and "key 'group_size'" in err
    code, out, err = run(["verify", str(d), "--cpu", "--json"], capsys)
    assert code == 2
    assert "key 'group_size'" in json.loads(out)["error"]


# ------------------------------------------------------------------------------------------------
# integer tensors: ranges checked on the stored values, before narrowing
# ------------------------------------------------------------------------------------------------


def write_gptq_with_g_idx(directory, t, g_idx):
    arrays = {f"{LAYER}.qweight": t["qweight"], f"{LAYER}.qzeros": t["qzeros"], f"{LAYER}.scales": t["scales"],
              f"{LAYER}.g_idx": g_idx}
    save_file(arrays, str(directory / "model.safetensors"))
    (directory / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 64, "sym": True}))
    return directory


@pytest.mark.parametrize("bad", [2**32 + 1, -(2**32) + 1, 2**40])
def test_int64_g_idx_out_of_range_is_refused_before_the_cast(tmp_path, bad):
    t = gptq_tensors(np.random.default_rng(104))
    g = t["g_idx"].astype(np.int64)
    g[3] = bad  # narrowed to int32 it would read as a valid group
    ckpt = open_checkpoint(write_gptq_with_g_idx(tmp_path, t, g))
    for read in (ckpt.load_layer, ckpt.dequantize, ckpt.qmatrix):
        with pytest.raises(CheckpointError) as exc:
            read(LAYER)
        msg = str(exc.value)
        assert f"tensor '{LAYER}.g_idx'" in msg and "[0, 2)" in msg and str(bad) in msg, msg


def test_int64_g_idx_in_range_loads_as_int32(tmp_path):
    t = gptq_tensors(np.random.default_rng(105), act_order=True)
    ckpt = open_checkpoint(write_gptq_with_g_idx(tmp_path, t, t["g_idx"].astype(np.int64)))
    got = ckpt.load_layer(LAYER)
    assert got["g_idx"].dtype == np.int32
    np.testing.assert_array_equal(got["g_idx"], t["g_idx"])
    want = reference.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4, group_size=64)
    np.testing.assert_array_equal(ckpt.dequantize(LAYER), want)


def exl2_tensors(rng):
    w = rng.standard_normal((256, 64)).astype(np.float32)
    return {k: v for k, v in quantize_exl2(w, bits=(6, 4), proportions=(0.5, 0.5)).items() if k != "q_perm"}


def write_exl2(directory, tensors):
    save_file({f"{LAYER}.{k}": v for k, v in tensors.items()}, str(directory / "model.safetensors"))
    return open_checkpoint(directory)


def test_int64_q_invperm_out_of_range_is_refused_before_the_cast(tmp_path):
    e = exl2_tensors(np.random.default_rng(106))
    inv = e["q_invperm"].astype(np.int64)
    bad = int(inv[5]) + 2**32  # narrowed to int32 it would still be a permutation
    inv[5] = bad
    ckpt = write_exl2(tmp_path, {**e, "q_invperm": inv})
    for read in (ckpt.layer_info, ckpt.load_layer, ckpt.qmatrix, ckpt.dequantize):
        with pytest.raises(CheckpointError) as exc:
            read(LAYER)
        msg = str(exc.value)
        assert f"tensor '{LAYER}.q_invperm'" in msg and "not a permutation of 0..255" in msg, msg
        assert f"value {bad} at row 5" in msg, msg


def test_int32_q_groups_width_is_refused_before_the_cast(tmp_path):
    e = exl2_tensors(np.random.default_rng(107))
    qg = e["q_groups"].astype(np.int32)
    qg[0] += 65536  # width 65542: 6 once narrowed to int16
    ckpt = write_exl2(tmp_path, {**e, "q_groups": qg})
    for read in (ckpt.layer_info, ckpt.load_layer, ckpt.qmatrix):
        with pytest.raises(CheckpointError) as exc:
            read(LAYER)
        msg = str(exc.value)
        assert f"tensor '{LAYER}.q_groups'" in msg and "width 65542" in msg, msg


def test_wide_exl2_index_tensors_in_range_load_narrowed(tmp_path):
    e = exl2_tensors(np.random.default_rng(108))
    ckpt = write_exl2(tmp_path, {**e, "q_invperm": e["q_invperm"].astype(np.int64),
                                 "q_groups": e["q_groups"].astype(np.int32)})
    got = ckpt.load_layer(LAYER)
    assert (got["q_invperm"].dtype, got["q_groups"].dtype, got["q_perm"].dtype) == (np.int32, np.int16, np.int32)
    np.testing.assert_array_equal(got["q_invperm"], e["q_invperm"])
    np.testing.assert_array_equal(got["q_groups"], e["q_groups"])
    np.testing.assert_array_equal(got["q_perm"], np.argsort(e["q_invperm"]))
    want = reference.dequantize_exl2(e["q_weight"], e["q_invperm"], e["q_scale"], e["q_scale_max"], e["q_groups"])
    np.testing.assert_array_equal(ckpt.dequantize(LAYER), want)


@pytest.mark.parametrize("bad, row", [(2**32 + 3, 2), (-(2**32) + 3, 6)])
def test_perm_from_invperm_checks_int64_values_before_narrowing(bad, row):
    inv = np.random.default_rng(109).permutation(8).astype(np.int64)
    good = perm_from_invperm(inv)
    assert good.dtype == np.int32
    np.testing.assert_array_equal(good, np.argsort(inv))
    inv[row] = bad
    with pytest.raises(ValueError, match=rf"q_invperm: not a permutation of 0\.\.7: .*value {bad} at row {row}"):
        perm_from_invperm(inv)


# ------------------------------------------------------------------------------------------------
# the shard index
# ------------------------------------------------------------------------------------------------


def sharded(directory, rng):
    save_gptq(directory, {LAYER: gptq_tensors(rng)}, bits=4, group_size=64, desc_act=False, sym=True,
              shard_bytes=3000)
    index = json.loads((directory / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    return index


def test_index_leaving_out_a_tensor_names_the_index_and_the_shard(tmp_path):
    d = tmp_path / "my-model"
    index = sharded(d, np.random.default_rng(110))
    shard = index["weight_map"].pop(f"{LAYER}.scales")
    (d / INDEX_FILE).write_text(json.dumps(index))
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(d)
    msg = str(exc.value)
    assert msg.startswith(str(d / INDEX_FILE)) and f"tensor '{LAYER}.scales'" in msg, msg
    assert "not listed in the index" in msg and f"'{shard}' holds it" in msg, msg
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


@pytest.mark.parametrize("name", ["", ".", ".."])
def test_index_entry_that_is_no_file_name(tmp_path, name):
    d = tmp_path / "my-model"
    index = sharded(d, np.random.default_rng(111))
    index["weight_map"][f"{LAYER}.qweight"] = name
    (d / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(d)
    msg = str(exc.value)
    assert msg.startswith(str(d / INDEX_FILE)) and f"tensor '{LAYER}.qweight'" in msg, msg
    assert f"not a plain file name: {name!r}" in msg, msg


def test_index_copy_choice_is_kept(tmp_path):
    # A tensor stored in two shards is read from the one the index names.
    rng = np.random.default_rng(112)
    t, other = gptq_tensors(rng), gptq_tensors(rng)
    save_file({f"{LAYER}.{k}": v for k, v in t.items()}, str(tmp_path / "a.safetensors"))
    save_file({f"{LAYER}.qweight": other["qweight"]}, str(tmp_path / "b.safetensors"))
    weight_map = {f"{LAYER}.{k}": "a.safetensors" for k in t}
    weight_map[f"{LAYER}.qweight"] = "b.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 64}))
    np.testing.assert_array_equal(open_checkpoint(tmp_path).load_layer(LAYER)["qweight"], other["qweight"])


# ------------------------------------------------------------------------------------------------
# config files that disagree
# ------------------------------------------------------------------------------------------------


def two_gptq_sources(directory, first, second):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 64, **first}))
    (directory / "config.json").write_text(json.dumps(
        {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 64, **second}}))
    return directory


@pytest.mark.parametrize(
    "first, second, listed",
    [
        ({"checkpoint_format": "gptq"}, {"checkpoint_format": "gptq_v2"}, ["checkpoint_format is 'gptq'", "'gptq_v2'"]),
        ({"format": "gptq_v2"}, {"checkpoint_format": "GPTQ"}, ["checkpoint_format is 'gptq_v2'", "'gptq'"]),
        ({"bits": 8}, {}, ["bits is 8", "but 4"]),
        ({"group_size": 128}, {}, ["group_size is 128", "but 64"]),
        ({"desc_act": True}, {"desc_act": False}, ["desc_act is True", "but False"]),
        ({"sym": False}, {"sym": True}, ["sym is False", "but True"]),
        ({"dynamic": {"+:.*": {"bits": 8}}}, {"dynamic": {}}, ["dynamic is {'+:.*': {'bits': 8}}", "but {}"]),
        ({"meta": {"quantizer": ["gptqmodel:1.2.0"]}}, {"meta": {"quantizer": ["cupyq:0.1.0"]}},
         ["v1 zero encoding (meta.quantizer) is 'word'", "but 'field'"]),
        ({"bits": 8, "sym": False, "desc_act": True}, {"sym": True},
         ["bits is 8 in quantize_config.json but 4 in config.json quantization_config",
          "sym is False in quantize_config.json but True in config.json quantization_config"]),
    ],
)
def test_gptq_config_sources_that_disagree(tmp_path, first, second, listed):
    d = two_gptq_sources(tmp_path, first, second)
    with pytest.raises(CheckpointError) as exc:
        read_quant_config(d)
    msg = str(exc.value)
    assert str(d / "quantize_config.json") in msg and str(d / "config.json") in msg, msg
    for fragment in listed:
        assert fragment in msg, msg
    assert "desc_act" not in msg or "desc_act" in first, msg  # only the differing keys are listed


@pytest.mark.parametrize(
    "first, second",
    [
        ({"damp_percent": 0.01, "use_exllama": True}, {"damp_percent": 0.1, "true_sequential": True}),
        ({"checkpoint_format": "gptq", "format": "gptq"}, {}),  # stated in one source only
        ({"desc_act": False}, {"sym": False}),
        ({"meta": {"quantizer": ["gptqmodel:1.2.0"]}}, {"meta": {"quantizer": ["optimum:1.20"]}}),  # one unknown
        ({"checkpoint_format": "gptq_v2", "meta": {"quantizer": ["gptqmodel:1.2.0"]}},
         {"checkpoint_format": "gptq_v2", "meta": {"quantizer": ["cupyq:0.1.0"]}}),  # v1 encoding unused
    ],
)
def test_gptq_config_sources_that_agree(tmp_path, first, second):
    d = two_gptq_sources(tmp_path, first, second)
    qc = read_quant_config(d)
    assert qc.source.name == "quantize_config.json"
    assert (qc.desc_act, qc.sym) == (first.get("desc_act", False), True)  # the first source, as it is


def test_awq_config_sources_that_disagree(tmp_path):
    (tmp_path / "quant_config.json").write_text(json.dumps(
        {"w_bit": 4, "q_group_size": 128, "zero_point": True, "version": "GEMM"}))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": False, "version": "gemm"}}))
    with pytest.raises(CheckpointError) as exc:
        read_quant_config(tmp_path)
    msg = str(exc.value)
    assert str(tmp_path / "quant_config.json") in msg and str(tmp_path / "config.json") in msg, msg
    assert "group_size is 128 in quant_config.json but 64 in config.json quantization_config" in msg, msg
    assert "zero_point is True in quant_config.json but False" in msg and "version" not in msg and "bits" not in msg


def test_config_sources_of_different_methods(tmp_path):
    d = two_gptq_sources(tmp_path, {}, {})
    edit_json(d / "config.json", lambda c: c.update(quantization_config={"quant_method": "awq", "bits": 4,
                                                                         "group_size": 64, "zero_point": True}))
    with pytest.raises(CheckpointError, match="quant_method is 'gptq' in quantize_config.json but 'awq' in config.json"):
        read_quant_config(d)


def test_config_conflict_is_a_cli_input_error(tmp_path, capsys):
    rng = np.random.default_rng(113)
    t = gptq_tensors(rng, sym=False, fmt="gptq_v2")
    d = tmp_path / "ckpt"
    save_gptq(d, {LAYER: t}, bits=4, group_size=64, desc_act=False, sym=False, checkpoint_format="gptq_v2",
              write_format="gptq_v2")
    edit_json(d / "quantize_config.json", lambda c: c.update(format="gptq", checkpoint_format="gptq"))
    code, out, err = run(["inspect", str(d)], capsys)
    assert code == 2 and "Traceback" not in err
    assert "quantize_config.json" in err and "config.json quantization_config" in err and "'gptq_v2'" in err
    # Corrected, it reads as config.json says.
    edit_json(d / "quantize_config.json", lambda c: c.update(format="gptq_v2", checkpoint_format="gptq_v2"))
    want = reference.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4,
                                     checkpoint_format="gptq_v2", group_size=64)
    np.testing.assert_array_equal(open_checkpoint(d).dequantize(LAYER), want)


# ------------------------------------------------------------------------------------------------
# cupyq verify: each checkpoint once
# ------------------------------------------------------------------------------------------------


def table_rows(out, name):
    return [line for line in out.splitlines() if line.startswith(name + " ")]


def test_verify_same_checkpoint_under_several_paths_once(tmp_path, capsys):
    d = saved_gptq(tmp_path / "ckpt", np.random.default_rng(114))
    (tmp_path / "link").symlink_to(d)
    argv = ["verify", str(d), str(d / "model.safetensors"), str(tmp_path / "link"), str(d) + "/", "--cpu", "--m", "1"]
    code, out, err = run(argv, capsys)
    assert code == 0, out
    assert len(table_rows(out, LAYER)) == 1 and out.count(str(d)) == 1, out
    assert "all 1 layers passed" in out
    assert err.count("is the same checkpoint as " + str(d)) == 3, err
    code, out, _ = run(argv + ["--json"], capsys)
    assert [r["checkpoint"] for r in json.loads(out)["layers"]] == [str(d)]


def test_verify_different_files_of_one_directory_apart(tmp_path, capsys):
    rng = np.random.default_rng(115)
    other = "model.layers.1.mlp.up_proj"
    save_file({f"{LAYER}.{k}": v for k, v in gptq_tensors(rng).items()}, str(tmp_path / "a.safetensors"))
    save_file({f"{other}.{k}": v for k, v in gptq_tensors(rng).items()}, str(tmp_path / "b.safetensors"))
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 64}))
    code, out, _ = run(["verify", str(tmp_path), str(tmp_path / "a.safetensors"), "--cpu", "--m", "1"], capsys)
    assert code == 0, out
    whole, single = out.split(str(tmp_path / "a.safetensors") + "\n")
    assert len(table_rows(whole, LAYER)) == 1 and len(table_rows(whole, other)) == 1, out
    assert len(table_rows(single, LAYER)) == 1 and not table_rows(single, other), out
    assert "all 3 layers passed" in out
