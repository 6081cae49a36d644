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
