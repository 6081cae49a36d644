"""``cupyq bench``: cupyq.bench.run_benchmark on a checkpoint's layer shapes, speed-ups over fp16; with ``--model``,
cupyq.model_bench.run_model_benchmark (a decoder model against fp16)."""

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


# Options of the model benchmark (argparse destinations; unset they are None or False).
_MODEL_OPTIONS = ("layers", "format", "batches", "prefill", "dry_run")


def cmd_bench(args):
    if args.model:
        return _cmd_model_bench(args)
    given = [f"--{name.replace('_', '-')}" for name in _MODEL_OPTIONS if getattr(args, name) not in (None, False)]
    if given:
        raise UsageError(f"{', '.join(given)}: option(s) of the model benchmark; add --model")
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


def _cmd_model_bench(args):
    layer_only = [name for name, value in (("a checkpoint path", args.path), ("--m", args.m), ("--formats", args.formats),
                                           ("--plot", args.plot)) if value]
    if layer_only:
        raise UsageError(f"--model builds its own model: {', '.join(layer_only)} (options of the layer benchmark) "
                         "cannot be given with it")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UsageError("--model needs transformers, which is not installed (pip install transformers)") from None
    if not args.dry_run:
        _require_gpu("bench --model")
    from cupyq import model_bench

    batches = _flat_lists(args.batches) or list(model_bench.DEFAULT_BATCHES)
    prefill = _flat_lists(args.prefill) or list(model_bench.DEFAULT_PREFILL)
    if args.dry_run:
        n_cases = len(model_bench.DRY_RUN_BATCHES) + len(model_bench.DRY_RUN_PREFILL)
    else:
        n_cases = len(batches) + len(prefill)
    with Progress(n_cases, "bench --model", delay=0.0) as bar:
        report = model_bench.run_model_benchmark(
            layers=args.layers or model_bench.DEFAULT_LAYERS, fmt=args.format or "gptq", batches=batches,
            prefill=prefill, dry_run=args.dry_run,
            progress=lambda row: bar.update(f"{row['case']} batch {row['batch']} x {row['tokens']} tokens"))
    cfg = report["config"]
    cols = [("case", "case"), ("batch", "batch"), ("tokens", "tokens")]
    if args.dry_run:
        cols += [("max |logit|", "max_abs_logit")]
    else:
        cols += [("fp16 ms", "fp16_ms"), ("cupyq ms", "cupyq_ms"), ("cupyq ms/layer", "cupyq_ms_per_layer"),
                 ("cupyq tokens/s", "cupyq_tokens_per_s"), ("speed-up", "speedup_over_fp16"),
                 ("fp16 eager ms", "fp16_eager_ms"), ("cupyq eager ms", "cupyq_eager_ms"),
                 ("eager speed-up", "eager_speedup_over_fp16")]
    text = (f"{report['format']} model: {cfg['layers']} decoder layer(s), hidden {cfg['hidden']}, intermediate "
            f"{cfg['intermediate']}\n" + format_table(report["rows"], cols))
    if args.dry_run:
        text += "\ndry run: a tiny model on the CPU; nothing was timed"
    _emit(args, report, text)
    return EXIT_OK
