"""Model-level benchmark: a Llama-3-8B-shaped decoder patched with cupyq against the same model in fp16.

The model is built by transformers from a LlamaConfig (hidden 4096, intermediate 14336, 32 heads, 8 KV heads,
``layers`` decoder layers, a 32000-token vocabulary so the embeddings stay small) with random fp16 weights.
Its linear layers are written as a checkpoint of random quantized tensors (GPTQ 4-bit, group 128, act-order; or
EXL2 at about 4.65 bits per weight: 10 % of the rows at 6 bits, 45 % at 5 and 45 % at 4, groups of 32 rows), and
``cupyq.patch_model`` loads that checkpoint into a copy of the model built on the meta device. Timed, each under
CUDA-graph replay (median of 20 replays, CUDA events, with cupyq.bench's graph timer):

* decode: one forward of ``[B, 1]`` tokens without a KV cache (the layer stack on one token per sequence), for
  every batch size B;
* prefill: one forward of ``[1, T]`` tokens for every T.

Each decode step is also timed eagerly, as a generation loop without graphs runs it: EAGER_STEPS forwards back to
back between two synchronisations, wall time per forward, in EAGER_ROUNDS rounds that alternate the fp16 and the
cupyq model (after EAGER_WARMUP forwards of each), the median round reported, so that a change in the host's
speed during the run reaches both models alike. At small batches this is bound by
host time (Python, transformers and every layer's launch), so it shows what each quantized linear costs on the
host against ``F.linear``.

Reported per case: time per step, time per decoder layer, tokens/s and the speed-up over fp16 (decode: eager
too). A dry run builds
a tiny model on the CPU and runs the whole flow without timing anything. Entry points: ``cupyq bench --model``
and ``scripts/model_bench.py`` (:func:`main`).
"""

from __future__ import annotations

import argparse
import statistics
import json
import tempfile
import time

import numpy as np

FORMATS = ("gptq", "exl2")
DEFAULT_LAYERS = 4
DEFAULT_BATCHES = (1, 8, 32, 128)
DEFAULT_PREFILL = (512, 2048)
# A dry run: at most this many layers, these decode batches and prefill lengths, on a tiny model.
DRY_RUN_LAYERS = 2
DRY_RUN_BATCHES = (1, 3)
DRY_RUN_PREFILL = (16,)
REPLAYS = 20  # CUDA-graph replays per timing, the median is kept
EAGER_WARMUP = 3  # eager forwards of each model before the timed ones
EAGER_STEPS = 10  # eager forwards timed back to back in one round
EAGER_ROUNDS = 7  # rounds per model, alternating the models; the median round is reported


def llama_config(layers: int, tiny: bool):
    """The LlamaConfig of the benchmark: Llama-3-8B shapes with ``layers`` decoder layers, or a tiny model
    (hidden 128) for a dry run on the CPU."""
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


def run_model_benchmark(*, layers: int = DEFAULT_LAYERS, fmt: str = "gptq", batches=DEFAULT_BATCHES,
                        prefill=DEFAULT_PREFILL, dry_run: bool = False, progress=None) -> dict:
    """Time the quantized model against fp16 on every decode batch and prefill length; needs a GPU, torch and
    transformers (a dry run only torch and transformers).

    layers: decoder layers (positive); fmt: ``"gptq"`` or ``"exl2"``; batches / prefill: positive ints.
    dry_run: a tiny float32 model on the CPU with at most DRY_RUN_LAYERS layers, DRY_RUN_BATCHES and
    DRY_RUN_PREFILL in place of ``batches`` and ``prefill``: one eager forward of each model per case, whose
    rows carry ``max_abs_logit`` of the quantized model instead of times. progress: optional callable, given each
    row as it is done. Returns ``{"config", "format", "rows"}``; a timed row has ``case`` ("decode" or
    "prefill"), ``batch``, ``tokens``, ``fp16_ms``, ``cupyq_ms`` (graph replay), their ``*_per_layer``,
    ``cupyq_tokens_per_s`` and ``speedup_over_fp16``; a decode row also ``fp16_eager_ms``, ``cupyq_eager_ms``
    (:func:`time_eager`) and ``eager_speedup_over_fp16``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers: expected a positive int, got {layers!r}")
    import torch
    from transformers import LlamaForCausalLM

    import cupyq
    from cupyq.bench import _time_graph

    if dry_run:
        layers, batches, prefill = min(layers, DRY_RUN_LAYERS), DRY_RUN_BATCHES, DRY_RUN_PREFILL
    device = "cpu" if dry_run else "cuda"
    dtype = torch.float32 if dry_run else torch.float16
    config = llama_config(layers, dry_run)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    report = {"config": {"layers": layers, "hidden": config.hidden_size, "intermediate": config.intermediate_size,
                         "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads},
              "format": fmt, "rows": []}
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(d, dense, fmt)
        with torch.device("meta"):
            quant = LlamaForCausalLM(config)
        cupyq.patch_model(quant, d, device=device)
    quant = quant.to(dtype=dtype).eval()
    cases = [("decode", b, 1) for b in batches] + [("prefill", 1, t) for t in prefill]
    for kind, batch, tokens in cases:
        ids = torch.randint(0, config.vocab_size, (batch, tokens), device=device)
        row = {"case": kind, "batch": batch, "tokens": tokens}
        with torch.no_grad():
            if dry_run:  # the flow only: one eager forward of each model
                row["max_abs_logit"] = float(quant(ids, use_cache=False).logits.abs().max())
                dense(ids, use_cache=False)
            else:
                for label, model in (("fp16_ms", dense), ("cupyq_ms", quant)):
                    # one step per graph, median of REPLAYS replays (the graph timer returns µs)
                    row[label] = _time_graph(torch, lambda i, m=model: m(ids, use_cache=False), 1, REPLAYS) / 1e3
                if kind == "decode":
                    row.update(time_eager({label: (lambda m=model: m(ids, use_cache=False)) for label, model in
                                           (("fp16_eager_ms", dense), ("cupyq_eager_ms", quant))},
                                          torch.cuda.synchronize))
                    row["eager_speedup_over_fp16"] = row["fp16_eager_ms"] / row["cupyq_eager_ms"]
                row["cupyq_ms_per_layer"] = row["cupyq_ms"] / layers
                row["fp16_ms_per_layer"] = row["fp16_ms"] / layers
                row["cupyq_tokens_per_s"] = batch * tokens / (row["cupyq_ms"] / 1e3)
                row["speedup_over_fp16"] = row["fp16_ms"] / row["cupyq_ms"]
        report["rows"].append(row)
        if progress is not None:
            progress(row)
    return report


def time_eager(steps: dict, synchronize, *, warmup: int = EAGER_WARMUP, per_round: int = EAGER_STEPS,
               rounds: int = EAGER_ROUNDS) -> dict:
    """Milliseconds of wall time per call of each ``steps[label]()``: ``rounds`` rounds, each timing every step in
    turn ``per_round`` times back to back between two ``synchronize()`` calls (as a decode loop without graphs
    runs: the host queues the next step while the GPU runs the last), after ``warmup`` calls of each. Returns
    {label: the median round's ms per call}."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {label: [] for label in steps}
    for _ in range(rounds):
        for label, step in steps.items():
            synchronize()
            start = time.perf_counter()
            for _ in range(per_round):
                step()
            synchronize()
            times[label].append((time.perf_counter() - start) * 1e3 / per_round)
    return {label: statistics.median(t) for label, t in times.items()}


def main(argv=None) -> int:
    """``scripts/model_bench.py``: the benchmark with its flags, a JSON line per case on stdout, the report in
    ``--json FILE``."""
    from cupyq.cli.arguments import _positive_int, _row_counts  # the list syntax of `cupyq bench --m`

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=_positive_int, default=DEFAULT_LAYERS,
                   help=f"decoder layers (default {DEFAULT_LAYERS})")
    p.add_argument("--format", choices=FORMATS, default="gptq")
    p.add_argument("--batches", type=_row_counts, default=list(DEFAULT_BATCHES),
                   help=f"decode batch sizes, comma-separated (default {','.join(map(str, DEFAULT_BATCHES))})")
    p.add_argument("--prefill", type=_row_counts, default=list(DEFAULT_PREFILL),
                   help=f"prefill lengths, comma-separated (default {','.join(map(str, DEFAULT_PREFILL))})")
    p.add_argument("--json", default=None, help="write the report to this file")
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the flow, times nothing")
    args = p.parse_args(argv)
    report = run_model_benchmark(layers=args.layers, fmt=args.format, batches=args.batches, prefill=args.prefill,
                                 dry_run=args.dry_run, progress=lambda row: print(json.dumps(row), flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0
