"""``cupyq inspect DIR --explain``: the kernel each quantized layer gets for each batch size, and the rule's
reason, worked out on the CPU for a named architecture (:mod:`cupyq.explain`)."""

from __future__ import annotations

from cupyq.cli.arguments import _flat_lists
from cupyq.cli.common import EXIT_OK, _open
from cupyq.cli.output import _emit, format_table

DEFAULT_MS = (1, 16, 64, 256, 1024)
DEFAULT_ARCH = (9, 0)  # without a visible GPU


def _default_arch():
    """(compute capability, note): the current GPU's, or DEFAULT_ARCH with a note saying why."""
    from cupyq import device

    reason = device.gpu_unavailable_reason()
    if reason is None:
        return device.compute_capability(_current_device()), None
    from cupyq.explain import arch_name

    name = arch_name(DEFAULT_ARCH)
    return DEFAULT_ARCH, f"no GPU visible, so {name} is assumed (--arch picks another): {reason}"


def _current_device() -> int:
    import cupy

    return cupy.cuda.runtime.getDevice()


def _bits_text(info):
    if info.bit_mix:
        return "+".join(str(b) for b, _ in info.bit_mix)
    return "/".join(str(b) for b in info.bits)


def cmd_explain(args):
    from cupyq.explain import arch_name, explain_layer, layer_shape

    ckpt = _open(args.path)
    ms = _flat_lists(args.m) or list(DEFAULT_MS)
    dtype = args.dtype or "float16"
    notes = []
    if args.arch is not None:
        cc, source = args.arch, "option"
    else:
        cc, note = _default_arch()
        source = "gpu" if note is None else "default"
        notes += [note] if note else []
    arch = arch_name(cc)
    infos = [ckpt.layer_info(n) for n in ckpt.layers]
    dense = [i.name for i in infos if not i.quantized]
    if dense:
        notes.append(f"{len(dense)} plain layer(s) stay dense and are not listed: {', '.join(dense)}")
    layers, rows, reasons = [], [], {}
    for info in (i for i in infos if i.quantized):
        read = ".q_groups" if info.format == "exl2" else ".g_idx" if info.name + ".g_idx" in ckpt.tensors else ""
        shape = ckpt._wrap(info.name + read, lambda: layer_shape(ckpt, info.name))
        choices = explain_layer(shape, ms, dtype, cc)
        layers.append({
            "name": info.name, "format": info.format, "bits": list(info.bits),
            "bit_mix": [list(x) for x in info.bit_mix] if info.bit_mix else None,
            "in_features": info.in_features, "out_features": info.out_features,
            "padded_rows": shape.padded_rows, "padded_cols": shape.padded_cols,
            "chunks8": shape.chunks8, "chunks4": shape.chunks4,
            "kernels": [{"m": m, "kernel": k, "reason": r} for m, k, r in choices],
        })
        row = {"name": info.name, "shape": f"{info.in_features} x {info.out_features}",
               "format": f"{info.format} {_bits_text(info)}"}
        for m, kernel, reason in choices:
            number = reasons.setdefault(reason, len(reasons) + 1)
            row[f"m{m}"] = f"{kernel} [{number}]"
        rows.append(row)
    cols = [("layer", "name"), ("in x out", "shape"), ("format/bits", "format")] + [(f"m={m}", f"m{m}") for m in ms]
    lines = [f"{ckpt.path}: kernels for {dtype} activations on {arch} (the dispatch rules, worked out on the CPU)"]
    lines.append(format_table(rows, cols) if rows else "no quantized layers")
    lines += [f"[{n}] {r}" for r, n in reasons.items()]
    lines += [f"note: {n}" for n in notes]
    payload = {"path": str(ckpt.path), "arch": arch, "compute_capability": list(cc), "arch_source": source,
               "dtype": dtype, "m": ms, "layers": layers, "dense_layers": dense, "notes": notes}
    _emit(args, payload, "\n".join(lines))
    return EXIT_OK
