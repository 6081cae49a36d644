"""patch_model on a small Llama-shaped torch module (CPU reference path; a GPU variant for the device)."""

import io
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from cupyq import torch_ops  # noqa: E402
from cupyq.checkpoint import CheckpointError, open_checkpoint, save_exl2, save_gptq  # noqa: E402
from cupyq.model import patch_model  # noqa: E402
from cupyq.quantize import quantize_exl2, quantize_gptq  # noqa: E402
from cupyq.torch_ops import QuantizedLinear  # noqa: E402

VOCAB, HIDDEN, MLP = 64, 128, 256
LINEARS = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(HIDDEN, MLP, bias=True)
        self.mlp.down_proj = nn.Linear(MLP, HIDDEN, bias=False)
        self.norm = nn.Parameter(torch.ones(HIDDEN))

    def forward(self, h):
        h = h + self.self_attn.q_proj(h)
        h = h + self.mlp.down_proj(torch.relu(self.mlp.up_proj(h)))
        return h * self.norm


class Tiny(nn.Module):
    """Module names as in Hugging Face Llama checkpoints."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.model.layers = nn.ModuleList([Block()])
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids):
        return self.lm_head(self.model.layers[0](self.model.embed_tokens(ids)))


def _modules(model):
    return dict(model.named_modules())


def _extras(source):
    return {
        "model.embed_tokens.weight": source.model.embed_tokens.weight.detach().numpy().astype(np.float16),
        "model.layers.0.norm": (1 + 0.1 * torch.randn(HIDDEN)).numpy().astype(np.float16),
        "lm_head.weight": source.lm_head.weight.detach().numpy().astype(np.float16),
    }


def _quantize(source, kind):
    layers = {}
    for name in LINEARS:
        lin = _modules(source)[name]
        w = lin.weight.detach().numpy().T  # nn.Linear is [out, in]; checkpoints are [in, out]
        bias = None if lin.bias is None else lin.bias.detach().numpy()
        if kind == "gptq":
            layers[name] = quantize_gptq(w, bits=4, group_size=32, act_order=True, bias=bias)
        else:
            layers[name] = quantize_exl2(w, bits=(6, 4), proportions=(0.5, 0.5), bias=bias)
    return layers


def _write(tmp_path, kind, seed=0):
    source = Tiny(seed)
    layers, extras = _quantize(source, kind), _extras(source)
    if kind == "gptq":
        save_gptq(tmp_path, layers, bits=4, group_size=32, desc_act=True, sym=True, extra_tensors=extras)
    else:
        save_exl2(tmp_path, layers, extra_tensors=extras)
    return tmp_path


def _dense_twin(ckpt_dir):
    """The same model with every weight taken from the checkpoint, quantized ones dequantised (float32)."""
    ckpt = open_checkpoint(ckpt_dir)
    model = Tiny(123)
    with torch.no_grad():
        for name in ckpt.quantized_layers:
            lin = _modules(model)[name]
            lin.weight.copy_(torch.from_numpy(ckpt.dequantize(name).T.copy()))
            bias = ckpt.load_layer(name).get("bias")
            if lin.bias is not None:
                lin.bias.copy_(torch.zeros(lin.out_features) if bias is None else torch.from_numpy(bias.astype(np.float32)))
        state = model.state_dict()
        for t in ckpt.extra_tensor_names():
            state[t].copy_(torch.from_numpy(ckpt.load_tensor(t).astype(np.float32)))
    return model


@pytest.mark.parametrize("kind", ["gptq", "exl2"])
def test_patch_model_cpu_matches_dequantised_model(tmp_path, kind):
    ckpt_dir = _write(tmp_path, kind)
    model = Tiny(7)  # different random init: everything must come from the checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "no GPU kernel ran"
        out = patch_model(model, ckpt_dir, device="cpu")
        assert out is model
        for name in LINEARS:
            m = _modules(model)[name]
            assert isinstance(m, QuantizedLinear) and not m.qmatrix.is_cuda and m.qmatrix.format == kind
        assert isinstance(model.lm_head, nn.Linear)  # an fp16 head stays a plain Linear, loaded
        ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got = model(ids)
            ref = _dense_twin(ckpt_dir)(ids)
    assert got.dtype == torch.float32 and got.shape == (2, 9, VOCAB)
    # Both sides are float32 with identical weights; only summation order differs.
    rel = (got - ref).norm() / ref.norm()
    print(f"patch_model {kind} CPU: max |logit diff| {(got - ref).abs().max():.3g}, relative {rel:.3g}")
    assert rel < 1e-5


def test_default_device_follows_the_model(tmp_path):
    ckpt_dir = _write(tmp_path, "gptq")
    model = patch_model(Tiny(1), ckpt_dir)
    assert all(not _modules(model)[n].qmatrix.is_cuda for n in LINEARS)


def test_layouts_transposed_correctly(tmp_path):
    """A non-square layer proves the [out, in] vs [in, out] bookkeeping: up_proj is 128 -> 256."""
    ckpt_dir = _write(tmp_path, "gptq")
    model = patch_model(Tiny(1), ckpt_dir, device="cpu")
    up = model.model.layers[0].mlp.up_proj
    assert (up.in_features, up.out_features) == (HIDDEN, MLP)
    x = torch.randn(3, HIDDEN)
    ckpt = open_checkpoint(ckpt_dir)
    w = torch.from_numpy(ckpt.dequantize("model.layers.0.mlp.up_proj"))
    b = torch.from_numpy(ckpt.load_layer("model.layers.0.mlp.up_proj")["bias"].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.testing.assert_close(up(x), x @ w + b, rtol=1e-5, atol=1e-5)


def test_loaded_extras_cast_to_model_dtype(tmp_path):
    ckpt_dir = _write(tmp_path, "gptq")
    model = patch_model(Tiny(1), ckpt_dir, device="cpu")
    stored = torch.from_numpy(open_checkpoint(ckpt_dir).load_tensor("lm_head.weight"))
    assert model.lm_head.weight.dtype == torch.float32
    assert torch.equal(model.lm_head.weight, stored.float())


def test_missing_linear_is_an_error_and_model_untouched(tmp_path):
    ckpt_dir = _write(tmp_path, "gptq")
    model = Tiny(1)
    del model.model.layers[0].mlp.up_proj
    model.model.layers[0].mlp.up_proj = nn.Identity()
    before = model.lm_head.weight.clone()
    with pytest.raises(ValueError, match=r"quantized layer\(s\) match no torch.nn.Linear.*'model.layers.0.mlp.up_proj'"):
        patch_model(model, ckpt_dir)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert torch.equal(model.lm_head.weight, before)


def test_feature_mismatch_is_an_error(tmp_path):
    ckpt_dir = _write(tmp_path, "exl2")
    model = Tiny(1)
    model.model.layers[0].mlp.up_proj = nn.Linear(HIDDEN, MLP // 2)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj' is exl2 with in_features=128, out_features=256, "
                                         r"but the model's Linear has in_features=128, out_features=128"):
        patch_model(model, ckpt_dir)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)


def test_extra_tensor_shape_mismatch_is_an_error(tmp_path):
    ckpt_dir = _write(tmp_path, "gptq")
    model = Tiny(1)
    model.lm_head = nn.Linear(HIDDEN, VOCAB + 1, bias=False)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'lm_head.weight' has shape \[64, 128\], "
                                         r"but the model's lm_head.weight has shape \[65, 128\]"):
        patch_model(model, ckpt_dir)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)


def test_warns_about_unused_and_untouched_tensors(tmp_path):
    source = Tiny(0)
    extras = {"model.embed_tokens.weight": _extras(source)["model.embed_tokens.weight"],
              "rotary.inv_freq": np.ones(8, np.float32)}
    save_gptq(tmp_path, _quantize(source, "gptq"), bits=4, group_size=32, desc_act=True, sym=True, extra_tensors=extras)
    with pytest.warns(UserWarning) as record:
        patch_model(Tiny(1), tmp_path)
    messages = [str(w.message) for w in record]
    assert any("not used by the model: rotary.inv_freq" in m for m in messages)
    assert any("not in the checkpoint keep their values" in m and "lm_head.weight" in m for m in messages)


def test_patching_a_patched_model_says_so_and_changes_nothing(tmp_path):
    ckpt_dir = _write(tmp_path, "gptq")
    model = _quiet(patch_model, Tiny(1), ckpt_dir, device="cpu")
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"3 quantized layer\(s\) are already cupyq QuantizedLinear modules \(the model "
                                         r"was patched before\): 'model.layers.0.mlp.down_proj', "):
        patch_model(model, ckpt_dir, device="cpu")
    _assert_as_before(model, snapshot)


def _write_layers(directory, source, names, kind="gptq", bias=True):
    """A checkpoint of the layers ``names`` of ``source`` only (with their biases when ``bias``)."""
    layers = {n: v for n, v in _quantize(source, kind).items() if n in names}
    if not bias:
        layers = {n: {k: a for k, a in t.items() if k != "bias"} for n, t in layers.items()}
    save_gptq(directory, layers, bits=4, group_size=32, desc_act=True, sym=True)
    return directory


def test_a_model_bias_the_checkpoint_lacks_is_dropped_with_a_warning(tmp_path):
    source = Tiny(0)
    ckpt_dir = _write_layers(tmp_path, source, LINEARS, bias=False)
    model = Tiny(1)
    assert model.model.layers[0].mlp.up_proj.bias is not None
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        patch_model(model, ckpt_dir, device="cpu")
    dropped = [str(w.message) for w in record if "dropped" in str(w.message)]
    assert len(dropped) == 1 and "1 model bias(es) dropped" in dropped[0]
    assert dropped[0].endswith(": model.layers.0.mlp.up_proj.bias")
    up = model.model.layers[0].mlp.up_proj
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(2))
    w = open_checkpoint(ckpt_dir).dequantize("model.layers.0.mlp.up_proj")
    with torch.no_grad():
        y = _quiet(up, x)
    np.testing.assert_allclose(y.numpy(), x.numpy() @ w, rtol=1e-5, atol=1e-5)  # x @ W, as the checkpoint says


def test_a_checkpoint_bias_gives_no_dropped_bias_warning(tmp_path):
    ckpt_dir = _write(tmp_path, "gptq")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        patch_model(Tiny(1), ckpt_dir, device="cpu")
    assert not [w for w in record if "dropped" in str(w.message)]


@pytest.fixture
def state_dict_warning_not_given(monkeypatch):
    """The once-per-process state_dict warning as in a process that has not given it yet."""
    monkeypatch.setattr(torch_ops, "_warned_weights_left_out", False)


def test_state_dict_of_a_patched_model_warns_once_that_quantized_weights_are_left_out(
        tmp_path, state_dict_warning_not_given):
    model = _quiet(patch_model, Tiny(1), _write(tmp_path, "gptq"), device="cpu")
    with pytest.warns(UserWarning, match=r"state_dict\(\): 'model.layers.0.self_attn.q_proj' is a cupyq QuantizedLinear.*"
                                         r"leaves them out.*cupyq.checkpoint.save_gptq / save_exl2 / save_awq"):
        state = model.state_dict()
    assert not any(k.startswith("model.layers.0.self_attn.q_proj") for k in state)
    assert "model.layers.0.mlp.up_proj.bias" not in state and "lm_head.weight" in state
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = model.state_dict()  # once per process
        model.load_state_dict(again)  # the round trip into the patched model still works
        torch.save(model.state_dict(), io.BytesIO())


def test_patch_model_reads_a_partly_patched_state_dict_without_the_warning(tmp_path, state_dict_warning_not_given):
    source = Tiny(0)
    first = _write_layers(tmp_path / "a", source, LINEARS[:1])
    second = _write_layers(tmp_path / "b", source, LINEARS[1:])
    model = _quiet(patch_model, Tiny(1), first, device="cpu")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        patch_model(model, second, device="cpu")
        model.state_dict(keep_vars=True)
    assert not [w for w in record if "state_dict()" in str(w.message)]
    assert all(isinstance(_modules(model)[n], QuantizedLinear) for n in LINEARS)
    with pytest.warns(UserWarning, match="state_dict"):  # not used up by the calls above
        model.state_dict()


def test_a_patched_cpu_model_pickles(tmp_path):
    ckpt_dir = _write(tmp_path, "exl2")
    model = _quiet(patch_model, Tiny(1), ckpt_dir, device="cpu")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    back = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = _quiet(model, ids)
        del model
        assert torch.equal(_quiet(back, ids), expected)
    layer = _modules(back)[LINEARS[0]]
    assert torch_ops.lookup_qmatrix(layer.handle) is layer.qmatrix


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def _snapshot(model):
    """Every module object of the model and a copy of every tensor."""
    return dict(model.named_modules()), {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _assert_as_before(model, snapshot):
    modules, tensors = snapshot
    now = dict(model.named_modules())
    assert now.keys() == modules.keys() and all(now[n] is modules[n] for n in modules)
    state = model.state_dict(keep_vars=True)
    assert state.keys() == tensors.keys() and all(torch.equal(state[k], tensors[k]) for k in tensors)


def test_bad_device(tmp_path):
    ckpt_dir = _write(tmp_path, "gptq")
    model = Tiny(1)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"device: 'meta' is the meta device.*cannot put weights on it; pass 'cpu'"):
        patch_model(model, ckpt_dir, device="meta")
    with pytest.raises(ValueError, match=r"device: the CPU is device 'cpu' or 'cpu:0'.*got 'cpu:1'"):
        patch_model(model, ckpt_dir, device="cpu:1")
    _assert_as_before(model, before)


@pytest.mark.parametrize("device", ["cuda:0", "cuda", 0, torch.device("cuda"), torch.device("cuda", 0)],
                         ids=["cuda:0", "cuda", "0", "torch-cuda", "torch-cuda-0"])
def test_every_cuda_spelling_without_a_gpu_gives_the_setup_error(tmp_path, monkeypatch, device):
    from cupyq import device as cupyq_device

    monkeypatch.setattr(cupyq_device, "_checked_devices", set())
    monkeypatch.setattr(cupyq_device, "gpu_unavailable_reason", lambda: "no CUDA device is visible (check ...)")
    ckpt_dir = _write(tmp_path, "gptq")
    model = Tiny(1)
    before = _snapshot(model)
    with pytest.raises(cupyq_device.SetupError, match=r"^device (0|cuda): no CUDA device is visible"):
        patch_model(model, ckpt_dir, device=device)
    _assert_as_before(model, before)


@pytest.mark.parametrize("device", ["cpu:0", torch.device("cpu", 0), torch.device("cpu")])
def test_cpu_spellings_patch_onto_the_cpu(tmp_path, device):
    ckpt_dir = _write(tmp_path, "gptq")
    model = patch_model(Tiny(1), ckpt_dir, device=device)
    assert all(not _modules(model)[n].qmatrix.is_cuda for n in LINEARS)


def test_bad_tensors_of_a_late_layer_leave_the_model_as_it_was(tmp_path):
    """A NaN scale in the last quantized layer: no module is replaced, no tensor loaded."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    ckpt_dir = _write(tmp_path, "gptq")
    last = open_checkpoint(ckpt_dir).quantized_layers[-1]
    file = str(ckpt_dir / "model.safetensors")
    with safe_open(file, "np") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    rng = np.random.default_rng(5)
    scales = tensors[f"{last}.scales"]
    bad = tuple(int(rng.integers(0, s)) for s in scales.shape)
    scales[bad] = np.nan
    save_file(tensors, file, metadata=metadata)
    model = Tiny(1)
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match=rf"tensor '{last}.scales': scales: expected finite values"):
        patch_model(model, ckpt_dir, device="cpu")
    _assert_as_before(model, before)


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["cuda", torch.device("cuda"), 0, "cuda:0"],
                         ids=["cuda", "torch-cuda", "0", "cuda:0"])
def test_patch_model_gpu_materialises_a_meta_model_on_every_cuda_spelling(tmp_path, device):
    """device="cuda" is CuPy's current device (0 in a fresh process): the matrices and loaded tensors go there."""
    ckpt_dir = _write(tmp_path, "gptq")
    with torch.device("meta"):
        model = Tiny(7).half()
    patch_model(model, ckpt_dir, device=device)
    assert all(_modules(model)[n].qmatrix.device_id == 0 for n in LINEARS)
    assert all(t.device == torch.device("cuda", 0) for t in model.state_dict().values())
    _check_against_fp16_twin(model, ckpt_dir, seed=1)


def _check_against_fp16_twin(model, ckpt_dir, seed):
    """Relative logit errors (patched model on cuda:0, the dense twin in fp16 on the GPU) against the float32
    dense twin; the dense model run in fp16 is the yardstick for fp16 rounding: allow twice it plus a floor."""
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))
    twin = _dense_twin(ckpt_dir)
    with torch.no_grad():
        got = model(ids.cuda()).float().cpu()
        ref = twin(ids)
        ref16 = twin.half().cuda()(ids.cuda()).float().cpu()
    err = ((got - ref).norm() / ref.norm()).item()
    err16 = ((ref16 - ref).norm() / ref.norm()).item()
    assert err <= 2 * err16 + 2e-3
    return err, err16


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gptq", "exl2"])
def test_patch_model_gpu_fp16(tmp_path, kind):
    ckpt_dir = _write(tmp_path, kind)
    model = Tiny(7).half().cuda()
    patch_model(model, ckpt_dir)
    assert all(_modules(model)[n].qmatrix.is_cuda for n in LINEARS)
    err, err16 = _check_against_fp16_twin(model, ckpt_dir, seed=0)
    print(f"patch_model {kind} GPU fp16: relative logit error {err:.3g} (dense fp16 model: {err16:.3g})")
