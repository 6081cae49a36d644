"""Kernel benchmark: cupyq GPTQ / EXL2 against fp16 matmul and torch's int4 kernel.

Method: every call uses the next of several copies of the weights (rotating over at least ``rotate_bytes``, so
the 60 MB L2 never holds them). Two figures per (K, N, m, implementation):

* ``us``, kernel time per call: the GPU time of every kernel one call launches, summed by the torch profiler
  (CUDA activity) over ``iters`` eager calls after 10 warm-up calls, divided by ``iters``. Host launch gaps are
  excluded. This is how the original runtime's figures in ``UPSTREAM_US`` were taken.
* ``graph_us``: a CUDA graph of ``iters`` calls replayed ``repeats`` times, median replay time (CUDA events)
  divided by ``iters``; it also counts the gaps between graph nodes, so it bounds the kernel time from above.

``iters // 4`` calls for m > 256. Host overhead of eager calls is measured separately (:func:`host_overhead`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]

# Recorded figures of other runtimes (same method, same GPU model): benchmarks/recorded_peers.json, shipped as the
# package data of cupyq.benchmarks.
RECORDED_PEERS_FILE = "recorded_peers.json"


def _recorded_peers_path():
    here = Path(__file__).resolve().parent
    tried = []
    for folder in (here / "benchmarks", here.parent / "benchmarks"):  # an installed wheel; a source checkout
        path = folder / RECORDED_PEERS_FILE
        if path.is_file():
            return path
        tried.append(str(path))
    raise FileNotFoundError(f"{RECORDED_PEERS_FILE} not found; looked in: {', '.join(tried)}")


def recorded_peers() -> dict:
    """The recorded peer figures: {recording: {impl: {(K, N): {m: µs}}}} (ints K, N, m; float µs per call).

    Recordings are named "<runtime>-<date>" (e.g. "marlin-2026-12-01"); impl uses this module's names ("gptq",
    "gptq_act", "exl2"). The file's "about" and each recording's "runtime", "date" and "setup" describe them.
    """
    with open(_recorded_peers_path(), encoding="utf-8") as f:
        doc = json.load(f)
    out = {}
    for name, rec in doc["recordings"].items():
        out[name] = {impl: {tuple(int(v) for v in shape.split("x")): {int(m): float(us) for m, us in cells.items()}
                            for shape, cells in shapes.items()}
                     for impl, shapes in rec["us"].items()}
    return out


# The original ExLlama v2 runtime (0.3.2, built from source) on one H200 with torch 2.11 / CUDA 13, summed
# kernel time per call from the torch profiler (µs): {(K, N): {m: (GPTQ group 128, GPTQ act-order, EXL2 all
# 4-bit g32)}}, the recording "exllamav2-2026-11-28" of recorded_peers().
UPSTREAM_RECORDING = "exllamav2-2026-11-28"
UPSTREAM_IMPLS = ("gptq", "gptq_act", "exl2")


def _upstream_us():
    rec = recorded_peers()[UPSTREAM_RECORDING]
    return {shape: {m: tuple(rec[impl][shape][m] for impl in UPSTREAM_IMPLS) for m in cells}
            for shape, cells in rec[UPSTREAM_IMPLS[0]].items()}


UPSTREAM_US = _upstream_us()

# The formats run_benchmark times; "gptq_bf16" is "gptq" with bfloat16 activations, the others take float16.
FORMATS = ("gptq", "gptq_act", "exl2", "awq", "gptq_bf16")
_BF16_FORMATS = ("gptq_bf16",)
# Small layers would need thousands of copies to exceed rotate_bytes; past this many they are timed from L2.
_MAX_COPIES = 64


def _random_gptq(rng, k, n, act_order):
    from cupyq.formats import gptq as G

    groups = k // 128
    q = rng.integers(0, 16, size=(k, n), dtype=np.int64)
    zeros = rng.integers(1, 15, size=(groups, n))
    t = dict(
        qweight=G.pack_qweight(q, 4),
        qzeros=G.pack_qzeros(zeros, 4),
        scales=(rng.uniform(0.5, 1.5, size=(groups, n)) * 0.003).astype(np.float16),
        g_idx=((rng.permutation(k) if act_order else np.arange(k)) // 128).astype(np.int32),
    )
    return t


def _random_exl2(rng, k, n):
    from cupyq.formats import exl2 as E

    groups = k // 32
    q = rng.integers(0, 16, size=(k, n), dtype=np.int64)
    q_weight, q_groups = E.pack_q_weight(q, [4] * groups, [32] * groups)
    return dict(
        q_weight=q_weight,
        q_invperm=np.argsort(rng.permutation(k)).astype(np.int32),
        q_scale=E.encode_scale_codes(rng.integers(0, 16, size=(groups, n))),
        q_scale_max=(rng.uniform(0.5, 1.5, size=groups) * 0.003).astype(np.float16),
        q_groups=q_groups,
    )


def _random_awq(rng, k, n):
    from cupyq.formats import awq as A

    groups = k // 128
    return dict(
        qweight=A.pack_qweight(rng.integers(0, 16, size=(k, n))),
        qzeros=A.pack_qzeros(rng.integers(0, 16, size=(groups, n))),
        scales=(rng.uniform(0.5, 1.5, size=(groups, n)) * 0.003).astype(np.float16),
    )


def _make_qmatrices(impl, k, n, copies, rng, device):
    from cupyq.qmatrix import QMatrix

    if impl == "awq":
        t = _random_awq(rng, k, n)
        return [QMatrix.from_awq(t["qweight"], t["qzeros"], t["scales"], group_size=128, device=device)
                for _ in range(copies)]
    if impl in ("gptq", "gptq_act", "gptq_bf16"):
        t = _random_gptq(rng, k, n, impl == "gptq_act")
        return [QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], device=device)
                for _ in range(copies)]
    t = _random_exl2(rng, k, n)
    return [QMatrix.from_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"],
                              device=device) for _ in range(copies)]


def _int4_weights(torch, k, n, copies, device):
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
    packed = torch.ops.aten._convert_weight_to_int4pack(w, 8)
    sz = (torch.rand(k // 128, n, 2, device=device) * 0.01).to(torch.bfloat16)
    return [(packed.clone(), sz.clone()) for _ in range(copies)]


def _time_graph(torch, fn, iters, repeats):
    """Median µs per call of ``fn(i)`` for i in range(iters), captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(min(iters, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(iters):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / iters)
    del g
    return float(np.median(times))


def _time_kernels(torch, fn, iters, warmup=10):
    """Summed GPU kernel time per call (µs) of ``fn(i)`` over ``iters`` eager calls, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(iters):
            fn(i)
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    total = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == cuda)
    return total / iters


def run_benchmark(shapes=None, ms=None, *, formats=("gptq", "gptq_act", "exl2"), baselines=("fp16", "int4"),
                  iters=40, repeats=5, rotate_bytes=256 << 20, device=0, progress=None):
    """Time cupyq and baselines; returns rows {"K", "N", "m", "impl", "us", "graph_us"} (plus "upstream_us"
    where known), times in µs per call (see the module docstring).

    formats: any of :data:`FORMATS`: "gptq" (4-bit, group 128), "gptq_act" (the same with act-order), "awq" (4-bit,
    group 128, zero points), "exl2" (all 4-bit, groups of 32, random row permutation), "gptq_bf16" ("gptq" with
    bfloat16 activations and output; every other format and fp16 take float16 x [m, K]); baselines: "fp16"
    (torch.matmul) and "int4" (torch's _weight_int4pack_mm, bf16, group 128). Needs torch with CUDA and a GPU.
    """
    import torch

    import cupyq

    shapes = SHAPES if shapes is None else [tuple(s) for s in shapes]
    ms = MS if ms is None else list(ms)
    rng = np.random.default_rng(0)
    rows = []
    dev = torch.device("cuda", device)
    for k, n in shapes:
        xs = {m: torch.randn(m, k, device=dev, dtype=torch.float16) for m in ms}
        for impl in tuple(formats) + tuple(baselines):
            if impl in FORMATS:
                copies = min(_MAX_COPIES, max(1, -(-rotate_bytes // (k * n // 2))))
                qms = _make_qmatrices(impl, k, n, copies, rng, device)
                bf16 = impl in _BF16_FORMATS
                for qm in qms:
                    qm.warmup(max_m=max(ms), dtypes=("bfloat16",) if bf16 else ("float16",))
                xq = {m: x.to(torch.bfloat16) for m, x in xs.items()} if bf16 else xs
                fn_of = lambda m: (lambda i: cupyq.gemm(xq[m], qms[i % len(qms)]))  # noqa: E731
            elif impl == "fp16":
                copies = min(_MAX_COPIES, max(1, -(-rotate_bytes // (k * n * 2))))
                ws = [torch.randn(k, n, device=dev, dtype=torch.float16) for _ in range(copies)]
                fn_of = lambda m: (lambda i: torch.matmul(xs[m], ws[i % len(ws)]))  # noqa: E731
            elif impl == "int4":
                copies = min(_MAX_COPIES, max(1, -(-rotate_bytes // (k * n // 2))))
                try:
                    w4 = _int4_weights(torch, k, n, copies, dev)
                except Exception as exc:  # the op is optional in some torch builds
                    rows.append({"K": k, "N": n, "m": None, "impl": impl, "us": None, "error": str(exc)})
                    continue
                xb = {m: x.to(torch.bfloat16) for m, x in xs.items()}
                fn_of = lambda m: (lambda i: torch.ops.aten._weight_int4pack_mm(  # noqa: E731
                    xb[m], w4[i % len(w4)][0], 128, w4[i % len(w4)][1]))
            else:
                raise ValueError(f"impl: unknown implementation {impl!r}")
            for m in ms:
                if impl == "int4" and m > 256:  # a GEMV design: 1-65 ms per call beyond this, not a contender
                    continue
                calls = iters if m <= 256 else max(4, iters // 4)
                us = _time_kernels(torch, fn_of(m), calls)
                graph_us = _time_graph(torch, fn_of(m), calls, repeats)
                row = {"K": k, "N": n, "m": m, "impl": impl, "us": round(us, 2), "graph_us": round(graph_us, 2)}
                if impl in UPSTREAM_IMPLS and (k, n) in UPSTREAM_US and m in UPSTREAM_US[(k, n)]:
                    row["upstream_us"] = UPSTREAM_US[(k, n)][m][UPSTREAM_IMPLS.index(impl)]
                rows.append(row)
                if progress:
                    progress(row)
            if impl in FORMATS:
                for qm in qms:
                    qm.close()
                del qms
            torch.cuda.empty_cache()
    return rows


def host_overhead(k=4096, n=4096, m=1, calls=2000, device=0) -> dict:
    """Median host µs per eager ``cupyq.gemm`` call (torch tensors) on a small layer, and per tiny torch op."""
    import torch

    import cupyq

    rng = np.random.default_rng(1)
    t = _random_gptq(rng, k, n, False)
    qm = cupyq.QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], device=device)
    x = torch.randn(m, k, device=f"cuda:{device}", dtype=torch.float16)
    out = torch.empty(m, n, device=f"cuda:{device}", dtype=torch.float16)
    for _ in range(50):
        cupyq.gemm(x, qm, out=out)
    torch.cuda.synchronize()
    res = {}
    for label, fn in (("gemm_out", lambda: cupyq.gemm(x, qm, out=out)), ("gemm_alloc", lambda: cupyq.gemm(x, qm)),
                      ("torch_add_", lambda: x.add_(0))):
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls // 5):
                fn()
            samples.append((time.perf_counter() - t0) / (calls // 5) * 1e6)
            torch.cuda.synchronize()
        res[label] = round(float(np.median(samples)), 2)
    return res


def summarize(rows) -> str:
    """Markdown table: one line per (shape, m) with every implementation's µs and cupyq's speed-ups."""
    by = {}
    for r in rows:
        if r.get("m") is None:
            continue
        by.setdefault((r["K"], r["N"], r["m"]), {})[r["impl"]] = r
    impls = [i for i in FORMATS + ("fp16", "int4") if any(i in v for v in by.values())]
    head = ["K×N", "m"] + [f"{i} µs" for i in impls] + ["upstream gptq/act/exl2 µs", "gptq vs upstream",
                                                        "exl2 vs upstream", "gptq vs fp16"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (k, n, m), v in sorted(by.items()):
        cells = [f"{k}×{n}", str(m)] + [f"{v[i]['us']:.1f}" if i in v and v[i]["us"] is not None else "-"
                                        for i in impls]
        up = UPSTREAM_US.get((k, n), {}).get(m)
        cells.append("/".join(f"{u:.1f}" for u in up) if up else "-")

        def ratio(a, b):
            return f"{b / a:.2f}×" if a and b else "-"

        cells.append(ratio(v.get("gptq", {}).get("us"), up[0] if up else None))
        cells.append(ratio(v.get("exl2", {}).get("us"), up[2] if up else None))
        cells.append(ratio(v.get("gptq", {}).get("us"), v.get("fp16", {}).get("us")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    import argparse

    from cupyq.cli.arguments import _flat_lists, _row_counts

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=None, help="comma list KxN (default: the six standard shapes)")
    p.add_argument("--ms", "--m", dest="ms", type=_row_counts, action="append", metavar="M[,M...]",
                   help="rows of x: a comma-separated list or the option repeated, --ms 1,16 or --ms 1 --ms 16; --m is "
                        "the same option, as in `cupyq bench` (default: 1,2,4,...,4096)")
    p.add_argument("--formats", default="gptq,gptq_act,exl2",
                   help=f"comma list of {', '.join(FORMATS)} (default: gptq,gptq_act,exl2)")
    p.add_argument("--baselines", default="fp16,int4", help="comma list; '' for none")
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--json", default=None, help="write rows to this JSON file")
    p.add_argument("--markdown", default=None, help="write the summary table to this file")
    a = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")] if a.shapes else None
    ms = _flat_lists(a.ms)
    formats = [f for f in a.formats.split(",") if f]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        p.error(f"--formats: expected names of {', '.join(FORMATS)}; got {', '.join(map(repr, unknown))}")
    rows = run_benchmark(shapes, ms, formats=formats,
                         baselines=[b for b in a.baselines.split(",") if b], iters=a.iters,
                         progress=lambda r: print(json.dumps(r), flush=True))
    host = host_overhead()
    result = {"rows": rows, "host_us": host}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    table = summarize(rows)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(table + "\n")
    print(table)
    print("host µs per eager call:", host)


if __name__ == "__main__":
    main()
