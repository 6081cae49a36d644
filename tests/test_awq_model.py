"""AWQ in torch: patch_model of a tiny transformers Llama from hand-written AWQ directories, and the
LoRAX-compatible ``cupyq.awq.AWQLinear`` (CPU reference path; GPU kernels, torch.compile and CUDA graphs
in ``gpu`` tests).

Weights are checked against a dequantiser written here from the AutoAWQ GEMM layout (see test_awq.py):
unpack columns with shifts 0..28, reorder with 0, 4, 1, 5, 2, 6, 3, 7, ``W = (q - z) * s``.
"""

import copy
import gc
import json
import pickle
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cupyq.awq import AWQLinear  # noqa: E402
from cupyq.model import patch_model  # noqa: E402
from cupyq.torch_ops import QuantizedLinear, registered_handles  # noqa: E402

PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]
GROUP = 64
CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
KEEP = ["lm_head", "layers.1.mlp"]  # modules_to_not_convert of the hand-written directories


def pack_columns(values):
    v = np.asarray(values, dtype=np.uint32)
    words = np.zeros((v.shape[0], v.shape[1] // 8), dtype=np.uint32)
    for i, col in enumerate(PACK_ORDER):
        words |= v[:, col::8] << np.uint32(4 * i)
    return words.view(np.int32)


def unpack_columns(words):
    u = np.asarray(words).view(np.uint32)
    nibbles = np.stack([(u >> np.uint32(s)) & 0xF for s in range(0, 32, 4)], axis=-1)
    return nibbles[:, :, REVERSE_ORDER].reshape(u.shape[0], -1).astype(np.int64)


def dequant_awq(qweight, qzeros, scales, group_size):
    q, z = unpack_columns(qweight), unpack_columns(qzeros)
    gs = q.shape[0] if group_size == -1 else group_size
    g = np.arange(q.shape[0]) // gs
    return ((q - z[g]) * np.asarray(scales, np.float32)[g]).astype(np.float32)


def random_awq(rng, k, n, group_size=GROUP, bias=False):
    gs = k if group_size == -1 else group_size
    q = rng.integers(0, 16, (k, n))
    z = rng.integers(0, 16, (k // gs, n))
    z[0, :8] = [0, 15, 0, 15, 0, 15, 0, 15]
    t = dict(qweight=pack_columns(q), qzeros=pack_columns(z),
             scales=(rng.uniform(0.5, 1.5, (k // gs, n)) * 0.004).astype(np.float16))
    if bias:
        t["bias"] = (rng.standard_normal(n) * 0.1).astype(np.float16)
    return t


# ------------------------------------------------------------------------------------------------ tiny Llama


def make_model(seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**CONFIG)
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).eval()


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def is_kept(name):
    return any(key in name for key in KEEP)


def write_awq_dir(directory, style, seed=0):
    """An AWQ directory as AutoAWQ / transformers publish them: every decoder projection GEMM-packed with
    group size 64, the modules in KEEP stored as fp16 ``.weight``; embeddings and norms fp16."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    source = make_model(seed)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, lin in linears(source).items():
        if is_kept(name):
            tensors[f"{name}.weight"] = lin.weight.detach().numpy().astype(np.float16)
        else:
            for part, a in random_awq(rng, lin.in_features, lin.out_features).items():
                tensors[f"{name}.{part}"] = a
    for name, value in source.state_dict().items():
        prefix = name.rsplit(".", 1)[0]
        if prefix not in linears(source):
            tensors[name] = value.detach().numpy().astype(np.float16)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = source.config.to_dict()
    if style == "hf":
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True,
                                         "version": "gemm", "modules_to_not_convert": KEEP}
    else:
        (directory / "quant_config.json").write_text(json.dumps(
            {"zero_point": True, "q_group_size": GROUP, "w_bit": 4, "version": "GEMM", "modules_to_not_convert": KEEP}))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def dense_twin(directory):
    """A fresh Llama holding every checkpoint weight, AWQ layers dequantised here (float32)."""
    from safetensors.numpy import load_file

    tensors = load_file(str(directory / "model.safetensors"))
    model = make_model(999)
    state = model.state_dict()
    with torch.no_grad():
        for name, lin in linears(model).items():
            if f"{name}.qweight" in tensors:
                w = dequant_awq(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"], GROUP)
                lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
        for name, value in tensors.items():
            if name in state:
                state[name].copy_(torch.from_numpy(value.astype(np.float32)))
    return model


def token_ids():
    return torch.randint(0, CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("style", ["hf", "autoawq"])
def test_patched_llama_matches_dequantised_model_cpu(tmp_path, style):
    directory = write_awq_dir(tmp_path / style, style)
    model = make_model(1)  # different init: every weight must come from the checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "no GPU kernel ran": the CPU path is the point here
        patch_model(model, directory)
        with torch.no_grad():
            got = model(token_ids()).logits
    replaced = sorted(n for n, m in model.named_modules() if isinstance(m, QuantizedLinear))
    expected = sorted(n for n in linears(make_model(0)) if not is_kept(n))
    assert replaced == expected and len(replaced) == 11
    assert all(m.qmatrix.format == "awq" for m in model.modules() if isinstance(m, QuantizedLinear))
    # modules_to_not_convert: still dense, holding the checkpoint's fp16 weight
    twin = dense_twin(directory)
    modules = dict(model.named_modules())
    for name in ("lm_head", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.down_proj"):
        assert type(modules[name]) is torch.nn.Linear, name
        assert torch.equal(modules[name].weight, dict(twin.named_modules())[name].weight), name
    with torch.no_grad():
        ref = twin(token_ids()).logits
    # Same float32 weights on both sides; only the order of summation differs (~1e-7 per product).
    assert got.shape == (2, 12, CONFIG["vocab_size"])
    assert relative(got, ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("style", ["hf", "autoawq"])
def test_patched_llama_gpu_fp16(tmp_path, style):
    directory = write_awq_dir(tmp_path / style, style)
    model = make_model(1).half().cuda()
    patch_model(model, directory)
    assert all(m.qmatrix.is_cuda for m in model.modules() if isinstance(m, QuantizedLinear))
    twin = dense_twin(directory)
    ids = token_ids()
    with torch.no_grad():
        got = model(ids.cuda()).logits.float().cpu()
        ref = twin(ids).logits
        ref16 = twin.half().cuda()(ids.cuda()).logits.float().cpu()
    err, err16 = relative(got, ref), relative(ref16, ref)
    print(f"\nAWQ {style} GPU fp16: relative logit error {err:.3g} (dense fp16 model: {err16:.3g})")
    # The dense fp16 model measures what fp16 rounding alone costs; allow twice that plus a floor.
    assert err <= 2 * err16 + 2e-3


# ------------------------------------------------------------------------------------------------ AWQLinear


def _layer(k=256, n=64, gs=64, *, seed=0, bias=True, device="cpu"):
    t = random_awq(np.random.default_rng(seed), k, n, gs, bias=bias)
    w = dequant_awq(t["qweight"], t["qzeros"], t["scales"], gs)
    tt = {name: torch.from_numpy(a).to(device) for name, a in t.items()}
    layer = AWQLinear(4, gs, tt["qweight"], tt["qzeros"], tt["scales"], tt.get("bias"))
    return layer, tt, w, t.get("bias")


def _expected(x, w, b):
    y = x.detach().cpu().double().numpy().reshape(-1, w.shape[0]) @ w.astype(np.float64)
    if b is not None:
        y = y + b.astype(np.float64)
    return torch.from_numpy(y.reshape(*x.shape[:-1], w.shape[1]))


def _x(shape, seed, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def test_awq_linear_attributes():
    layer, tt, _, _ = _layer(256, 64, 64)
    assert (layer.in_features, layer.out_features, layer.w_bit, layer.group_size) == (256, 64, 4, 64)
    assert layer.qweight is tt["qweight"] and layer.qzeros is tt["qzeros"] and layer.scales is tt["scales"]
    assert torch.equal(layer.bias, tt["bias"]) and layer.bias.dtype == tt["bias"].dtype  # a copy: see the bias tests
    assert layer.qmatrix.format == "awq"
    assert layer.handle in registered_handles()
    assert "w_bit=4" in repr(layer) and "group_size=64" in repr(layer)
    whole, _, _, _ = _layer(128, 16, -1, bias=False)
    assert whole.group_size == 128 and whole.bias is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_awq_linear_cpu_forward(dtype):
    layer, tt, w, b = _layer(seed=3)
    before = {name: t.clone() for name, t in tt.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for shape in ((5, 256), (2, 3, 256)):
            x = _x(shape, seed=len(shape), dtype=dtype)
            y = layer(x)
            assert y.dtype == dtype and y.shape == shape[:-1] + (64,)
            # the reference path is float32; the inputs are rounded to dtype before the oracle sees them
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(y.double(), _expected(x, w, b), rtol=tol, atol=tol)
    for name, t in tt.items():
        assert torch.equal(t, before[name]), f"{name} was modified"


def test_awq_linear_validation():
    t = random_awq(np.random.default_rng(4), 128, 64, 64)
    tt = {name: torch.from_numpy(a) for name, a in t.items()}
    with pytest.raises(ValueError, match="w_bit: AWQ GEMM layers are 4-bit, got 8"):
        AWQLinear(8, 64, tt["qweight"], tt["qzeros"], tt["scales"], None)
    with pytest.raises(TypeError, match="qweight: expected a torch tensor"):
        AWQLinear(4, 64, t["qweight"], tt["qzeros"], tt["scales"], None)
    with pytest.raises(ValueError, match="group_size"):
        AWQLinear(4, 48, tt["qweight"], tt["qzeros"], tt["scales"], None)
    with pytest.raises(ValueError, match="qzeros: expected shape"):
        AWQLinear(4, 32, tt["qweight"], tt["qzeros"], tt["scales"], None)
    with pytest.raises(ValueError, match="bias"):
        AWQLinear(4, 64, tt["qweight"], tt["qzeros"], tt["scales"], torch.zeros(65))


@pytest.mark.parametrize("bias", [[0.5] * 64, np.full(64, 0.5, np.float32)])
def test_awq_linear_refuses_a_bias_that_is_not_a_torch_tensor(bias):
    t = random_awq(np.random.default_rng(6), 256, 64, 64)
    tt = {name: torch.from_numpy(a) for name, a in t.items()}
    with pytest.raises(TypeError, match=rf"bias: expected a torch tensor or None, got {type(bias).__name__}"):
        AWQLinear(4, 64, tt["qweight"], tt["qzeros"], tt["scales"], bias)


@pytest.mark.parametrize("meta", ["qweight", "qzeros", "scales"])
def test_awq_linear_refuses_a_meta_tensor(meta):
    t = random_awq(np.random.default_rng(7), 256, 64, 64)
    tt = {name: torch.from_numpy(a) for name, a in t.items()}
    tt[meta] = tt[meta].to("meta")
    with pytest.raises(ValueError, match=rf"{meta}: expected the checkpoint's values, got a meta tensor \(no data\)"):
        AWQLinear(4, 64, tt["qweight"], tt["qzeros"], tt["scales"], None)


def test_awq_linear_refuses_an_x_that_is_not_a_torch_tensor():
    layer, _, w, b = _layer(seed=5)
    x = _x((2, 256), seed=5)
    with pytest.raises(TypeError, match=r"x: expected a torch tensor \[\.\.\., in_features\], got numpy\.ndarray; "
                                        r"convert NumPy arrays with torch\.from_numpy"):
        layer(x.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.testing.assert_close(layer(x).double(), _expected(x, w, b), rtol=1e-5, atol=1e-5)


def test_awq_linear_bias_is_read_only_and_truthful():
    layer, tt, w, b = _layer(seed=7)
    x = _x((3, 256), seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = layer(x)
        torch.testing.assert_close(expected.double(), _expected(x, w, b), rtol=1e-5, atol=1e-5)
        layer.bias.mul_(0)  # a copy: the matrix, and so forward, keep the bias
        assert torch.equal(layer.bias, tt["bias"])
        with pytest.raises(AttributeError, match=r"bias: AWQLinear's bias is part of its quantized matrix.*"
                                                 r"build a new AWQLinear"):
            layer.bias = None
        assert torch.equal(layer(x), expected) and torch.equal(layer.bias, tt["bias"])
        tt["bias"].mul_(2)  # the caller's tensor is not the layer's either
        assert torch.equal(layer(x), expected)


def test_awq_linear_pickles_and_copies():
    layer, _, w, b = _layer(seed=8)
    x = _x((4, 256), seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = layer(x)
        back, dup = pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)
        assert back.handle != layer.handle and back.handle in registered_handles()
        assert dup.qmatrix is layer.qmatrix and dup.handle == layer.handle
        del layer
        gc.collect()
        for other in (back, dup):
            assert torch.equal(other(x), expected) and torch.equal(other.bias, torch.from_numpy(b))


def test_awq_linear_release_and_compile_cpu():
    torch._dynamo.reset()
    up, _, wu, bu = _layer(64, 128, 32, seed=5)
    down, _, wd, _ = _layer(128, 64, 64, seed=6, bias=False)
    up.release_checkpoint_tensors()
    assert up.qweight is None and up.scales is None

    def model(x):
        return down(torch.nn.functional.gelu(up(x))) * 2.0

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for shape in ((3, 64), (2, 7, 64)):
            x = _x(shape, seed=shape[0])
            h = torch.nn.functional.gelu(_expected(x, wu, bu).float())
            torch.testing.assert_close(compiled(x).double(), _expected(h, wd, None) * 2.0, rtol=1e-4, atol=1e-4)


def _assert_close_fp16(y, ref, *, max_rel=1e-2, rms_rel=2e-3):
    """fp16 kernel output vs float64 oracle: fp16 weights and outputs (2**-11 relative each), fp32
    accumulation; the worst element stays far below 1% of max|ref|, the RMS error below 0.2%."""
    y = y.detach().double().cpu()
    assert y.shape == ref.shape and torch.isfinite(y).all()
    diff = (y - ref).abs()
    assert diff.max().item() <= max_rel * ref.abs().max().item()
    assert diff.norm().item() <= rms_rel * ref.norm().item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 7, 33, 130])
def test_awq_linear_cuda_matches_reference(dtype, m):
    layer, tt, w, b = _layer(512, 256, 128, seed=m, device="cuda")
    before = {name: t.clone() for name, t in tt.items()}
    assert layer.qmatrix.is_cuda
    x = _x((m, 512), seed=m, dtype=dtype, device="cuda")
    y = layer(x)
    assert y.is_cuda and y.dtype == dtype and y.shape == (m, 256)
    # bf16 activations carry 2**-8 relative rounding; float32 ones are computed in fp16 (as the original)
    scale = 4.0 if dtype == torch.bfloat16 else 1.0
    _assert_close_fp16(y, _expected(x, w, b), max_rel=1e-2 * scale, rms_rel=2e-3 * scale)
    y3 = layer(x.view(1, m, 512))
    assert y3.shape == (1, m, 256)
    _assert_close_fp16(y3[0], _expected(x, w, b), max_rel=1e-2 * scale, rms_rel=2e-3 * scale)
    for name, t in tt.items():
        assert torch.equal(t, before[name]), f"{name} was modified"


class _Block(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.gate, _, self.wg, self.bg = _layer(256, 512, 128, seed=seed, device="cuda")
        self.down, _, self.wd, self.bd = _layer(512, 256, 64, seed=seed + 1, bias=False, device="cuda")

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)))

    def oracle(self, x):
        h = _expected(x, self.wg, self.bg).half().float()
        h = torch.nn.functional.silu(h).half()
        return _expected(h, self.wd, self.bd)


@pytest.mark.gpu
def test_awq_linear_compile_fullgraph_cuda():
    torch._dynamo.reset()
    block = _Block(60)
    compiled = torch.compile(block, fullgraph=True)
    for m in (1, 9, 100):
        x = _x((m, 256), seed=m, dtype=torch.float16, device="cuda")
        y = compiled(x)
        _assert_close_fp16(y, block.oracle(x), max_rel=2e-2, rms_rel=4e-3)
        _assert_close_fp16(y, block(x).double().cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 100])
def test_awq_linear_cuda_graph_capture_and_replay(m):
    block = _Block(70)
    static_x = _x((m, 256), seed=0, dtype=torch.float16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            block(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = block(static_x)
    for seed in (71, 72):
        fresh = _x((m, 256), seed=seed, dtype=torch.float16, device="cuda")
        static_x.copy_(fresh)
        static_y.fill_(float("nan"))  # poison: replay must rewrite every output
        graph.replay()
        torch.cuda.synchronize()
        _assert_close_fp16(static_y, block.oracle(fresh), max_rel=2e-2, rms_rel=4e-3)
