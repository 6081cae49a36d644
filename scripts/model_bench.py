"""Model-level benchmark: a Llama-3-8B-shaped decoder patched with cupyq against the same model in fp16.

  python scripts/model_bench.py --json out.json [--layers 4] [--format gptq|exl2] [--batches 1,8,32,128]
                                [--prefill 512,2048]
  python scripts/model_bench.py --dry-run      # tiny config on the CPU: the whole flow, no timing claims

The model is built by transformers from a LlamaConfig (hidden 4096, intermediate 14336, 32 heads, 8 KV heads,
``--layers`` decoder layers, a 32000-token vocabulary so the embeddings stay small) with random fp16 weights.
Its linear layers are written as a checkpoint of random quantized tensors (GPTQ 4-bit, group 128, act-order; or
EXL2 at about 4.65 bits per weight: 10 % of the rows at 6 bits, 45 % at 5 and 45 % at 4, groups of 32 rows), and
``cupyq.patch_model`` loads that checkpoint into a copy of the model built on the meta device. Timed, each under CUDA-graph replay (median of 20 replays, CUDA events, with cupyq.bench's graph timer):

* decode: one forward of ``[B, 1]`` tokens without a KV cache (the layer stack on one token per sequence), for
  every batch size B;
* prefill: one forward of ``[1, T]`` tokens for every T.

Reported per case: time per step, time per decoder layer, tokens/s and the speed-up over fp16.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import numpy as np


def llama_config(layers: int, tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                           num_hidden_layers=layers, vocab_size=512, max_position_embeddings=4096)
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=8192,
                       torch_dtype="float16")


def _random_gptq_layer(rng, k, n):
    from cupyq.formats import gptq as G

    groups = k // 128
    return dict(
        qweight=G.pack_qweight(rng.integers(0, 16, size=(k, n)), 4),
        qzeros=G.pack_qzeros(rng.integers(1, 15, size=(groups, n)), 4),
        scales=(rng.uniform(0.5, 1.5, size=(groups, n)) * 0.002).astype(np.float16),
        g_idx=(rng.permutation(k) // 128).astype(np.int32),
    )


def _random_exl2_layer(rng, k, n):
    from cupyq.formats import exl2 as E

    # about 4.65 bits per weight: 10 % of the rows at 6 bits, 45 % at 5, 45 % at 4, groups of 32 rows
    r6, r5 = k // 10 // 32 * 32, k * 9 // 20 // 32 * 32  # whole groups of 32 rows before the last width
    plan = [(6, r6), (5, r5), (4, k - r6 - r5)]
    bits, rows = [], []
    for b, r in plan:
        while r > 0:
            bits.append(b)
            rows.append(min(32, r))
            r -= 32
    q = np.concatenate([rng.integers(0, 2 ** b, size=(r, n)) for b, r in zip(bits, rows)])
    q_weight, q_groups = E.pack_q_weight(q, bits, rows)
    return dict(
        q_weight=q_weight,
        q_invperm=np.argsort(rng.permutation(k)).astype(np.int32),
        q_scale=E.encode_scale_codes(rng.integers(0, 16, size=(len(bits), n))),
        q_scale_max=(rng.uniform(0.5, 1.5, size=len(bits)) * 0.002).astype(np.float16),
        q_groups=q_groups,
    )


def write_checkpoint(directory, model, fmt: str, seed: int = 0):
    """A checkpoint of random quantized tensors for every decoder linear of ``model`` (embeddings, norms and
    lm_head stored from the model itself, in fp16)."""
    import torch

    from cupyq.checkpoint import save_exl2, save_gptq

    rng = np.random.default_rng(seed)
    layers, extra = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            k, n = module.in_features, module.out_features
            layers[name] = _random_gptq_layer(rng, k, n) if fmt == "gptq" else _random_exl2_layer(rng, k, n)
    for name, tensor in model.state_dict().items():
        if name.rsplit(".", 1)[0] not in layers:
            extra[name] = tensor.detach().to(torch.float16).cpu().numpy()
    config = model.config.to_dict()
    if fmt == "gptq":
        return save_gptq(directory, layers, bits=4, group_size=128, desc_act=True, sym=False,
                         checkpoint_format="gptq_v2", extra_tensors=extra, config=config)
    return save_exl2(directory, layers, extra_tensors=extra, config=config)


def run(args) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    import cupyq
    from cupyq.bench import _time_graph

    tiny = args.dry_run
    device = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.float16
    config = llama_config(args.layers, tiny)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    report = {"config": {"layers": args.layers, "hidden": config.hidden_size, "intermediate": config.intermediate_size,
                         "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads},
              "format": args.format, "rows": []}
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(d, dense, args.format)
        with torch.device("meta"):
            quant = LlamaForCausalLM(config)
        cupyq.patch_model(quant, d, device=device)
    quant = quant.to(dtype=dtype).eval()
    cases = [("decode", b, 1) for b in args.batches] + [("prefill", 1, t) for t in args.prefill]
    for kind, batch, tokens in cases:
        ids = torch.randint(0, config.vocab_size, (batch, tokens), device=device)
        row = {"case": kind, "batch": batch, "tokens": tokens}
        with torch.no_grad():
            if tiny:  # the flow only: one eager forward of each model
                row["max_abs_logit"] = float(quant(ids, use_cache=False).logits.abs().max())
                dense(ids, use_cache=False)
            else:
                for label, model in (("fp16_ms", dense), ("cupyq_ms", quant)):
                    # one step per graph, median of 20 replays (cupyq.bench's graph timer, which returns µs)
                    row[label] = _time_graph(torch, lambda i, m=model: m(ids, use_cache=False), 1, 20) / 1e3
                row["cupyq_ms_per_layer"] = row["cupyq_ms"] / args.layers
                row["fp16_ms_per_layer"] = row["fp16_ms"] / args.layers
                row["cupyq_tokens_per_s"] = batch * tokens / (row["cupyq_ms"] / 1e3)
                row["speedup_over_fp16"] = row["fp16_ms"] / row["cupyq_ms"]
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    return report


def main(argv=None) -> int:
    from cupyq.cli.arguments import _row_counts  # the same list syntax as `cupyq bench --m`

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--format", choices=("gptq", "exl2"), default="gptq")
    p.add_argument("--batches", type=_row_counts, default=[1, 8, 32, 128],
                   help="decode batch sizes, comma-separated (default 1,8,32,128)")
    p.add_argument("--prefill", type=_row_counts, default=[512, 2048],
                   help="prefill lengths, comma-separated (default 512,2048)")
    p.add_argument("--json", default=None, help="write the report to this file")
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the flow, times nothing")
    args = p.parse_args(argv)
    if args.dry_run:
        args.layers, args.batches, args.prefill = min(args.layers, 2), [1, 3], [16]
    report = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
