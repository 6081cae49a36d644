"""patch_model on meta-device models and on EXL2 layers with padded output width; the GPTQModel-made
checkpoint end to end; clear errors of the exllamav2-compatible QuantLinear (CPU reference path)."""

import io
import json
import pickle
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from torch import nn  # noqa: E402

from cupyq import exllamav2 as ex  # noqa: E402
from cupyq.checkpoint import save_exl2, save_gptq  # noqa: E402
from cupyq.model import patch_model  # noqa: E402
from cupyq.quantize import quantize_exl2, quantize_gptq  # noqa: E402
from cupyq.torch_ops import QuantizedLinear, TrimmedQuantizedLinear  # noqa: E402

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "gptqmodel_asym_v1"
EXPECTED = DATA / "gptqmodel_asym_v1_expected.safetensors"
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")


def tiny_config(**kw):
    return transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, **kw)


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def tiny_checkpoint(directory, config, seed=0, drop=()):
    """A GPTQ checkpoint of a random tiny Llama (every projection 4-bit g32) and that model, dequantised."""
    torch.manual_seed(seed)
    source = transformers.LlamaForCausalLM(config).float().eval()
    layers, extras = {}, {}
    for name, p in source.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if any(module.endswith(s) for s in PROJ):
            if name.endswith(".weight"):  # a projection's bias (attention_bias=True) is not given to the quantizer
                layers[module] = quantize_gptq(p.numpy().T.copy(), bits=4, group_size=32, sym=True)
        elif name not in drop:
            extras[name] = p.numpy().astype(np.float16)
    if config.tie_word_embeddings:
        extras.pop("lm_head.weight", None)
    save_gptq(directory, layers, bits=4, group_size=32, desc_act=False, sym=True, extra_tensors=extras)
    return directory


def meta_model(config):
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config).float().eval()


def meta_names(model):
    return [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]


IDS = torch.tensor([[1, 5, 17, 42, 80, 3]])


# ------------------------------------------------------------------------------------------------ item 6
@pytest.mark.parametrize("tied", [False, True])
def test_meta_model_is_materialised_from_the_checkpoint(tmp_path, tied):
    config = tiny_config(tie_word_embeddings=tied)
    d = tiny_checkpoint(tmp_path / "ckpt", config)
    # the same model built normally and patched is the reference
    torch.manual_seed(123)
    eager = quiet(patch_model, transformers.LlamaForCausalLM(config).float().eval(), d, device="cpu")
    model = quiet(patch_model, meta_model(config), d, device="cpu")
    assert meta_names(model) == []
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantizedLinear)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, eager.model.rotary_emb.inv_freq, rtol=0, atol=0)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        got, want = model(input_ids=IDS).logits, eager(input_ids=IDS).logits
    assert got.device.type == "cpu" and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_meta_tensor_missing_from_checkpoint_is_named_and_model_untouched(tmp_path):
    config = tiny_config()
    d = tiny_checkpoint(tmp_path / "ckpt", config, drop=("model.norm.weight",))
    model = meta_model(config)
    with pytest.raises(ValueError) as err:
        quiet(patch_model, model, d, device="cpu")
    msg = str(err.value)
    assert str(d) in msg and "model.norm.weight" in msg and "meta device" in msg
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)  # nothing replaced
    assert model.model.embed_tokens.weight.is_meta


def test_meta_model_needs_a_device(tmp_path):
    config = tiny_config()
    d = tiny_checkpoint(tmp_path / "ckpt", config)
    with pytest.raises(ValueError, match="meta device"):
        quiet(patch_model, meta_model(config), d)


def test_non_persistent_buffer_that_cannot_be_rebuilt_is_named(tmp_path):
    config = tiny_config()
    d = tiny_checkpoint(tmp_path / "ckpt", config)
    model = meta_model(config)
    odd = nn.Module()
    odd.register_buffer("table", torch.empty(3, device="meta"), persistent=False)
    model.model.odd = odd
    with pytest.raises(ValueError, match=r"neither in the checkpoint nor recomputable: model\.odd\.table"):
        quiet(patch_model, model, d, device="cpu")


# ------------------------------------------------------------------------------------------------ item 0, e2e
def _logits(directory):
    config = transformers.LlamaConfig.from_pretrained(str(directory))
    model = quiet(patch_model, meta_model(config), directory, device="cpu")
    from safetensors.numpy import load_file

    ref = load_file(str(EXPECTED))
    with torch.no_grad():
        got = model(input_ids=torch.from_numpy(ref["input_ids"])).logits.numpy()
    return got, ref["logits"]


def test_gptqmodel_checkpoint_logits_match_the_tool():
    got, ref = _logits(FIXTURE)
    # the tool runs the model in float16 (about 1e-3 relative per rounding); cupyq in float32
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2


def test_gptqmodel_checkpoint_read_per_field_gives_other_logits(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, d)
    for fname in ("quantize_config.json", "config.json"):
        cfg = json.loads((d / fname).read_text())
        (cfg.get("quantization_config") or cfg).pop("meta")
        (d / fname).write_text(json.dumps(cfg))
    got, ref = _logits(d)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) > 5e-2


# ------------------------------------------------------------------------------------------------ item 7
class Head(nn.Module):
    def __init__(self, out_features):
        super().__init__()
        self.lm_head = nn.Linear(64, out_features, bias=False)


@pytest.mark.parametrize("out_features", [33, 63])
def test_padded_exl2_output_width_accepted(tmp_path, out_features):
    rng = np.random.default_rng(out_features)
    padded = -(-out_features // 32) * 32
    w = np.zeros((64, padded), dtype=np.float32)
    w[:, :out_features] = rng.standard_normal((64, out_features))
    t = quantize_exl2(w, bits=(4,), proportions=(1.0,))
    save_exl2(tmp_path, {"lm_head": t})
    from cupyq import reference

    wq = reference.dequantize_exl2(**{k: v for k, v in t.items() if k != "q_perm"})
    model = quiet(patch_model, Head(out_features), tmp_path, device="cpu")
    x = torch.from_numpy(rng.standard_normal((3, 64)).astype(np.float32))
    y = quiet(model.lm_head, x)
    assert tuple(y.shape) == (3, out_features) and model.lm_head.out_features == out_features
    np.testing.assert_allclose(y.numpy(), x.numpy() @ wq[:, :out_features], rtol=1e-5, atol=1e-5)


def test_patched_model_with_a_padded_exl2_layer_pickles(tmp_path):
    rng = np.random.default_rng(7)
    w = np.concatenate([rng.standard_normal((64, 40)), np.zeros((64, 24))], axis=1).astype(np.float32)
    save_exl2(tmp_path, {"lm_head": quantize_exl2(w, bits=(6,), proportions=(1.0,))})
    model = quiet(patch_model, Head(40), tmp_path, device="cpu")
    assert type(model.lm_head) is TrimmedQuantizedLinear
    x = torch.from_numpy(rng.standard_normal((3, 64)).astype(np.float32))
    expected = quiet(model.lm_head, x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    for back in (pickle.loads(pickle.dumps(model)), torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)):
        layer = back.lm_head
        assert type(layer) is TrimmedQuantizedLinear and (layer.out_features, layer.stored_out_features) == (40, 64)
        assert layer.qmatrix is not model.lm_head.qmatrix and layer.handle != model.lm_head.handle
        assert torch.equal(quiet(layer, x), expected)


def test_attention_bias_missing_from_the_checkpoint_is_dropped_with_a_warning(tmp_path):
    config = tiny_config(attention_bias=True)
    d = tiny_checkpoint(tmp_path / "ckpt", config)  # the quantizer was given no bias
    for model in (transformers.LlamaForCausalLM(config).float().eval(), meta_model(config)):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            patch_model(model, d, device="cpu")
        dropped = [str(w.message) for w in record if "dropped" in str(w.message)]
        biases = [f"model.layers.0.{p}.bias" for p in sorted(PROJ) if p.startswith("self_attn")]
        assert len(dropped) == 1 and dropped[0].endswith(f"{len(biases)} model bias(es) dropped: their Linear has a "
                                                         f"bias but the checkpoint's quantized layer has none, so the "
                                                         f"layer computes x @ W without it: {', '.join(biases)}")
        assert meta_names(model) == []
        q = model.model.layers[0].self_attn.q_proj
        assert not quiet(q, torch.zeros(2, 64)).any()  # no bias added


def test_exl2_width_beyond_padding_still_rejected(tmp_path):
    t = quantize_exl2(np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32))
    save_exl2(tmp_path, {"lm_head": t})
    with pytest.raises(ValueError, match=r"layer 'lm_head' is exl2 with in_features=64, out_features=64, .*out_features=32"):
        quiet(patch_model, Head(32), tmp_path, device="cpu")


# ------------------------------------------------------------------------------------------------ item 16
def test_quant_linear_bits_of_the_wrong_type():
    t = quantize_gptq(np.random.default_rng(2).standard_normal((128, 64)).astype(np.float32), bits=4, group_size=32)
    tt = {k: torch.from_numpy(v) for k, v in t.items()}
    with pytest.raises(TypeError, match=r"bits: expected an integer \(4\), got str '4'"):
        ex.QuantLinear(tt["qweight"], tt["qzeros"], tt["scales"], tt["g_idx"], None, "4", 32)


def test_exl2_weight_object_without_q_invperm():
    t = quantize_exl2(np.random.default_rng(3).standard_normal((128, 64)).astype(np.float32))
    w = SimpleNamespace(**{k: torch.from_numpy(v) for k, v in t.items() if k not in ("q_invperm", "q_perm")})
    with pytest.raises(ValueError, match=r"weight: EXL2 weight object \(SimpleNamespace\) has no q_invperm \(or q_perm\)"):
        ex.QuantLinear(w, None)
    w.q_perm = torch.argsort(torch.from_numpy(t["q_invperm"]).long()).to(torch.int32)  # q_perm alone is enough
    layer = ex.QuantLinear(w, None)
    assert layer.infeatures == 128
