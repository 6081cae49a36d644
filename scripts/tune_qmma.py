"""Check and time qmma tilings, the streaming kernel and the dense path side by side (one process, GPU).

  python scripts/tune_qmma.py OUTDIR [quick] [nocheck] [only=NAME,NAME] [ms=M,M] [shapes=KxN,KxN]

Part 1 checks every candidate tiling against the float32 reference on small matrices of every storage
(fp16 and bf16, odd batch sizes, padded columns, outputs poisoned). Part 2 times, on the six benchmark shapes
(GPTQ 4-bit g128), every candidate at each batch size with CUDA-graph replay over rotating weight copies, next
to fp16 cuBLAS, and writes OUTDIR/tune.json. The tilings that win become kernels.QMMA_CONFIGS.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from cupyq import dispatch, kernels, launch, reference, rules, runtime
from cupyq.bench import _random_exl2, _random_gptq, _time_graph
from cupyq.device import torch_stream
from cupyq.plans import _qgemv_plan, _qmma_plan
from cupyq.qmatrix import QMatrix
from cupyq.quantize import quantize_exl2, quantize_gptq

K = kernels.QmmaConfig
W = kernels.WgmmaConfig
CANDIDATES = {
    "s16": K(1, 1, 1, 8, 4, 4, 2),
    "s16b": K(1, 2, 1, 4, 4, 4, 2),
    "s32": K(2, 1, 1, 8, 4, 3, 2),
    "s64": K(4, 1, 1, 8, 2, 4, 1),
    "s64w": K(4, 2, 1, 8, 2, 3, 1),
    "s64_2": K(4, 1, 1, 8, 2, 4, 2),
    "s32k2": K(2, 1, 1, 8, 2, 4, 2),
    "s16k2": K(1, 1, 1, 8, 2, 6, 2),
    "s16_8": K(1, 1, 1, 8, 2, 8, 2),
    "s32_6": K(2, 1, 1, 8, 2, 6, 2),
    "s64_3": K(4, 1, 1, 8, 2, 3, 2),
    "s64k4": K(4, 1, 1, 8, 4, 2, 2),
    "s64_6": K(4, 1, 1, 8, 2, 6, 1),
    "wg64": W(64, 2, 4),
    "wg128": W(128, 2, 4),
    "wg128k1": W(128, 1, 6),
    "wg128k1s4": W(128, 1, 4),
    "wg128k1s5": W(128, 1, 5),
    "wg64k4": W(64, 4, 3),
    "wg32": W(32, 4, 3),
    "wg32s4": W(32, 2, 6),
    "wg32k8s2": W(32, 8, 2),
    "wg16": W(16, 4, 4),
    "wg16k8s3": W(16, 8, 3),
    "wg16n2": W(16, 4, 4, 2),
    "wg16n2s6": W(16, 2, 6, 2),
    "wg32n2": W(32, 2, 4, 2),
    "wg32n2k4": W(32, 4, 3, 2),
    "wg64n2": W(64, 2, 4, 2),
    "wg64n2k4": W(64, 4, 3, 2),
    "wg128n2": W(128, 1, 6, 2),
    "wg128n2k2": W(128, 2, 3, 2),
}
CT = {"float16": "__half", "bfloat16": "__nv_bfloat16"}


def run_plan(qm, plan, x, out, ctype):
    stream = torch_stream(x.device.index)
    launch._launch_plan(qm, plan, x.data_ptr(), out.data_ptr(), x.shape[0], ctype, stream,
                          torch.cuda.is_current_stream_capturing)


def precompile(names):
    t = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: runtime.get_function(n[0], n[1], 0),
                      names))
    return time.perf_counter() - t


def layouts(rng):
    k, n = 1024, 288
    w = rng.standard_normal((k, n)).astype(np.float32)
    out = {}
    for bits, act in ((4, False), (4, True), (8, False), (3, True), (2, False)):
        g = quantize_gptq(w, bits=bits, group_size=32 if act else 128, sym=False, act_order=act)
        qm = QMatrix.from_gptq(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], bits=bits, device=0)
        ref = reference.dequantize_gptq(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], bits=bits)
        out[f"gptq{bits}{'_act' if act else ''}"] = (qm, ref)
    for mix, prop in (((8, 4), (0.3, 0.7)), ((6, 5), (0.5, 0.5)), ((5, 4, 3), (0.3, 0.3, 0.4)), ((3, 2), (0.5, 0.5))):
        e = quantize_exl2(w, bits=mix, proportions=prop)
        qm = QMatrix.from_exl2(e["q_weight"], e["q_invperm"], e["q_scale"], e["q_scale_max"], e["q_groups"], device=0)
        ref = reference.dequantize_exl2(e["q_weight"], e["q_invperm"], e["q_scale"], e["q_scale_max"], e["q_groups"])
        out["exl2_" + "_".join(map(str, mix))] = (qm, ref)
    return out


def check(rng, report):
    mats = layouts(rng)
    names = set()
    for qm, _ in mats.values():
        h8, h4 = qm.layout.chunks8 > 0, qm.layout.chunks4 > 0
        zr = rules.scale_rows_per_chunk(qm)
        for cfg in CANDIDATES.values():
            for dt in CT.values():
                names.add(("qwgmma.cu" if isinstance(cfg, W) else "qmma.cu", cfg.name(dt, zr, h8, h4)))
            names.add(("qmma.cu", kernels.dequant_t_name("__half", h8, h4)))
    report["compile_check_s"] = precompile(sorted(names))
    worst = {}
    for lname, (qm, wref) in mats.items():
        for dtn, ct in CT.items():
            dt = getattr(torch, dtn)
            for m in (9, 16, 17, 31, 33, 64, 77, 128, 129, 200, 300):
                x = torch.randn(m, qm.in_features, device="cuda", dtype=torch.float32)
                xq = x.to(dt)
                yref = xq.float().cpu().numpy() @ wref
                for cname, cfg in CANDIDATES.items():
                    try:
                        plan = _qmma_plan(qm, m, ct, cfg)
                    except ValueError:
                        continue
                    out = torch.full((m, qm.out_features), float("nan"), device="cuda", dtype=dt)
                    run_plan(qm, plan, xq, out, ct)
                    torch.cuda.synchronize()
                    y = out.float().cpu().numpy()
                    err = float(np.linalg.norm(y - yref) / np.linalg.norm(yref)) if np.isfinite(y).all() else 1e9
                    key = (lname, dtn, cname)
                    worst[key] = max(worst.get(key, 0.0), err)
    bad = {"/".join(k): v for k, v in worst.items() if v > (2e-3 if k[1] == "float16" else 1.5e-2)}
    report["check_worst"] = {"/".join(k): v for k, v in worst.items()}
    report["check_bad"] = bad
    print(f"check: {len(worst)} (layout, dtype, tiling) cases, {len(bad)} over tolerance", flush=True)
    for k, v in sorted(bad.items())[:40]:
        print("  BAD", k, v)
    worst_by = {}
    for (lname, dtn, cname), v in worst.items():
        worst_by[dtn] = max(worst_by.get(dtn, 0.0), v)
    print("  worst rel err by dtype:", worst_by, flush=True)
    # dense path (dequant_t + cuBLAS) and the default dispatch
    for lname, (qm, wref) in mats.items():
        for m in (65, 300):
            x = torch.randn(m, qm.in_features, device="cuda", dtype=torch.float16)
            yref = x.float().cpu().numpy() @ wref
            y = dispatch.gemm(x, qm).float().cpu().numpy()
            err = float(np.linalg.norm(y - yref) / np.linalg.norm(yref))
            report.setdefault("dense_check", {})[f"{lname}/{m}"] = err
            if not err < 2e-3:
                print("  BAD dense", lname, m, err)


def timing(rng, report, quick, ms=None, shapes=None):
    all_shapes = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]
    all_ms = [1, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    if quick:
        all_shapes = [(4096, 4096), (8192, 28672)]
        all_ms = [8, 16, 32, 64, 128, 256, 1024]
    shapes = shapes or all_shapes
    ms = ms or all_ms
    rows = []
    for (k, n) in shapes:
        t = _random_gptq(rng, k, n, False)
        bytes_per = k * n // 2
        copies = int(min(48, max(2, -(-320e6 // bytes_per))))
        qms = [QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], device=0) for _ in range(copies)]
        wd = [torch.randn(k, n, device="cuda", dtype=torch.float16) for _ in range(int(max(2, -(-320e6 // (k * n * 2)))))]
        tq = _random_gptq(rng, k, n, True)
        qact = [QMatrix.from_gptq(tq["qweight"], tq["qzeros"], tq["scales"], tq["g_idx"], device=0)
                for _ in range(copies)]
        te = _random_exl2(rng, k, n)
        qex = [QMatrix.from_exl2(te["q_weight"], te["q_invperm"], te["q_scale"], te["q_scale_max"], te["q_groups"],
                                 device=0) for _ in range(copies)]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            outs = torch.empty(m, n, device="cuda", dtype=torch.float16)
            iters = 20 if m <= 256 else 6
            row = {"K": k, "N": n, "m": m}
            row["fp16"] = _time_graph(torch, lambda i: torch.mm(x, wd[i % len(wd)], out=outs), iters, 7)
            cands = {}
            if m <= 16:
                cands["gemv"] = None
            for cname, cfg in CANDIDATES.items():
                if m <= 8 and cfg.m_tile > 16:
                    continue
                if cfg.m_tile > 4 * max(m, 16) or m > 8 * cfg.m_tile or (m >= 1024 and cfg.m_tile < 128):
                    continue
                cands[cname] = cfg
            for cname, cfg in cands.items():
                if cfg is None:
                    plans = [_qgemv_plan(q, m, "__half") for q in qms]
                else:
                    plans = [_qmma_plan(q, m, "__half", cfg) for q in qms]
                row[cname] = _time_graph(
                    torch, lambda i: run_plan(qms[i % copies], plans[i % copies], x, outs, "__half"), iters, 7)
            if m >= 64:
                ops = [dispatch._TorchDense(q, "__half", torch.float16) for q in qms[:2]]
                row["dense"] = _time_graph(torch, lambda i: dispatch._dense(
                    x, outs, qms[i % 2], "__half", torch_stream(0), ops[i % 2],
                    torch.cuda.is_current_stream_capturing), iters, 7)
                wt = [torch.empty(n, k, device="cuda", dtype=torch.float16) for _ in range(2)]
                row["fp16_nt"] = _time_graph(torch, lambda i: torch.mm(x, wt[i % 2].t(), out=outs), iters, 7)
            best = min((v, c) for c, v in row.items() if c not in ("K", "N", "m", "fp16", "fp16_nt") and v)
            row["best"] = best[1]
            # act-order and EXL2 on the best qmma tiling (gather + same kernel)
            bc = cands.get(best[1]) if best[1] in cands else None
            if bc is not None and m in (16, 64, 256):
                for tag, group in (("act", qact), ("exl2", qex)):
                    try:
                        plans = [_qmma_plan(q, m, "__half", bc) for q in group]
                    except ValueError:  # the tiling does not fit this layout's shared memory (scale rows)
                        continue
                    row[tag] = _time_graph(torch, lambda i: run_plan(group[i % copies], plans[i % copies], x, outs,
                                                                    "__half"), iters, 7)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del qms, wd, qact, qex
        torch.cuda.empty_cache()
    # dequant_t alone on the big shape
    report["rows"] = rows


def _option(name):
    for a in sys.argv[2:]:
        if a.startswith(name + "="):
            return a.split("=", 1)[1].split(",")
    return None


def main():
    out = sys.argv[1]
    quick = "quick" in sys.argv
    only = _option("only")
    if only:  # a subset of the candidates, in the given order
        for name in list(CANDIDATES):
            if name not in only:
                del CANDIDATES[name]
    ms = [int(v) for v in _option("ms") or []]
    shapes = [tuple(int(d) for d in v.split("x")) for v in _option("shapes") or []]
    rng = np.random.default_rng(0)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    if "nocheck" not in sys.argv:
        check(rng, report)
    json.dump(report, open(f"{out}/tune.json", "w"), indent=1)
    timing(rng, report, quick, ms, shapes)
    json.dump(report, open(f"{out}/tune.json", "w"), indent=1)
    print("\nK N m | fp16 fp16_nt | " + " ".join(CANDIDATES) + " gemv dense | best")
    for r in report["rows"]:
        vals = " ".join(f"{r[c]:.1f}" if r.get(c) else "-" for c in ["fp16_nt"] + list(CANDIDATES) + ["gemv", "dense"])
        print(f"{r['K']} {r['N']} {r['m']} | {r['fp16']:.1f} | {vals} | {r['best']} act={r.get('act')} exl2={r.get('exl2')}")


if __name__ == "__main__":
    main()
