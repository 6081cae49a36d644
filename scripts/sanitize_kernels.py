"""Run every dispatched kernel variant once on small matrices and check it against the float32 reference.

Meant to run under compute-sanitizer (scripts/gpu_check.sh SANITIZE=1 runs it with memcheck and racecheck):
small shapes, padded columns, odd batch sizes, fp16 and bf16, every storage (4-bit, 8-bit, mixed), the
streaming kernel (one and two m8 tiles), the tiling gemm dispatches and, launched directly, every tiling of
kernels.QMMA_CONFIGS and (on sm_90) kernels.WGMMA_CONFIGS, each with stream-K partial sums on the narrow
matrices and whole tiles on the wide one (with frag_x / frag_xw, which write their activations), the dense
path (gather + transposed dequantisation + cuBLAS) and the dequantise kernel. Exits 1 on a wrong result.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

import cupyq
from cupyq import kernels, launch, plans, reference, rules
from cupyq.device import torch_stream
from cupyq.qmatrix import QMatrix
from cupyq.quantize import quantize_exl2, quantize_gptq


def _check_tilings(name, qm, wref, dtype, tol) -> int:
    """Every tiling of the tensor-core kernels this device runs, launched directly on ``qm``, at a batch of a
    partial tile and one of several m blocks; returns how many were wrong."""
    ctype = kernels.CTYPES[str(dtype).removeprefix("torch.")]
    configs = list(kernels.QMMA_CONFIGS.values())
    if rules.wgmma_supported(qm):
        configs += list(kernels.WGMMA_CONFIGS.values())
    bad = 0
    for cfg in configs:
        for m in (cfg.m_tile - 3, 2 * cfg.m_tile + 5):
            try:
                plan = plans._qmma_plan(qm, m, ctype, cfg)
            except ValueError:  # more shared memory than a CTA may have for this layout
                continue
            x = torch.randn(m, qm.in_features, device="cuda", dtype=dtype)
            out = torch.full((m, qm.out_features), float("nan"), device="cuda", dtype=dtype)
            launch._launch_plan(qm, plan, x.data_ptr(), out.data_ptr(), m, ctype, torch_stream(0),
                                torch.cuda.is_current_stream_capturing)
            torch.cuda.synchronize()
            y = out.float().cpu().numpy()
            ref = x.float().cpu().numpy() @ wref
            err = np.linalg.norm(y - ref) / np.linalg.norm(ref) if np.isfinite(y).all() else np.inf
            if not err < tol:
                bad += 1
                print(f"BAD {name} {dtype} {plan.kernel} m={m}: {err}")
    return bad


def main() -> int:
    rng = np.random.default_rng(7)
    k, n = 512, 160
    w = rng.standard_normal((k, n)).astype(np.float32)
    mats = []
    g = quantize_gptq(w, bits=4, group_size=128, sym=False, act_order=False)
    mats.append(("gptq4", QMatrix.from_gptq(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], bits=4, device=0),
                 reference.dequantize_gptq(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], bits=4)))
    g = quantize_gptq(w, bits=8, group_size=32, sym=False, act_order=True)
    mats.append(("gptq8_act", QMatrix.from_gptq(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], bits=8, device=0),
                 reference.dequantize_gptq(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], bits=8)))
    e = quantize_exl2(w, bits=(8, 4), proportions=(0.5, 0.5))
    args = (e["q_weight"], e["q_invperm"], e["q_scale"], e["q_scale_max"], e["q_groups"])
    mats.append(("exl2_8_4", QMatrix.from_exl2(*args, device=0), reference.dequantize_exl2(*args)))
    # Wide and shallow: few K steps per tile and many tiles, so CTAs own whole tiles.
    wide = rng.standard_normal((256, 4096)).astype(np.float32)
    g = quantize_gptq(wide, bits=4, group_size=128, sym=False, act_order=False)
    mats.append(("gptq4_wide", QMatrix.from_gptq(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], bits=4,
                                                 device=0),
                 reference.dequantize_gptq(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], bits=4)))
    ms = sorted({1, 12, 17, 33, 40} | {lim + 1 for lim in kernels.QMMA_CONFIGS}
                | {cfg.m_tile + 1 for cfg in kernels.WGMMA_CONFIGS.values()}
                | {200})
    bad = 0
    for name, qm, wref in mats:
        for dtype, tol in ((torch.float16, 3e-3), (torch.bfloat16, 2e-2)):
            for m in ms:
                x = torch.randn(m, qm.in_features, device="cuda", dtype=dtype)
                ref = x.float().cpu().numpy() @ wref
                for force in (False, True):
                    out = torch.full((m, qm.out_features), float("nan"), device="cuda", dtype=dtype)
                    cupyq.gemm(x, qm, out=out, force_cuda=force)
                    torch.cuda.synchronize()
                    y = out.float().cpu().numpy()
                    err = np.linalg.norm(y - ref) / np.linalg.norm(ref) if np.isfinite(y).all() else np.inf
                    if not err < tol:
                        bad += 1
                        print(f"BAD {name} {dtype} m={m} force_cuda={force}: {err}")
            bad += _check_tilings(name, qm, wref, dtype, tol)
        d = qm.dequantize().get().astype(np.float32)  # CuPy [K, N] float16 (built from NumPy arrays)
        if not np.abs(d - wref).max() <= 2e-3 * np.abs(wref).max():
            bad += 1
            print(f"BAD {name} dequantize")
    print(f"sanitize_kernels: {len(mats)} matrices, batch sizes {ms}, {bad} wrong")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
