"""Saving checkpoints safely: overwrites that leave exactly the new checkpoint and never lose the old one,
input refused at save time when open_checkpoint would refuse it, argument types, file modes, 0-d tensors,
long directory names and the EXL2 ``bits`` setting."""

import errno
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from cupyq.checkpoint import CheckpointError, open_checkpoint, read_quant_config, save_awq, save_exl2, save_gptq
from cupyq.checkpoint import write as write_module
from cupyq.quantize import quantize_awq, quantize_exl2, quantize_gptq

LAYER = "model.layers.0.mlp.down_proj"
GPTQ_KW = dict(bits=4, group_size=32, desc_act=False, sym=True)


# ------------------------------------------------------------------------------------------------ helpers
def weight(seed, k=128, n=64):
    return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)


def gptq(seed, **kw):
    return quantize_gptq(weight(seed), bits=4, group_size=32, **kw)


def snapshot(directory):
    """Every entry of a directory (hidden ones included) with its bytes; folders as None."""
    return {p.name: (p.read_bytes() if p.is_file() else None) for p in sorted(Path(directory).iterdir())}


def old_checkpoint(tmp_path, **kw):
    """A sharded GPTQ checkpoint with a tokenizer file beside it: the one an overwrite replaces."""
    d = save_gptq(tmp_path / "ckpt", {LAYER: gptq(1)}, **GPTQ_KW, shard_bytes=3000, **kw)
    (d / "tokenizer.json").write_text('{"version": 1}')
    return d


def refused_without_trace(tmp_path, fn, exc, match):
    """Call fn(target) for a target under tmp_path; it must raise and leave tmp_path empty."""
    with pytest.raises(exc, match=match):
        fn(tmp_path / "new" / "ckpt")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ stale files
def test_overwrite_with_another_format_leaves_only_the_new_checkpoint(tmp_path):
    d = old_checkpoint(tmp_path)
    assert (d / "quantize_config.json").is_file() and (d / "model.safetensors.index.json").is_file()
    w = weight(2)
    awq = quantize_awq(w, group_size=32)
    save_awq(d, {LAYER: awq}, group_size=32, overwrite=True)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (d / "tokenizer.json").read_text() == '{"version": 1}'
    ckpt = open_checkpoint(d)
    assert ckpt.quant_config.quant_method == "awq" and ckpt.quant_config.source.name == "config.json"
    np.testing.assert_array_equal(ckpt.load_layer(LAYER)["qweight"], awq["qweight"])


def test_overwrite_removes_an_autoawq_quant_config(tmp_path):
    w = weight(3, k=256)
    d = save_awq(tmp_path / "awq", {LAYER: quantize_awq(w, group_size=128)}, group_size=128)
    (d / "quant_config.json").write_text(json.dumps({"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "GEMM"}))
    new = quantize_awq(w, group_size=64)
    save_awq(d, {LAYER: new}, group_size=64, overwrite=True)
    assert not (d / "quant_config.json").exists()
    assert read_quant_config(d).group_size == 64
    ckpt = open_checkpoint(d)
    np.testing.assert_array_equal(ckpt.load_layer(LAYER)["scales"], new["scales"])


def test_save_without_overwrite_refuses_a_stale_quantization_config(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "quant_config.json").write_text('{"w_bit": 4}')
    with pytest.raises(FileExistsError, match="already holds quant_config.json; pass overwrite=True"):
        save_gptq(d, {LAYER: gptq(4)}, **GPTQ_KW)
    assert snapshot(d) == {"quant_config.json": b'{"w_bit": 4}'}


# ------------------------------------------------------------------------------------------------ transaction
def test_overwrite_moves_files_only_within_the_target(tmp_path, monkeypatch):
    """Staged and old files are renamed inside the target directory, so no move crosses filesystems."""
    d = old_checkpoint(tmp_path)
    real = d.resolve()
    moves = []
    original = os.replace

    def recording(src, dst):
        moves.append((Path(src), Path(dst)))
        return original(src, dst)

    monkeypatch.setattr(os, "replace", recording)
    save_gptq(d, {LAYER: gptq(5)}, **GPTQ_KW, overwrite=True)
    assert moves
    for src, dst in moves:
        assert real in src.resolve().parents and real in dst.resolve().parents, (src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def _other_filesystem(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a writable /dev/shm on another filesystem than the temporary directory")
    return shm


def test_overwrite_through_a_link_to_another_filesystem(tmp_path):
    import shutil
    import tempfile

    other = Path(tempfile.mkdtemp(dir=_other_filesystem(tmp_path)))
    try:
        target = other / "ckpt"
        save_gptq(target, {LAYER: gptq(6)}, **GPTQ_KW)
        link = tmp_path / "ckpt"
        os.symlink(target, link)
        new = gptq(7)
        save_gptq(link, {LAYER: new}, **GPTQ_KW, shard_bytes=3000, overwrite=True)
        assert sorted(p.name for p in target.iterdir()) == [
            "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json", "quantize_config.json"]
        np.testing.assert_array_equal(open_checkpoint(link).load_layer(LAYER)["qweight"], new["qweight"])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    finally:
        shutil.rmtree(other)


def _failing_replace(monkeypatch, fail_at, error=None):
    """Make the fail_at-th call of os.replace (counting from 1) raise; the others work."""
    original = os.replace
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == fail_at:
            raise error or OSError(errno.EXDEV, "Invalid cross-device link")
        return original(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_overwrite_counts_its_moves(tmp_path, monkeypatch):
    """5 old files aside (2 shards, index, 2 configs) and 3 new files in: the failure points tested below."""
    d = old_checkpoint(tmp_path)
    calls = _failing_replace(monkeypatch, fail_at=0)
    save_gptq(d, {LAYER: gptq(8)}, **GPTQ_KW, overwrite=True)
    assert len(calls) == 8


@pytest.mark.parametrize("fail_at", range(1, 9))
def test_failed_move_restores_every_old_file(tmp_path, monkeypatch, fail_at):
    d = old_checkpoint(tmp_path)
    before = snapshot(d)
    _failing_replace(monkeypatch, fail_at)
    with pytest.raises(OSError, match="cross-device"):
        save_gptq(d, {LAYER: gptq(9)}, **GPTQ_KW, overwrite=True)
    assert snapshot(d) == before  # byte-identical, nothing added (no staging or aside folder left)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    monkeypatch.undo()
    np.testing.assert_array_equal(open_checkpoint(d).load_layer(LAYER)["qweight"], gptq(1)["qweight"])


def test_failed_shard_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    d = old_checkpoint(tmp_path)
    before = snapshot(d)
    original = write_module._write_safetensors
    written = []

    def write(path, tensors):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        original(path, tensors)

    monkeypatch.setattr(write_module, "_write_safetensors", write)
    with pytest.raises(OSError, match="No space left"):
        save_gptq(d, {LAYER: gptq(10)}, **GPTQ_KW, shard_bytes=3000, overwrite=True)
    assert len(written) == 1
    assert snapshot(d) == before


def test_failed_write_of_a_new_directory_removes_the_folders_it_made(tmp_path, monkeypatch):
    def write(path, tensors):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(write_module, "_write_safetensors", write)
    refused_without_trace(tmp_path, lambda d: save_gptq(d, {LAYER: gptq(11)}, **GPTQ_KW), OSError, "No space left")


def test_failed_restore_says_where_the_old_files_are(tmp_path, monkeypatch):
    """A move back that fails too leaves the old files in the aside folder, which the error names."""
    d = old_checkpoint(tmp_path)
    before = snapshot(d)
    original = os.replace
    calls = []

    def replace(src, dst):
        calls.append(1)
        if len(calls) in (6, 8):  # the first move in (after 5 moves aside), then the second move back
            raise OSError(errno.EIO, "I/O error")
        return original(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="I/O error") as err:
        save_gptq(d, {LAYER: gptq(12)}, **GPTQ_KW, overwrite=True)
    notes = " ".join(getattr(err.value, "__notes__", []))
    aside = [p for p in d.iterdir() if p.name.endswith(".old")]
    assert len(aside) == 1 and str(aside[0]) in notes
    kept = {p.name: p.read_bytes() for p in aside[0].iterdir()} | {
        n: (d / n).read_bytes() for n in before if (d / n).is_file()}
    assert kept == before  # every old file is either back in place or in the aside folder


def test_checkpoint_read_back_into_its_own_directory(tmp_path):
    """An overwrite from tensors just loaded out of the same directory (resharded): same layers and values."""
    d = old_checkpoint(tmp_path)
    ckpt = open_checkpoint(d)
    layer = ckpt.load_layer(LAYER)
    expected = ckpt.dequantize(LAYER)
    save_gptq(d, {LAYER: layer}, **GPTQ_KW, overwrite=True)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "quantize_config.json", "tokenizer.json"]
    np.testing.assert_array_equal(open_checkpoint(d).dequantize(LAYER), expected)


# ------------------------------------------------------------------------------------------------ names, order
def test_long_directory_name(tmp_path):
    name = "n" * 240
    try:
        (tmp_path / name).mkdir()
        (tmp_path / name).rmdir()
    except OSError:
        pytest.skip("the filesystem does not take 240-character names")
    t = gptq(13)
    d = save_gptq(tmp_path / name, {LAYER: t}, **GPTQ_KW)
    save_gptq(d, {LAYER: t}, **GPTQ_KW, shard_bytes=3000, overwrite=True)
    np.testing.assert_array_equal(open_checkpoint(d).load_layer(LAYER)["qzeros"], t["qzeros"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize(
    "config, exc", [({"torch_dtype": np.float32(1)}, TypeError), ({"x": object()}, TypeError), ({"eps": math.nan}, ValueError)]
)
def test_unencodable_config_is_refused_before_anything_is_written(tmp_path, monkeypatch, config, exc):
    def write(path, tensors):
        raise AssertionError("weights written before the config was checked")

    monkeypatch.setattr(write_module, "_write_safetensors", write)
    refused_without_trace(
        tmp_path, lambda d: save_gptq(d, {LAYER: gptq(14)}, **GPTQ_KW, config=config), exc, r"config: cannot be written as JSON"
    )


# ------------------------------------------------------------------------------------------------ what the reader refuses
def _bias_cases():
    w = weight(15)
    short = np.random.default_rng(15).standard_normal(10).astype(np.float16)
    return {
        "gptq": (save_gptq, dict(gptq(15), bias=short), GPTQ_KW),
        "exl2": (save_exl2, dict(quantize_exl2(w, bits=(4,), proportions=(1.0,)), bias=short), {}),
        "awq": (save_awq, dict(quantize_awq(w, group_size=32), bias=short), {"group_size": 32}),
    }


@pytest.mark.parametrize("fmt", ["gptq", "exl2", "awq"])
def test_bias_of_the_wrong_length_is_refused(tmp_path, fmt):
    saver, layer, kw = _bias_cases()[fmt]
    refused_without_trace(tmp_path, lambda d: saver(d, {LAYER: layer}, **kw), CheckpointError, rf"'{LAYER}\.bias'.*got \[?10")


def test_desc_act_layer_without_g_idx_is_refused(tmp_path):
    t = {k: v for k, v in gptq(16).items() if k != "g_idx"}
    refused_without_trace(
        tmp_path,
        lambda d: save_gptq(d, {LAYER: t}, bits=4, group_size=32, desc_act=True, sym=True),
        CheckpointError,
        rf"'{LAYER}\.qweight'.*desc_act.*'{LAYER}\.g_idx'",
    )


@pytest.mark.parametrize(
    "extra_name, match",
    [
        (f"{LAYER}.weight", "has both a plain weight and quantized tensors"),
        (f"{LAYER}.scales", "also a quantized layer tensor"),
        ("other.scales", r"dangling scales"),
        (f"{LAYER}.bias", rf"would be read as part of layer '{LAYER}'; give it in layers"),
    ],
)
def test_extra_tensor_that_collides_with_a_layer_is_refused(tmp_path, extra_name, match):
    t = gptq(17)
    value = np.random.default_rng(17).standard_normal(t["scales"].shape[1] if extra_name.endswith("bias") else (2, 64))
    extra = {extra_name: value.astype(np.float16)}
    refused_without_trace(tmp_path, lambda d: save_gptq(d, {LAYER: t}, **GPTQ_KW, extra_tensors=extra), ValueError, match)


def test_extra_q_perm_beside_an_exl2_layer_is_refused(tmp_path):
    e = quantize_exl2(weight(18), bits=(4,), proportions=(1.0,))
    extra = {f"{LAYER}.q_perm": np.random.default_rng(18).permutation(128).astype(np.int32)}
    refused_without_trace(tmp_path, lambda d: save_exl2(d, {LAYER: e}, extra_tensors=extra), ValueError, "q_perm' would be read")


@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
def test_unsupported_torch_and_numpy_dtypes_are_refused(tmp_path, dtype):
    torch = pytest.importorskip("torch")
    for value in (torch.ones(3, dtype=getattr(torch, dtype)), np.ones(3, dtype=dtype)):
        refused_without_trace(
            tmp_path,
            lambda d: save_gptq(d, {LAYER: gptq(19)}, **GPTQ_KW, extra_tensors={"c": value}),
            TypeError,
            rf"c: dtype {dtype} cannot be stored in safetensors",
        )


def test_torch_dtype_without_a_numpy_counterpart_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("torch without float8")
    value = torch.ones(4).to(torch.float8_e4m3fn)
    refused_without_trace(
        tmp_path,
        lambda d: save_gptq(d, {LAYER: gptq(19)}, **GPTQ_KW, extra_tensors={"f8": value}),
        TypeError,
        r"f8: dtype torch.float8_e4m3fn cannot be stored in safetensors",
    )


def test_mixed_checkpoint_through_extra_tensors_still_saves(tmp_path):
    """Extra tensors may form a layer of their own (an EXL2 layer beside GPTQ ones)."""
    e = quantize_exl2(weight(20), bits=(4,), proportions=(1.0,))
    extra = {f"model.layers.1.mlp.up_proj.{k}": v for k, v in e.items() if k != "q_perm"}
    d = save_gptq(tmp_path / "ckpt", {LAYER: gptq(20)}, **GPTQ_KW, extra_tensors=extra)
    assert {n: i.format for n, i in open_checkpoint(d).layers.items()} == {LAYER: "gptq", "model.layers.1.mlp.up_proj": "exl2"}


# ------------------------------------------------------------------------------------------------ argument types
@pytest.mark.parametrize("arg, value", [("desc_act", "no"), ("sym", "false"), ("desc_act", 0), ("sym", None)])
def test_gptq_flags_must_be_bools(tmp_path, arg, value):
    kw = dict(GPTQ_KW, **{arg: value})
    refused_without_trace(tmp_path, lambda d: save_gptq(d, {LAYER: gptq(21)}, **kw), TypeError, rf"{arg}: expected True or False")


def test_numpy_bools_are_written_as_json_bools(tmp_path):
    d = save_gptq(tmp_path / "ckpt", {LAYER: gptq(22)}, bits=4, group_size=32, desc_act=np.bool_(False), sym=np.bool_(True))
    q = json.loads((d / "quantize_config.json").read_text())
    assert q["desc_act"] is False and q["sym"] is True


def test_overwrite_must_be_a_bool(tmp_path):
    d = old_checkpoint(tmp_path)
    before = snapshot(d)
    with pytest.raises(TypeError, match="overwrite: expected True or False, got str 'yes'"):
        save_gptq(d, {LAYER: gptq(23)}, **GPTQ_KW, overwrite="yes")
    assert snapshot(d) == before


@pytest.mark.parametrize("fmt", ["gptq", "exl2", "awq"])
@pytest.mark.parametrize("arg", ["extra_tensors", "config"])
def test_extra_tensors_and_config_must_be_mappings(tmp_path, fmt, arg):
    w = weight(24)
    saver, layer, kw = {
        "gptq": (save_gptq, gptq(24), GPTQ_KW),
        "exl2": (save_exl2, quantize_exl2(w, bits=(4,), proportions=(1.0,)), {}),
        "awq": (save_awq, quantize_awq(w, group_size=32), {"group_size": 32}),
    }[fmt]
    bad = {arg: [("a", np.ones(3, np.float32))]}
    refused_without_trace(tmp_path, lambda d: saver(d, {LAYER: layer}, **kw, **bad), TypeError, rf"{arg}: expected a dict or None, got list")


# ------------------------------------------------------------------------------------------------ tensors and files
def test_scalar_and_strided_extra_tensors_keep_their_shape_and_values(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(25)
    grid = rng.standard_normal((6, 8)).astype(np.float32)
    value = np.float32(rng.standard_normal())
    extra = {
        "np_scalar": np.array(value),
        "torch_scalar": torch.tensor(int(rng.integers(1, 100))),
        "strided": grid[::2, 1::3],
    }
    d = save_gptq(tmp_path / "ckpt", {LAYER: gptq(25)}, **GPTQ_KW, extra_tensors=extra)
    ckpt = open_checkpoint(d)
    assert ckpt.tensors["np_scalar"].shape == () and ckpt.tensors["torch_scalar"].shape == ()
    assert ckpt.load_tensor("np_scalar") == value
    assert ckpt.load_tensor("torch_scalar") == extra["torch_scalar"].item()
    np.testing.assert_array_equal(ckpt.load_tensor("strided"), grid[::2, 1::3])


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_every_file_gets_the_mode_of_a_new_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        d = save_gptq(tmp_path / "ckpt", {LAYER: gptq(26)}, **GPTQ_KW, shard_bytes=3000)
        save_exl2(tmp_path / "exl2", {LAYER: quantize_exl2(weight(26), bits=(4,), proportions=(1.0,))})
    finally:
        os.umask(old)
    files = sorted(d.iterdir()) + sorted((tmp_path / "exl2").iterdir())
    assert any(p.suffix == ".safetensors" for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p.name


# ------------------------------------------------------------------------------------------------ EXL2 bits
@pytest.mark.parametrize(
    "bits, exc",
    [
        (math.nan, ValueError), (math.inf, ValueError), (-3, ValueError), (1.5, ValueError), (9, ValueError),
        ("4.5", TypeError), ("abc", TypeError), (True, TypeError), ([4], TypeError),
    ],
)
def test_exl2_bits_must_be_a_number_of_bits_per_weight(tmp_path, bits, exc):
    e = quantize_exl2(weight(27), bits=(4,), proportions=(1.0,))
    refused_without_trace(tmp_path, lambda d: save_exl2(d, {LAYER: e}, bits=bits), exc, r"bits: expected")


@pytest.mark.parametrize("bits, recorded", [(4.65, 4.65), (np.float32(3.5), 3.5), (2, 2.0), (8, 8.0), (None, 4.125)])
def test_exl2_bits_recorded_as_strict_json(tmp_path, bits, recorded):
    e = quantize_exl2(weight(28), bits=(4,), proportions=(1.0,))
    d = save_exl2(tmp_path / "ckpt", {LAYER: e}, bits=bits)

    def no_constants(token):
        raise AssertionError(f"non-JSON token {token}")

    qcfg = json.loads((d / "config.json").read_text(), parse_constant=no_constants)["quantization_config"]
    if bits is None:  # the measured average: packed rows * 32 / rows
        recorded = round(e["q_weight"].shape[0] * 32 / e["q_invperm"].shape[0], 3)
    assert qcfg["bits"] == pytest.approx(recorded)


@pytest.mark.gpu
def test_exl2_save_of_cupy_arrays_matches_numpy(tmp_path):
    cupy = pytest.importorskip("cupy")
    e = quantize_exl2(weight(29), bits=(6, 4), proportions=(0.5, 0.5))
    host = save_exl2(tmp_path / "host", {LAYER: e})
    device = save_exl2(tmp_path / "device", {LAYER: {k: cupy.asarray(v) for k, v in e.items()}})
    assert (host / "config.json").read_text() == (device / "config.json").read_text()
    assert (host / "model.safetensors").read_bytes() == (device / "model.safetensors").read_bytes()
    reference = open_checkpoint(host).dequantize(LAYER)
    np.testing.assert_array_equal(open_checkpoint(device).dequantize(LAYER), reference)
