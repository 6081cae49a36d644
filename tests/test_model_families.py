"""patch_model on tiny transformers models of families other than Llama (CPU reference path): Gemma's scaled
embedding on the meta device, tied embeddings, GPT-2's Conv1D layers, and checkpoints that do not fit the model
(another model type, the base model's names, swapped features, no quantized layer, a tensor that cannot be read)."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cupyq.checkpoint import CheckpointError, open_checkpoint, save_gptq  # noqa: E402
from cupyq.model import patch_model  # noqa: E402
from cupyq.quantize import quantize_gptq  # noqa: E402
from cupyq.torch_ops import QuantizedLinear  # noqa: E402

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=96, max_position_embeddings=32)


def _build(config, meta=False):
    """A model of ``config`` in eval mode: random float32 weights (norms and biases too, so none is trivial),
    or on the meta device."""
    if meta:
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config).eval()
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def _save(path, source, skip=(), drop=(), config=None):
    """GPTQ checkpoint of ``source``: its Linear layers quantized (those named in ``skip`` stored as plain
    tensors), every other state_dict tensor but ``drop`` stored as it is; ``config`` the config.json dict."""
    layers = {}
    for name, module in source.named_modules():
        if isinstance(module, torch.nn.Linear) and name not in skip:
            bias = None if module.bias is None else module.bias.detach().numpy()
            layers[name] = quantize_gptq(module.weight.detach().numpy().T, bits=4, group_size=32, bias=bias)
    replaced = {f"{n}.{p}" for n in layers for p in ("weight", "bias")}
    extras = {k: v.detach().numpy() for k, v in source.state_dict().items() if k not in replaced and k not in drop}
    save_gptq(path, layers, bits=4, group_size=32, desc_act=False, sym=True, extra_tensors=extras, config=config)
    return path


def _reference_logits(source, path, ids):
    """Logits of ``source`` with each quantized layer's weight (its own, untied) dequantised from ``path``."""
    ckpt = open_checkpoint(path)
    modules = dict(source.named_modules())
    with torch.no_grad():
        for name in ckpt.quantized_layers:
            modules[name].weight = torch.nn.Parameter(torch.from_numpy(ckpt.dequantize(name).T.copy()))
            bias = ckpt.load_layer(name).get("bias")
            if bias is not None:
                modules[name].bias.copy_(torch.from_numpy(bias.astype(np.float32)))
        return source(ids).logits


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _close(got, want):
    """fp16 checkpoint tensors against the float32 reference built from the same fp16 values: float32 rounding."""
    return float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_gemma_on_the_meta_device_gets_its_embedding_scale(tmp_path):
    config = transformers.GemmaConfig(**SIZES, head_dim=16)
    source = _build(config)
    path = _save(tmp_path, source)
    ids = torch.randint(0, SIZES["vocab_size"], (2, 5))
    want = _reference_logits(source, path, ids)
    model = patch_model(_build(config, meta=True), path, device="cpu")
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(SIZES["hidden_size"] ** 0.5)
    assert _close(_logits(model, ids), want)


def _tied_llama():
    return transformers.LlamaConfig(**SIZES, tie_word_embeddings=True)


@pytest.mark.parametrize("meta", [False, True])
def test_a_tied_head_stored_once_is_loaded_without_an_untouched_warning(tmp_path, meta):
    config = _tied_llama()
    source = _build(config)
    # as save_pretrained writes a tied model: the embedding only
    path = _save(tmp_path, source, skip=("lm_head",), drop=("lm_head.weight",))
    ids = torch.randint(0, SIZES["vocab_size"], (2, 5))
    want = _reference_logits(source, path, ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = patch_model(_build(config, meta=meta), path, device="cpu")
    assert not [w for w in caught if "keep their values" in str(w.message)]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert _close(_logits(model, ids), want)


@pytest.mark.parametrize("meta", [False, True])
def test_differing_tensors_for_one_tied_parameter_are_refused_and_the_model_is_unchanged(tmp_path, meta):
    config = _tied_llama()
    source = _build(config)
    with torch.no_grad():  # untie: the checkpoint of a model whose head is not its embedding
        source.lm_head.weight = torch.nn.Parameter(torch.randn_like(source.lm_head.weight))
    path = _save(tmp_path, source, skip=("lm_head",))
    model = _build(config, meta=meta)
    before = {k: v.clone() for k, v in model.state_dict().items()} if not meta else None
    differ = "'lm_head.weight' and 'model.embed_tokens.weight' differ, but the model ties them"
    with pytest.raises(ValueError, match=differ):
        patch_model(model, path, device="cpu")
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    if meta:
        assert all(p.is_meta for p in model.parameters())
    else:
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_equal_tensors_for_one_tied_parameter_are_accepted(tmp_path):
    config = _tied_llama()
    source = _build(config)
    path = _save(tmp_path, source, skip=("lm_head",))  # both names stored, with the same values
    ids = torch.randint(0, SIZES["vocab_size"], (2, 5))
    want = _reference_logits(source, path, ids)
    assert _close(_logits(patch_model(_build(config, meta=True), path, device="cpu"), ids), want)


def test_quantized_gpt2_conv1d_layers_are_refused_naming_the_module_type(tmp_path):
    from transformers.pytorch_utils import Conv1D

    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=96, n_positions=32)
    source = _build(config)
    conv = {n: m for n, m in source.named_modules() if isinstance(m, Conv1D)}
    # Conv1D.weight is [in, out] already
    layers = {n: quantize_gptq(m.weight.detach().numpy(), bits=4, group_size=32) for n, m in conv.items()}
    save_gptq(tmp_path, layers, bits=4, group_size=32, desc_act=False, sym=True)
    model = _build(config)
    refused = r"only torch.nn.Linear modules are replaced\): 'transformer.h.0.attn.c_attn' \(a Conv1D\)"
    with pytest.raises(ValueError, match=refused):
        patch_model(model, tmp_path)
    assert all(isinstance(m, Conv1D) for n, m in model.named_modules() if n in conv)


def test_a_quantized_layer_the_model_lacks_is_named_as_missing(tmp_path):
    source = _build(transformers.Qwen2Config(**SIZES))
    path = _save(tmp_path, source)
    other = _build(transformers.Phi3Config(**SIZES, pad_token_id=0))  # fused qkv_proj / gate_up_proj
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj' \(no such module\)"):
        patch_model(other, path)


def test_a_checkpoint_of_another_model_type_warns_naming_both(tmp_path):
    qwen2 = transformers.Qwen2Config(**SIZES)
    _save(tmp_path, _build(qwen2), config=qwen2.to_dict())
    with pytest.warns(UserWarning, match="config.json says model_type 'qwen2', but the model is 'mistral'"):
        patch_model(_build(transformers.MistralConfig(**SIZES)), tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch_model(_build(qwen2), tmp_path)
    assert not [w for w in caught if "model_type" in str(w.message)]


def test_a_checkpoint_of_the_base_model_names_the_module_with_the_prefix(tmp_path):
    config = transformers.Qwen2Config(**SIZES)
    path = _save(tmp_path, _build(config).model)  # Qwen2Model's names: no "model." prefix
    named = r"'layers.0.mlp.down_proj' \(no such module; the model has 'model.layers.0.mlp.down_proj'\)"
    with pytest.raises(ValueError, match=named):
        patch_model(_build(config), path)


def test_a_tensor_that_cannot_be_read_leaves_the_model_unpatched(tmp_path):
    config = transformers.MistralConfig(**SIZES)
    source = _build(config)
    layers = {n: quantize_gptq(m.weight.detach().numpy().T, bits=4, group_size=32)
              for n, m in source.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    # the head alone in the last shard, after every quantized layer
    save_gptq(tmp_path, layers, bits=4, group_size=32, desc_act=False, sym=True,
              extra_tensors={"lm_head.weight": source.lm_head.weight.detach().numpy()}, shard_bytes=4096)
    ckpt = open_checkpoint(tmp_path)
    head = ckpt.tensors["lm_head.weight"]
    assert all(r.file != head.file for n, r in ckpt.tensors.items() if n != "lm_head.weight")
    with open(head.file, "r+b") as f:  # the file changes after it was opened
        f.truncate(head.offset + 8)
    model = _build(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"tensor 'lm_head.weight': read 8 of \d+ bytes"):
        patch_model(model, ckpt)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_checkpoint_without_quantized_layers_is_refused(tmp_path):
    config = transformers.MistralConfig(**SIZES)
    _build(config).save_pretrained(tmp_path)  # the full-precision model, not a quantized checkpoint
    model = _build(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="has no GPTQ, EXL2 or AWQ layer"):
        patch_model(model, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_layer_quantized_from_the_untransposed_weight_is_named_as_swapped(tmp_path):
    config = transformers.MistralConfig(**SIZES)
    source = _build(config)
    k_proj = source.model.layers[0].self_attn.k_proj  # [32, 64]: out_features 32
    layers = {"model.layers.0.self_attn.k_proj": quantize_gptq(k_proj.weight.detach().numpy(), bits=4, group_size=32)}
    save_gptq(tmp_path, layers, bits=4, group_size=32, desc_act=False, sym=True)
    swapped = r"in_features=32, out_features=64, but .* \(the features swapped: .* weight.T\)"
    with pytest.raises(ValueError, match=swapped):
        patch_model(_build(config), tmp_path)
