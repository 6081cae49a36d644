"""``cupyq inspect DIR --explain`` and cupyq.explain: the kernel each layer gets per batch size, worked out on
the CPU, against choose_kernel on fakes whose layout sizes the tests derive from the groups themselves."""

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from cupyq import cli, device, explain, layout, rules, runtime
from cupyq.checkpoint import open_checkpoint, save_gptq
from cupyq.quantize import quantize_exl2, quantize_gptq
from cupyq.sample import make_sample

CTYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16"}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return make_sample(tmp_path_factory.mktemp("sample"), seed=5)


@pytest.fixture(scope="module")
def gptq8(tmp_path_factory):
    """An 8-bit GPTQ layer (one storage width, bytes) with act-order and a bias, plus an fp16 head."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((512, 160)).astype(np.float32) * 0.05
    q = quantize_gptq(w, bits=8, group_size=64, act_order=True, importance=rng.random(512))
    extra = {"lm_head.weight": rng.standard_normal((32, 512)).astype(np.float16)}
    return save_gptq(tmp_path_factory.mktemp("g8") / "ckpt", {"model.layers.0.mlp.down_proj": q}, bits=8,
                     group_size=64, desc_act=True, sym=True, extra_tensors=extra)


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """Sizes that need padding: K = 200 (GPTQ groups of 48, the last of 8 rows; EXL2 with 6- and 3-bit groups), N
    = 72 columns (80 padded), in one directory with an fp16 head."""
    rng = np.random.default_rng(12)
    w = rng.standard_normal((200, 72)).astype(np.float32) * 0.05
    q = quantize_gptq(w, bits=4, group_size=48, act_order=True, importance=rng.random(200))
    exl2 = quantize_exl2(w, bits=(6, 3), proportions=(0.3, 0.7), importance=rng.random(200), seed=3)
    extra = {f"model.layers.0.mlp.down_proj.{k}": v for k, v in exl2.items()}
    extra["lm_head.weight"] = rng.standard_normal((32, 200)).astype(np.float16)
    return save_gptq(tmp_path_factory.mktemp("odd") / "ckpt", {"model.layers.0.mlp.up_proj": q}, bits=4,
                     group_size=48, desc_act=True, sym=True, extra_tensors=extra)


@pytest.fixture
def no_device(monkeypatch):
    """Fail the test when anything asks a device (CuPy cannot be imported) or compiles a kernel."""

    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was compiled")

    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(runtime, "get_function", refuse)


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------- the test's own layout sizes


def _runs(ckpt, name):
    """(rows, bits) of each run of equal group in sorted row order, read from the checkpoint tensors directly:
    GPTQ g_idx counts per group (a stable sort makes each group one run); EXL2 q_groups pairs (bits, first
    packed row), a group holding its packed rows * 32 / bits rows, the last one what is left of K; AWQ groups of
    group_size consecutive rows."""
    info = ckpt.layer_info(name)
    if info.format == "awq":
        return [(info.group_size, 4)] * (info.in_features // info.group_size)
    if info.format == "gptq":
        g_idx = ckpt.load_tensor(name + ".g_idx").astype(np.int64)
        return [(int(c), info.bits[0]) for c in np.bincount(g_idx) if c]
    qg = ckpt.load_tensor(name + ".q_groups").astype(np.int64).reshape(-1, 2)
    qrows = ckpt.tensors[name + ".q_weight"].shape[0]
    ends = list(qg[1:, 1]) + [qrows]
    rows = [int((end - start) * 32 // bits) for (bits, start), end in zip(qg, ends)]
    rows[-1] = info.in_features - sum(rows[:-1])
    return list(zip(rows, (int(b) for b in qg[:, 0])))


def _fake(ckpt, name):
    """A QMatrix-like object with the layout sizes of the layer: every run padded to 16 rows, each storage
    segment (5-8-bit widths in bytes first, then 2-4-bit in nibbles) to 256 rows with tiles of its last group,
    columns to 16."""
    info = ckpt.layer_info(name)
    runs = list(enumerate(_runs(ckpt, name)))
    tiles, padded = [], {}
    for wide in (True, False):
        segment = [(group, rows) for group, (rows, bits) in runs if (bits > 4) == wide]
        seg_tiles = [group for group, rows in segment for _ in range(-(-rows // 16))]
        fill = -len(seg_tiles) % 16  # 16 tiles of 16 rows: one 256-row step
        tiles += seg_tiles + seg_tiles[-1:] * fill
        padded[wide] = 16 * (len(seg_tiles) + fill)
    padded8, padded4 = padded[True], padded[False]
    lay = SimpleNamespace(chunks8=padded8 // 64, chunks4=padded4 // 64, padded_rows=padded8 + padded4,
                          padded_cols=-(-info.out_features // 16) * 16, tile_group=np.asarray(tiles, np.int32))
    return SimpleNamespace(in_features=info.in_features, out_features=info.out_features, layout=lay, device_id=0,
                           _plans={})


def _choose(monkeypatch, fake, m, dtype, cc):
    """choose_kernel on the fake with the device said to be of compute capability cc."""
    with monkeypatch.context() as mp:
        mp.setattr(rules, "device_compute_capability", lambda device_id: cc)
        return rules.choose_kernel(fake, m, CTYPES[dtype])


# ------------------------------------------------------------------------------------------------ library


@pytest.mark.parametrize("recipe", ["gptq-4bit-g128-act", "gptq-3bit-g64-asym-v2", "exl2-mixed", "awq-4bit-g128",
                                    "odd", "gptq8"])
def test_layer_shape_matches_the_layout_built_with_numpy(request, sample, recipe):
    """layer_shape (row plan only) gives the sizes build_layout gives the same rows with xp=numpy."""
    ckpt = open_checkpoint(request.getfixturevalue(recipe) if recipe in ("odd", "gptq8") else sample[recipe])
    rng = np.random.default_rng(1)
    for name in ckpt.quantized_layers:
        shape = explain.layer_shape(ckpt, name)
        k, n = shape.in_features, shape.out_features
        info = ckpt.layer_info(name)
        if info.format == "exl2":
            from cupyq.formats import exl2 as fx

            groups = fx.parse_q_groups(ckpt.load_tensor(name + ".q_groups"),
                                       ckpt.tensors[name + ".q_weight"].shape[0], k)
            row_group, storage8 = layout.exl2_rows(groups)
            perm = None
        else:
            g_idx = ckpt.load_layer(name)["g_idx"] if info.format == "gptq" else np.arange(k) // info.group_size
            perm, row_group, storage8 = layout.gptq_rows(g_idx, info.bits[0])
        g = int(row_group.max()) + 1
        built = layout.build_layout(rng.integers(0, 16, (k, n), dtype=np.uint8), perm, row_group, storage8,
                                    rng.random((g, n)).astype(np.float32) + 0.5, rng.integers(0, 16, (g, n)), np)
        for field in ("in_features", "out_features", "padded_rows", "padded_cols", "chunks8", "chunks4"):
            assert getattr(shape, field) == getattr(built, field), (name, field)
        np.testing.assert_array_equal(shape.tile_group, built.tile_group)
        fake = _fake(ckpt, name).layout
        assert (shape.chunks8, shape.chunks4, shape.padded_rows, shape.padded_cols) == (
            fake.chunks8, fake.chunks4, fake.padded_rows, fake.padded_cols), name
        np.testing.assert_array_equal(shape.tile_group, fake.tile_group)


@pytest.mark.parametrize("k,n,chunks8", [(4096, 4096, 0), (8192, 28672, 0), (8192, 28672, 32), (1024, 2048, 16)])
@pytest.mark.parametrize("cc", [(8, 0), (8, 6), (8, 9), (9, 0)])
def test_rules_explain_is_choose_kernel_on_that_architecture(monkeypatch, k, n, chunks8, cc):
    lay = SimpleNamespace(chunks8=chunks8, chunks4=k // 64 - chunks8, padded_cols=n, padded_rows=k,
                          tile_group=np.repeat(np.arange(k // 128), 8))
    qm = SimpleNamespace(in_features=k, out_features=n, layout=lay, device_id=0, _plans={})
    for ctype in CTYPES.values():
        for m in (1, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129, 256, 257, 1024):
            with monkeypatch.context() as mp:
                mp.setattr(rules, "device_compute_capability", lambda device_id: cc)
                want = rules.choose_kernel(qm, m, ctype)
                forced = rules.choose_kernel(qm, m, ctype, force_cuda=True)
            with monkeypatch.context() as mp:
                mp.setitem(sys.modules, "cupy", None)  # no device can be asked
                assert rules.explain(qm, m, ctype, cc) == want, (m, ctype)
                assert rules.explain(qm, m, ctype, cc, force_cuda=True) == forced
    assert set(qm._plans) <= {"chunk_uniform"}  # no plan is made: only the rules' own cached layout fact


def test_parse_arch():
    assert explain.parse_arch("sm_80") == (8, 0)
    assert explain.parse_arch("86") == (8, 6)
    assert explain.parse_arch("sm_120") == (12, 0)
    assert explain.arch_name((8, 9)) == "sm_89"
    for bad in ("sm_75", "sm_9", "gpu", "sm_90a", ""):
        with pytest.raises(ValueError, match="sm_80"):
            explain.parse_arch(bad)


def test_architecture_key_answers_without_a_device(no_device):
    assert device.compute_capability(device.architecture_key((8, 9))) == (8, 9)
    assert device.compute_capability(device.architecture_key(explain.parse_arch("sm_90"))) == (9, 0)
    with pytest.raises(ImportError):
        device.compute_capability(97)  # a device id would ask CuPy (never cached: no such device), which is blocked


# ------------------------------------------------------------------------------------------ command line


def _explained(capsys, path, *options):
    code, out, err = run(["inspect", str(path), "--explain", "--json", *options], capsys)
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("arch,cc", [("sm_80", (8, 0)), ("sm_90", (9, 0))])
@pytest.mark.parametrize("recipe", ["gptq-4bit-g128-act", "exl2-mixed", "odd"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_explain_json_agrees_with_choose_kernel(request, sample, capsys, monkeypatch, no_device, recipe, arch, cc,
                                                dtype):
    ms = [1, 9, 16, 17, 64, 65, 128, 129, 256, 1024]
    path = request.getfixturevalue("odd") if recipe == "odd" else sample[recipe]
    report = _explained(capsys, path, "--arch", arch, "--m", ",".join(map(str, ms)), "--dtype", dtype)
    ckpt = open_checkpoint(path)
    assert report["arch"] == arch and report["compute_capability"] == list(cc) and report["arch_source"] == "option"
    assert report["dtype"] == dtype and report["m"] == ms
    assert [lay["name"] for lay in report["layers"]] == ckpt.quantized_layers
    assert report["dense_layers"] == ["lm_head"]
    for lay in report["layers"]:
        fake = _fake(ckpt, lay["name"])
        assert (lay["chunks8"], lay["chunks4"]) == (fake.layout.chunks8, fake.layout.chunks4)
        got = [(e["m"], e["kernel"], e["reason"]) for e in lay["kernels"]]
        want = [(m, *_choose(monkeypatch, fake, m, dtype, cc)) for m in ms]
        assert got == want, lay["name"]


def _kernels(report, name):
    lay = next(lay for lay in report["layers"] if lay["name"] == name)
    return {e["m"]: e["kernel"] for e in lay["kernels"]}


def test_explain_picks_the_expected_kernels(sample, gptq8, capsys, no_device):
    """The rules spelled out for the sample layers (all below 32 M weights)."""
    ms = "1,16,64,128,256,1024"
    gptq = sample["gptq-4bit-g128-act"]
    sm80 = _explained(capsys, gptq, "--arch", "sm_80", "--m", ms)
    sm90 = _explained(capsys, gptq, "--arch", "sm_90", "--m", ms)
    q = "model.layers.0.self_attn.q_proj"
    assert _kernels(sm80, q) == {1: "qgemv", 16: "qgemv2", 64: "qmma", 128: "dense", 256: "dense", 1024: "dense"}
    assert _kernels(sm90, q) == {1: "qgemv", 16: "qgemv2", 64: "qwgmma", 128: "qwgmma", 256: "dense", 1024: "dense"}
    bf16 = _explained(capsys, gptq, "--arch", "sm_80", "--m", "16", "--dtype", "bfloat16")
    assert _kernels(bf16, q) == {16: "qmma"}  # two m8 tiles only for fp16

    exl2 = sample["exl2-mixed"]
    mixed = _explained(capsys, exl2, "--arch", "sm_90", "--m", ms)
    both = "model.layers.0.self_attn.q_proj"  # 8-bit and 4-bit storage: qwgmma, no two-tile qgemv
    assert _kernels(mixed, both) == {1: "qgemv", 16: "qwgmma", 64: "qwgmma", 128: "qwgmma", 256: "dense",
                                     1024: "dense"}
    low = "model.layers.0.mlp.down_proj"  # 4, 3 and 2 bits: all in 4-bit storage
    assert _kernels(mixed, low) == {1: "qgemv", 16: "qgemv2", 64: "qwgmma", 128: "qwgmma", 256: "dense",
                                    1024: "dense"}
    lay = next(lay for lay in mixed["layers"] if lay["name"] == both)
    assert lay["chunks8"] > 0 and lay["chunks4"] > 0
    reason = next(e["reason"] for e in lay["kernels"] if e["m"] == 1024)
    assert reason.startswith("m > 128: dequantise")

    bytes8 = _explained(capsys, gptq8, "--arch", "sm_90", "--m", "16,64")
    name = "model.layers.0.mlp.down_proj"
    assert _kernels(bytes8, name) == {16: "qwgmma", 64: "qwgmma"}  # one storage width (bytes): qwgmma on sm_90
    assert bytes8["layers"][0]["chunks4"] == 0 and bytes8["layers"][0]["chunks8"] == 512 // 64


def test_explain_table(sample, capsys, no_device):
    code, out, err = run(["inspect", str(sample["exl2-mixed"]), "--explain", "--arch", "sm_90", "--m", "1,64"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert "float16 activations on sm_90" in lines[0]
    assert lines[1].split() == ["layer", "in", "x", "out", "format/bits", "m=1", "m=64"]
    row = next(line for line in lines if line.startswith("model.layers.0.self_attn.q_proj"))
    assert "1024 x 1024" in row and "exl2 8+4" in row and "qgemv [" in row and "qwgmma [" in row
    notes = {line.split("]", 1)[0] + "]": line for line in lines if line.startswith("[")}
    number = row.split("qwgmma ")[1].split()[0]
    assert "m = 64 on sm_90: qwgmma with 32x128 tiles, stages of 4 chunks" in notes[number]
    assert any(line.startswith("note: 1 plain layer") and "lm_head" in line for line in lines)


def test_explain_default_arch_without_a_gpu(sample, capsys, monkeypatch, no_device):
    monkeypatch.setattr(device, "gpu_unavailable_reason", lambda: "no CUDA device is visible")
    report = _explained(capsys, sample["gptq-3bit-g64-asym-v2"], "--m", "64")
    assert report["arch"] == "sm_90" and report["arch_source"] == "default"
    assert any("no GPU visible" in n and "sm_90" in n for n in report["notes"])
    code, out, _ = run(["inspect", str(sample["gptq-3bit-g64-asym-v2"]), "--explain"], capsys)
    assert code == 0 and "note: no GPU visible, so sm_90 is assumed" in out
    assert "m=1" in out and "m=1024" in out  # the default batch sizes 1, 16, 64, 256, 1024


def test_explain_default_arch_is_the_current_gpus(sample, capsys, monkeypatch, no_device):
    from cupyq.cli import explain as cli_explain

    monkeypatch.setattr(device, "gpu_unavailable_reason", lambda: None)
    monkeypatch.setattr(device, "compute_capability", lambda device_id: {2: (8, 6)}[device_id])
    monkeypatch.setattr(cli_explain, "_current_device", lambda: 2)
    report = _explained(capsys, sample["gptq-3bit-g64-asym-v2"], "--m", "64")
    assert report["arch"] == "sm_86" and report["arch_source"] == "gpu" and report["notes"] == [
        "1 plain layer(s) stay dense and are not listed: lm_head"]
    assert {e["kernel"] for lay in report["layers"] for e in lay["kernels"]} == {"qmma"}


@pytest.mark.parametrize("options,message", [
    (["--arch", "sm_75"], "older than sm_80"),
    (["--arch", "hopper"], "expected an architecture such as sm_80"),
    (["--m", "0"], "positive integers"),
    (["--m", "1,,4"], "positive integers"),
    (["--m", "16,x"], "positive integers"),
    (["--dtype", "float32"], "invalid choice"),
])
def test_explain_bad_options_exit_2(sample, capsys, options, message):
    path = str(sample["gptq-3bit-g64-asym-v2"])
    code, out, err = run(["inspect", path, "--explain", *options], capsys)
    assert code == 2 and message in err and out == ""
    code, out, _ = run(["inspect", path, "--explain", "--json", *options], capsys)
    assert code == 2 and message in json.loads(out)["error"]


def test_explain_options_need_explain(sample, capsys):
    code, out, err = run(["inspect", str(sample["exl2-mixed"]), "--arch", "sm_80", "--m", "4"], capsys)
    assert code == 2 and "--arch, --m: only with --explain" in err


def test_explain_missing_checkpoint_exits_2(tmp_path, capsys):
    code, _, err = run(["inspect", str(tmp_path / "absent"), "--explain", "--arch", "sm_90"], capsys)
    assert code == 2 and "absent" in err


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["gptq-4bit-g128-act", "gptq-3bit-g64-asym-v2", "exl2-mixed", "awq-4bit-g128"])
def test_explain_matches_the_gpu_matrices(sample, recipe):
    """On a GPU: the CPU-side layout sizes are those of the QMatrix built on the device, and the explanation for
    the device's architecture is what choose_kernel says for that matrix."""
    ckpt = open_checkpoint(sample[recipe])
    cc = device.compute_capability(0)
    for name in ckpt.quantized_layers:
        qm = ckpt.qmatrix(name, device=0)
        shape = explain.layer_shape(ckpt, name)
        for field in ("in_features", "out_features", "padded_rows", "padded_cols", "chunks8", "chunks4"):
            assert getattr(shape, field) == getattr(qm.layout, field), (name, field)
        np.testing.assert_array_equal(shape.tile_group, qm.layout.tile_group.get())
        ms = (1, 9, 16, 17, 64, 65, 128, 129, 256, 1024)
        for dtype in explain.DTYPES:
            for m, kernel, reason in explain.explain_layer(shape, ms, dtype, cc):
                assert (kernel, reason) == rules.choose_kernel(qm, m, CTYPES[dtype]), (name, m, dtype)
