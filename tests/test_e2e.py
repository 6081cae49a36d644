"""End to end: a tiny Llama built by transformers from a config alone (no download), quantized to GPTQ and
EXL2, saved, loaded with patch_model, and compared with the same model holding the dequantised weights.

transformers is part of the ``test`` extra (``pip install -e .[test]``); the module is skipped without it.
"""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cupyq.checkpoint import open_checkpoint, save_exl2, save_gptq  # noqa: E402
from cupyq.model import patch_model  # noqa: E402
from cupyq.quantize import quantize_exl2, quantize_gptq  # noqa: E402
from cupyq.torch_ops import QuantizedLinear  # noqa: E402

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

# name -> (kind, settings). GPTQ settings go to quantize_gptq/save_gptq; EXL2 recipes give each
# projection its own width mix, as EXL2 converters do.
CASES = {
    "gptq-4bit-act-g32": ("gptq", dict(bits=4, group_size=32, desc_act=True, sym=True, checkpoint_format="gptq")),
    "gptq-2bit-g64-asym": ("gptq", dict(bits=2, group_size=64, desc_act=False, sym=False, checkpoint_format="gptq")),
    "gptq-3bit-act-g32-v2": ("gptq", dict(bits=3, group_size=32, desc_act=True, sym=True, checkpoint_format="gptq_v2")),
    "gptq-8bit-gfull": ("gptq", dict(bits=8, group_size=-1, desc_act=False, sym=True, checkpoint_format="gptq")),
    "exl2-mixed": ("exl2", {}),
}
EXL2_RECIPE = {
    "q_proj": ((8, 4), (0.25, 0.75)),
    "k_proj": ((6, 4), (0.5, 0.5)),
    "v_proj": ((6, 5, 4), (0.2, 0.3, 0.5)),
    "o_proj": ((5, 4, 3), (0.25, 0.5, 0.25)),
    "gate_proj": ((4, 3), (0.5, 0.5)),
    "up_proj": ((4, 3), (0.5, 0.5)),
    "down_proj": ((6, 4, 2), (0.25, 0.5, 0.25)),
}


def make_model(seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**CONFIG)
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).eval()


def quantized_linears(model):
    """The decoder-layer projections (lm_head stays fp16, as in most GPTQ and many EXL2 checkpoints)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def write_checkpoint(directory, source, kind, settings, seed=0):
    rng = np.random.default_rng(seed)
    layers = {}
    for name, lin in quantized_linears(source).items():
        w = lin.weight.detach().numpy().T  # nn.Linear weight is [out, in]; checkpoints are [in, out]
        if kind == "gptq":
            layers[name] = quantize_gptq(
                w, bits=settings["bits"], group_size=settings["group_size"], sym=settings["sym"],
                act_order=settings["desc_act"], checkpoint_format=settings["checkpoint_format"],
                importance=rng.random(w.shape[0]),
            )
        else:
            widths, props = EXL2_RECIPE[name.rsplit(".", 1)[1]]
            layers[name] = quantize_exl2(w, bits=widths, proportions=props, importance=rng.random(w.shape[0]))
    quantized = {f"{n}.weight" for n in layers}
    extras = {k: v.detach().numpy().astype(np.float16) for k, v in source.state_dict().items() if k not in quantized}
    config = source.config.to_dict()
    if kind == "gptq":
        return save_gptq(directory, layers, extra_tensors=extras, config=config, **settings)
    return save_exl2(directory, layers, extra_tensors=extras, config=config)


def dense_twin(ckpt_dir):
    """A fresh model whose every weight comes from the checkpoint, quantized linears dequantised (float32)."""
    ckpt = open_checkpoint(ckpt_dir)
    model = make_model(999)
    modules = dict(model.named_modules())
    state = model.state_dict()
    with torch.no_grad():
        for name in ckpt.quantized_layers:
            modules[name].weight.copy_(torch.from_numpy(np.ascontiguousarray(ckpt.dequantize(name).T)))
        for t in ckpt.extra_tensor_names():
            state[t].copy_(torch.from_numpy(ckpt.load_tensor(t).astype(np.float32)))
    return model


def check_dequantised_weights(ckpt_dir, source):
    """The dequantised weights are the source weights to within the quantisation grid (independent of cupyq's
    dequantiser: a wrong group, zero, bit field or permutation moves weights by far more than a step)."""
    ckpt = open_checkpoint(ckpt_dir)
    linears = quantized_linears(source)
    worst = 0.0
    for name in ckpt.quantized_layers:
        w = linears[name].weight.detach().numpy().T
        dq = ckpt.dequantize(name)
        if ckpt.layers[name].format == "gptq":
            t = ckpt.load_layer(name)
            step = t["scales"].astype(np.float32)[t["g_idx"]]
            # round to nearest: half a step; an asymmetric grid may clip one step at its top end
            assert np.all(np.abs(dq - w) <= step * (1 + 1e-3) + 1e-7), name
        worst = max(worst, float(np.linalg.norm(dq - w) / np.linalg.norm(w)))
    assert worst < 0.8  # 2-bit round to nearest is coarse; a permuted or misread layer is ~1.4
    return worst


def token_ids():
    return torch.randint(0, CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def source_model():
    return make_model(0)


@pytest.mark.parametrize("case", list(CASES))
def test_patched_llama_matches_dequantised_model_cpu(tmp_path, source_model, case):
    kind, settings = CASES[case]
    ckpt_dir = write_checkpoint(tmp_path / case, source_model, kind, settings)
    model = make_model(1)  # different init: everything must come from the checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "no GPU kernel ran": the CPU path is the point here
        patch_model(model, ckpt_dir)
        replaced = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
        assert sorted(replaced) == sorted(quantized_linears(source_model))
        with torch.no_grad():
            ids = token_ids()
            got = model(ids).logits
            ref = dense_twin(ckpt_dir)(ids).logits
            original = source_model(ids).logits
    worst_weight = check_dequantised_weights(ckpt_dir, source_model)
    diff = (got - ref).abs().max().item()
    rel = relative(got, ref)
    print(f"\n{case} CPU: patched vs dequantised float32 model: max |logit diff| {diff:.3g}, relative {rel:.3g}; "
          f"quantisation error vs the unquantised model: relative {relative(got, original):.3g} "
          f"(worst layer weight error {worst_weight:.3g})")
    # Same float32 weights on both sides; only the order of summation differs (~1e-7 per product).
    assert got.shape == (2, 12, CONFIG["vocab_size"])
    assert rel < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_patched_llama_gpu_fp16(tmp_path, source_model, case):
    kind, settings = CASES[case]
    ckpt_dir = write_checkpoint(tmp_path / case, source_model, kind, settings)
    model = make_model(1).half().cuda()
    patch_model(model, ckpt_dir)
    assert all(m.qmatrix.is_cuda for m in model.modules() if isinstance(m, QuantizedLinear))
    twin = dense_twin(ckpt_dir)
    ids = token_ids()
    with torch.no_grad():
        got = model(ids.cuda()).logits.float().cpu()
        ref = twin(ids).logits
        ref16 = twin.half().cuda()(ids.cuda()).logits.float().cpu()
    err, err16 = relative(got, ref), relative(ref16, ref)
    print(f"\n{case} GPU fp16: patched vs dequantised float32 model: max |logit diff| "
          f"{(got - ref).abs().max().item():.3g}, relative {err:.3g} (dense fp16 model: relative {err16:.3g})")
    # The same dense model run in fp16 measures what fp16 rounding alone costs; the quantized kernels
    # accumulate in fp32 and round outputs to fp16 like a dense fp16 matmul, so allow twice that plus a floor.
    assert err <= 2 * err16 + 2e-3
