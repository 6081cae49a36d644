"""``cupyq inspect``: the layers of a checkpoint, their formats, bits, shapes and sizes."""

from __future__ import annotations

from cupyq.cli.common import EXIT_OK, UsageError, _open
from cupyq.cli.output import _emit, _human_bytes, format_table


def _bits_text(info):
    if info.format == "exl2" and info.bit_mix:
        total = sum(r for _, r in info.bit_mix)
        return " ".join(f"{b}:{100 * r / total:.0f}%" for b, r in info.bit_mix)
    return "/".join(str(b) for b in info.bits) if info.bits else "-"


def _layer_payload(info):
    return {
        "name": info.name,
        "format": info.format,
        "bits": list(info.bits) if info.bits else None,
        "bit_mix": [list(x) for x in info.bit_mix] if info.bit_mix else None,
        "bits_per_weight": info.bits_per_weight,
        "group_size": info.group_size,
        "act_order": info.act_order,
        "checkpoint_format": info.checkpoint_format,
        "in_features": info.in_features,
        "out_features": info.out_features,
        "bytes": info.nbytes,
    }


def _quant_config_payload(qc):
    if qc is None:
        return None
    return {
        "quant_method": qc.quant_method,
        "source": str(qc.source),
        "bits": qc.bits,
        "group_size": qc.group_size,
        "desc_act": qc.desc_act,
        "sym": qc.sym,
        "checkpoint_format": qc.checkpoint_format if qc.quant_method == "gptq" else None,
        "ignored_hints": sorted(qc.hints),
        "awq_version": qc.version,
        "modules_to_not_convert": list(qc.modules_to_not_convert),
    }


def cmd_inspect(args):
    if getattr(args, "explain", False):
        from cupyq.cli.explain import cmd_explain

        return cmd_explain(args)
    given = [opt for opt, key in (("--arch", "arch"), ("--m", "m"), ("--dtype", "dtype")) if getattr(args, key, None)]
    if given:
        raise UsageError(f"{', '.join(given)}: only with --explain (cupyq inspect DIR --explain {' '.join(given)} ...)")
    ckpt = _open(args.path)
    infos = [ckpt.layer_info(n) for n in ckpt.layers]
    rows = []
    for info in infos:
        rows.append(
            {
                "name": info.name,
                "format": info.format,
                "bits": _bits_text(info),
                "bpw": info.bits_per_weight,
                "group": "-" if info.group_size is None else info.group_size,
                "act": "-" if info.act_order is None else info.act_order,
                "shape": f"{info.in_features} x {info.out_features}",
                "bytes": _human_bytes(info.nbytes),
            }
        )
    quant = [i for i in infos if i.quantized]
    weights = sum(i.in_features * i.out_features for i in quant)
    totals = {
        "layers": len(infos),
        "quantized_layers": len(quant),
        "by_format": {f: sum(1 for i in infos if i.format == f) for f in sorted({i.format for i in infos})},
        "quantized_weights": weights,
        "mean_bits_per_weight": (sum(i.bits_per_weight * i.in_features * i.out_features for i in quant) / weights) if weights else None,
        "layer_bytes": sum(i.nbytes for i in infos),
        "file_bytes": sum(f.stat().st_size for f in ckpt.files),
        "files": len(ckpt.files),
    }
    qc = ckpt.quant_config
    lines = [f"{ckpt.path}: {len(ckpt.files)} safetensors file(s), {len(ckpt.tensors)} tensors"]
    if qc is not None:
        desc = f"{qc.quant_method} (from {qc.source.name}): bits {qc.bits}"
        if qc.quant_method == "gptq":
            desc += f", group_size {qc.group_size}, desc_act {qc.desc_act}, sym {qc.sym}, format {qc.checkpoint_format}"
        elif qc.quant_method == "awq":
            desc += f", group_size {qc.group_size}, zero_point {not qc.sym}, version {qc.version}"
            if qc.modules_to_not_convert:
                desc += f", modules_to_not_convert {', '.join(qc.modules_to_not_convert)}"
        if qc.hints:
            desc += f"; ignored loading hints: {', '.join(sorted(qc.hints))}"
        lines.append("quantization config: " + desc)
    else:
        lines.append("quantization config: none")
    cols = [("layer", "name"), ("format", "format"), ("bits", "bits"), ("bits/weight", "bpw"), ("group", "group"),
            ("act-order", "act"), ("in x out", "shape"), ("bytes", "bytes")]
    lines.append(format_table(rows, cols))
    by_format = ", ".join(f"{v} {k}" for k, v in totals["by_format"].items())
    mean = totals["mean_bits_per_weight"]
    lines.append(
        f"total: {totals['layers']} layers ({by_format}); {weights:,} quantized weights"
        + (f" at {mean:.3f} bits/weight" if mean else "")
        + f"; {_human_bytes(totals['layer_bytes'])} in layers, {_human_bytes(totals['file_bytes'])} on disk"
    )
    warnings_ = _zero_point_warnings(ckpt)
    lines += [f"warning: {w}" for w in warnings_]
    payload = {"path": str(ckpt.path), "quantization_config": _quant_config_payload(qc),
               "layers": [_layer_payload(i) for i in infos], "totals": totals, "warnings": warnings_}
    _emit(args, payload, "\n".join(lines))
    return EXIT_OK


def _zero_point_warnings(ckpt):
    from cupyq.checkpoint import zero_point_warnings

    return [m for msgs in zero_point_warnings(ckpt).values() for m in msgs]
