"""A small built-in sample: GPTQ, EXL2 and AWQ checkpoint directories made from seeded random weights.

Used by ``cupyq verify`` / ``warmup`` without a path, by tests and by demos. The layers carry
Llama-style names and shapes (hidden 1024, MLP 2048) and are quantized by :mod:`cupyq.quantize`
(round to nearest, so the sample is made in well under a second).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["SAMPLE_RECIPES", "make_sample"]

_HIDDEN, _MLP, _KV, _VOCAB = 1024, 2048, 256, 512

# name -> (kind, settings, [(module, in_features, out_features, with_bias)])
SAMPLE_RECIPES = {
    "gptq-4bit-g128-act": (
        "gptq",
        {"bits": 4, "group_size": 128, "desc_act": True, "sym": True, "checkpoint_format": "gptq"},
        [
            ("model.layers.0.self_attn.q_proj", _HIDDEN, _HIDDEN, False),
            ("model.layers.0.self_attn.k_proj", _HIDDEN, _KV, False),
            ("model.layers.0.mlp.gate_proj", _HIDDEN, _MLP, False),
            ("model.layers.0.mlp.down_proj", _MLP, _HIDDEN, False),
        ],
    ),
    "gptq-3bit-g64-asym-v2": (
        "gptq",
        {"bits": 3, "group_size": 64, "desc_act": False, "sym": False, "checkpoint_format": "gptq_v2"},
        [
            ("model.layers.1.self_attn.o_proj", _HIDDEN, _HIDDEN, True),
            ("model.layers.1.mlp.up_proj", _HIDDEN, _MLP, False),
        ],
    ),
    "exl2-mixed": (
        "exl2",
        {},
        [
            ("model.layers.0.self_attn.q_proj", _HIDDEN, _HIDDEN, False, (8, 4), (0.25, 0.75)),
            ("model.layers.0.mlp.gate_proj", _HIDDEN, _MLP, False, (6, 5, 4), (0.2, 0.3, 0.5)),
            ("model.layers.0.mlp.down_proj", _MLP, _HIDDEN, True, (4, 3, 2), (0.3, 0.4, 0.3)),
        ],
    ),
    "awq-4bit-g128": (
        "awq",
        {"group_size": 128, "modules_to_not_convert": ["lm_head"]},
        [
            ("model.layers.0.self_attn.v_proj", _HIDDEN, _KV, True),
            ("model.layers.0.mlp.up_proj", _HIDDEN, _MLP, False),
        ],
    ),
}


def _weight(rng, k, n):
    # Roughly the spread of trained projection weights, plus a few outlier input channels.
    w = rng.standard_normal((k, n), dtype=np.float32) * np.float32(1.0 / np.sqrt(k))
    rows = rng.choice(k, size=max(1, k // 128), replace=False)
    w[rows] *= 4.0
    return w


def _extras(rng):
    return {
        "model.norm.weight": (1.0 + 0.1 * rng.standard_normal(_HIDDEN)).astype(np.float16),
        "lm_head.weight": (rng.standard_normal((_VOCAB, _HIDDEN)) / np.sqrt(_HIDDEN)).astype(np.float16),
    }


def _model_config():
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": _HIDDEN,
        "intermediate_size": _MLP,
        "vocab_size": _VOCAB,
        "torch_dtype": "float16",
    }


def make_sample(directory, *, seed=0) -> dict:
    """Write the sample checkpoints under ``directory`` (created if missing).

    Makes one subdirectory per entry of :data:`SAMPLE_RECIPES`:
    ``gptq-4bit-g128-act`` (4-bit, group 128, act-order, symmetric, v1 zeros; 4 layers),
    ``gptq-3bit-g64-asym-v2`` (3-bit, group 64, asymmetric, gptq_v2 zeros, one layer with bias) and
    ``exl2-mixed`` (mixed widths [8,4], [6,5,4] and [4,3,2], one layer with bias) and ``awq-4bit-g128``
    (AWQ GEMM, group 128, one layer with bias, ``lm_head`` listed in ``modules_to_not_convert``); each also
    holds an fp16 ``lm_head.weight`` and ``model.norm.weight``. Existing sample files are replaced.

    Returns ``{recipe name: Path of its directory}``.
    """
    from cupyq.checkpoint import save_awq, save_exl2, save_gptq
    from cupyq.quantize import quantize_awq, quantize_exl2, quantize_gptq

    root = Path(directory)
    rng = np.random.default_rng(seed)
    made = {}
    for name, (kind, settings, layers) in SAMPLE_RECIPES.items():
        tensors = {}
        for spec in layers:
            module, k, n, with_bias = spec[:4]
            w = _weight(rng, k, n)
            bias = rng.standard_normal(n, dtype=np.float32) * np.float32(0.1) if with_bias else None
            if kind == "gptq":
                tensors[module] = quantize_gptq(
                    w,
                    bits=settings["bits"],
                    group_size=settings["group_size"],
                    sym=settings["sym"],
                    act_order=settings["desc_act"],
                    checkpoint_format=settings["checkpoint_format"],
                    importance=rng.random(k),
                    bias=bias,
                )
            elif kind == "awq":
                tensors[module] = quantize_awq(w, group_size=settings["group_size"], bias=bias)
            else:
                widths, props = spec[4:]
                tensors[module] = quantize_exl2(
                    w, bits=widths, proportions=props, importance=rng.random(k), bias=bias, seed=seed
                )
        extras = _extras(rng)
        if kind == "gptq":
            made[name] = save_gptq(
                root / name, tensors, extra_tensors=extras, config=_model_config(), overwrite=True, **settings
            )
        elif kind == "awq":
            made[name] = save_awq(
                root / name, tensors, extra_tensors=extras, config=_model_config(), overwrite=True, **settings
            )
        else:
            made[name] = save_exl2(root / name, tensors, extra_tensors=extras, config=_model_config(), overwrite=True)
    return made
