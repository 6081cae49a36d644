"""Tensor-parallel benchmark: per-layer time of a 70B-shaped decoder layer (Llama 3 70B: hidden 8192, MLP 28672,
64 query and 8 key/value heads of 128) sharded over the ranks of a torchrun job, for GPTQ, GPTQ act-order and
EXL2, at world size 1 (each rank the whole layer) and at the job's world size, the all-reduce timed apart.

    torchrun --nproc-per-node 2 scripts/tp_bench.py --json out/tp_bench.json
    torchrun --nproc-per-node 2 scripts/tp_bench.py --dry-run --json /tmp/tp.json   # CPU, gloo, tiny shapes

Method (GPU): every rank builds its own shard (random weights, the same seed on every rank) on its GPU; a CUDA
graph of ``iters`` products (rotating over copies of the weights so that L2 does not hold them) is replayed
``repeats`` times and the median replay time per call is ``gemm_us``. Row-parallel layers also report
``allreduce_us``, an NCCL all-reduce (SUM) of their fp16 output ``[m, N]`` timed the same way (eagerly with
CUDA events when the collective cannot be captured), and ``module_us``, the whole ``RowParallelQuantLinear``
forward (product, all-reduce, bias) in one graph. Column-parallel layers need no collective in a Llama
layer (their outputs feed the row-parallel ones). Rank 0 writes the JSON; figures are rank 0's.

``--dry-run`` runs the same code on the CPU (gloo, float32 reference path) with every dimension divided by
32 and wall-clock timing: a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

# (name, K, N, mode) of one decoder layer; K = in_features, N = out_features.
LAYERS_70B = (
    ("q_proj", 8192, 8192, "column"),
    ("k_proj", 8192, 1024, "column"),
    ("v_proj", 8192, 1024, "column"),
    ("o_proj", 8192, 8192, "row"),
    ("gate_proj", 8192, 28672, "column"),
    ("up_proj", 8192, 28672, "column"),
    ("down_proj", 28672, 8192, "row"),
)
FORMATS = ("gptq", "gptq_act", "exl2")
MS = (1, 16, 256)
DRY_RUN_DIVISOR = 32


def layer_set(divisor: int = 1):
    """The 70B layer set with every dimension divided by ``divisor`` (1: full size)."""
    return [(name, k // divisor, n // divisor, mode) for name, k, n, mode in LAYERS_70B]


def random_layer(fmt, k, n, seed):
    """Checkpoint tensors of a random ``[k, n]`` layer: GPTQ 4-bit g128 (act-order: permuted g_idx) or EXL2
    4-bit g32 with a random permutation, as cupyq.bench builds them."""
    from cupyq.bench import _random_exl2, _random_gptq

    rng = np.random.default_rng(seed)
    if fmt == "exl2":
        return _random_exl2(rng, k, n)
    return _random_gptq(rng, k, n, fmt == "gptq_act")


def rank_tensors(tensors, fmt, mode, rank, world_size):
    """The rank's shard of a layer's tensors (the whole layer for world size 1)."""
    from cupyq.distributed import shard_exl2, shard_gptq

    if fmt == "exl2":
        return shard_exl2(tensors, rank=rank, world_size=world_size, mode=mode)
    return shard_gptq(tensors, rank=rank, world_size=world_size, mode=mode, bits=4)


def qmatrix(t, fmt, in_features, device):
    """A QMatrix of shard tensors ``t`` with ``in_features`` real input rows (EXL2 row shards carry padding)."""
    from cupyq.qmatrix import QMatrix

    if fmt == "exl2":
        return QMatrix.from_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"],
                                 device=device, in_features=in_features)
    return QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4, device=device)


# ------------------------------------------------------------------------------------------------ timing
def _time_cpu(fn, iters):
    for i in range(2):
        fn(i)
    start = time.perf_counter()
    for i in range(iters):
        fn(i)
    return (time.perf_counter() - start) * 1e6 / iters


def _time_events(torch, dist, fn, iters):
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    dist.barrier()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for i in range(iters):
        fn(i)
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1000.0 / iters


def _time_gpu(torch, dist, fn, iters, repeats):
    """(µs per call, "graph") from a CUDA graph of ``iters`` calls, or (µs, "events") when capture fails."""
    from cupyq.bench import _time_graph

    dist.barrier()
    try:
        return _time_graph(torch, fn, iters, repeats), "graph"
    except RuntimeError:
        torch.cuda.synchronize()
        return _time_events(torch, dist, fn, iters), "events"


# ------------------------------------------------------------------------------------------------ run
def run(*, dry_run=False, formats=FORMATS, ms=MS, iters=20, repeats=5, rotate_bytes=256 << 20, progress=None):
    """Benchmark the layer set on the current process group; returns the rows (every rank computes them)."""
    import torch
    import torch.distributed as dist

    from cupyq import gemm
    from cupyq.distributed import RowParallelQuantLinear

    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cpu" if dry_run else torch.cuda.current_device()
    tdev = torch.device("cpu") if dry_run else torch.device("cuda", device)
    dtype = torch.float32 if dry_run else torch.float16
    layers = layer_set(DRY_RUN_DIVISOR if dry_run else 1)
    rows = []
    for fmt in formats:
        for li, (name, k, n, mode) in enumerate(layers):
            tensors = random_layer(fmt, k, n, seed=li)
            for ws in sorted({1, world}):
                k_local = k // ws if mode == "row" else k
                n_local = n // ws if mode == "column" else n
                weight_bytes = k_local * n_local // 2
                copies = 1 if dry_run else int(min(64, max(1, -(-rotate_bytes // weight_bytes))))
                shard = tensors if ws == 1 else rank_tensors(tensors, fmt, mode, rank, ws)
                qms = [qmatrix(shard, fmt, k_local, device) for _ in range(copies)]
                for m in ms:
                    x = torch.randn(m, k_local, dtype=dtype, device=tdev)
                    outs = [torch.empty(m, qms[0].out_features, dtype=dtype, device=tdev) for _ in range(copies)]

                    def product(i):
                        gemm(x, qms[i % copies], out=outs[i % copies])

                    row = dict(format=fmt, layer=name, K=k, N=n, mode=mode, world_size=ws, m=m,
                               K_local=k_local, N_local=n_local, allreduce_us=None, module_us=None)
                    if dry_run:
                        row["gemm_us"], row["timing"] = _time_cpu(product, iters), "wall"
                    else:
                        row["gemm_us"], row["timing"] = _time_gpu(torch, dist, product, iters, repeats)
                    if mode == "row" and ws > 1:
                        y = outs[0]

                        def reduce(i):
                            dist.all_reduce(y)

                        bias = torch.randn(n, dtype=dtype, device=tdev)
                        module = RowParallelQuantLinear(qms[0], bias)

                        def forward(i):
                            module(x)

                        if dry_run:
                            row["allreduce_us"] = _time_cpu(reduce, iters)
                            row["module_us"] = _time_cpu(forward, iters)
                        else:
                            row["allreduce_us"], row["allreduce_timing"] = _time_gpu(torch, dist, reduce, iters, repeats)
                            row["module_us"], row["module_timing"] = _time_gpu(torch, dist, forward, iters, repeats)
                    rows.append(row)
                    if progress and rank == 0:
                        progress(row)
                del qms, shard
    return rows


def totals(rows):
    """Per (format, world size, m): the layer set's summed product time, all-reduce time and their sum (µs)."""
    out = {}
    for r in rows:
        key = (r["format"], r["world_size"], r["m"])
        t = out.setdefault(key, dict(format=key[0], world_size=key[1], m=key[2], gemm_us=0.0, allreduce_us=0.0))
        t["gemm_us"] += r["gemm_us"]
        t["allreduce_us"] += r["allreduce_us"] or 0.0
    for t in out.values():
        t["total_us"] = t["gemm_us"] + t["allreduce_us"]
    return list(out.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here (rank 0)")
    parser.add_argument("--dry-run", action="store_true", help="CPU smoke run: gloo, reference path, tiny shapes")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {FORMATS}")
    parser.add_argument("--ms", default=",".join(map(str, MS)), help="batch sizes (rows of x)")
    parser.add_argument("--iters", type=int, default=20, help="calls per timed graph (or loop)")
    parser.add_argument("--repeats", type=int, default=5, help="graph replays; the median is reported")
    args = parser.parse_args(argv)
    formats = tuple(f for f in args.formats.split(",") if f)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        parser.error(f"--formats: unknown {bad}; expected a subset of {FORMATS}")
    ms = tuple(int(v) for v in args.ms.split(",") if v)

    import torch
    import torch.distributed as dist

    if args.dry_run:
        dist.init_process_group("gloo")
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    try:
        def show(r):
            extra = "" if r["allreduce_us"] is None else f"  all-reduce {r['allreduce_us']:9.1f}  module {r['module_us']:9.1f}"
            print(f"{r['format']:8s} {r['layer']:9s} {r['K']:5d}x{r['N']:<5d} ws={r['world_size']} m={r['m']:<4d} "
                  f"gemm {r['gemm_us']:9.1f} us{extra}", flush=True)

        rows = run(dry_run=args.dry_run, formats=formats, ms=ms, iters=args.iters, repeats=args.repeats, progress=show)
        if dist.get_rank() == 0:
            result = dict(
                world_size=dist.get_world_size(),
                backend=dist.get_backend(),
                device="cpu" if args.dry_run else torch.cuda.get_device_name(),
                dry_run=args.dry_run,
                rows=rows,
                totals=totals(rows),
            )
            for t in result["totals"]:
                print(f"layer set {t['format']:8s} ws={t['world_size']} m={t['m']:<4d} products {t['gemm_us']:9.1f} us  "
                      f"all-reduce {t['allreduce_us']:8.1f} us  total {t['total_us']:9.1f} us")
            if args.json:
                os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=1)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
