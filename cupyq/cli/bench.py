"""``cupyq bench``: cupyq.bench.run_benchmark on a checkpoint's layer shapes, speed-ups over fp16."""

from __future__ import annotations

import sys

from cupyq.cli.arguments import _flat_lists
from cupyq.cli.common import EXIT_OK, UsageError, _open, _reject_row_count, _require_gpu
from cupyq.cli.output import Progress, _emit, format_table


def _speedup_rows(rows):
    """Pivot run_benchmark rows into one row per (K, N, m) with a time per impl and speed-ups over fp16."""
    table = {}
    impls = []
    for r in rows:
        if r.get("m") is None or r.get("us") is None:  # an implementation that could not run
            continue
        key = (r["K"], r["N"], r["m"])
        table.setdefault(key, {"K": r["K"], "N": r["N"], "m": r["m"]})[r["impl"]] = r["us"]
        if r["impl"] not in impls:
            impls.append(r["impl"])
    out = []
    for key in sorted(table):
        row = table[key]
        base = row.get("fp16")
        for impl in impls:
            if impl != "fp16" and base and row.get(impl):
                row[f"x_{impl}"] = base / row[impl]
        out.append(row)
    return out, impls


def _plot(rows, impls, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    shapes = sorted({(r["K"], r["N"]) for r in rows})
    for impl in impls:
        if impl == "fp16":
            continue
        for k, n in shapes:
            pts = [(r["m"], r[f"x_{impl}"]) for r in rows if (r["K"], r["N"]) == (k, n) and f"x_{impl}" in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=f"{impl} {k}x{n}")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("m (rows of x)")
    ax.set_ylabel("speed-up over fp16 matmul")
    ax.set_title("cupyq quantized GEMM vs fp16")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_bench(args):
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    if args.path:
        _reject_row_count(args.path)
    _require_gpu("bench")
    from cupyq import bench

    ms = _flat_lists(args.m)

    shapes, formats = None, _flat_lists(args.formats)
    if args.path:
        ckpt = _open(args.path)
        infos = [ckpt.layers[n] for n in ckpt.quantized_layers]
        if not infos:
            raise UsageError(f"{args.path}: no GPTQ or EXL2 layers")
        shapes = sorted({(i.in_features, i.out_features) for i in infos})
        if not formats:
            kinds = {"gptq_act" if (i.format == "gptq" and i.act_order) else i.format for i in infos}
            formats = [f for f in ("gptq", "gptq_act", "exl2", "awq") if f in kinds]
    kwargs = {"shapes": shapes, "ms": ms, "iters": args.iters, "repeats": args.repeats}
    if formats:
        kwargs["formats"] = tuple(formats)
    n_shapes = len(bench.SHAPES if shapes is None else shapes)
    n_ms = len(bench.MS if ms is None else ms)
    n_impls = len(formats or ("gptq", "gptq_act", "exl2")) + 2  # the benchmark's default formats, and baselines
    print(f"benchmarking {n_shapes} shape(s) x {n_ms} m value(s)...", file=sys.stderr)
    with Progress(n_shapes * n_ms * n_impls, "bench", delay=0.0) as bar:
        kwargs["progress"] = lambda row: bar.update(f"{row['impl']} {row['K']}x{row['N']} m={row['m']}")
        rows = bench.run_benchmark(**kwargs)
    table, impls = _speedup_rows(rows)
    cols = [("K", "K"), ("N", "N"), ("m", "m")] + [(f"{i} us", i) for i in impls]
    cols += [(f"{i} speed-up", f"x_{i}") for i in impls if i != "fp16" and any(f"x_{i}" in r for r in table)]
    text = format_table(table, cols)
    for r in rows:
        if r.get("error"):
            text += f"\n{r['impl']} {r['K']}x{r['N']} did not run: {r['error']}"
    if args.plot:
        _plot(table, impls, args.plot)
        text += f"\nwrote plot {args.plot}"
    _emit(args, {"rows": rows, "table": table}, text)
    return EXIT_OK
