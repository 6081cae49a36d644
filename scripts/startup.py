"""Start-up cost: first use on a GPU with an empty kernel cache, then again with the cache warm.

Each measurement runs in a fresh process. After torch is imported and the test weights are made on the host,
the clock covers: import cupyq, build a 4-bit GPTQ act-order matrix and an EXL2 [8, 4] matrix (4096 x 4096 each),
compile and load every kernel they need (fp16, batches up to 64 and the dequantise path) and run one call of each.
Prints JSON {"cold_s": ..., "warm_s": ...}.
"""

import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import time
import numpy as np, torch
torch.zeros(1, device="cuda")
rng = np.random.default_rng(0)
q = rng.integers(0, 16, size=(4096, 4096), dtype=np.int64)
qweight = np.zeros((512, 4096), np.int64)
for i in range(8):
    qweight |= q[i::8] << (4 * i)
qweight = qweight.astype(np.uint32).view(np.int32)
qzeros = np.full((32, 512), 0x77777777, np.int64).astype(np.uint32).view(np.int32)
scales = np.full((32, 4096), 0.01, np.float16)
g_idx = (rng.permutation(4096) // 128).astype(np.int32)
q8 = rng.integers(0, 256, size=(1024, 4096), dtype=np.int64)
w8 = np.zeros((256, 4096), np.int64)
for i in range(4):
    w8 |= q8[i::4] << (8 * i)
q_weight = np.concatenate([w8.astype(np.uint32).view(np.int32), qweight[128:]])
groups = np.array([v for g in range(128) for v in ((8, 8 * g) if g < 32 else (4, 256 + 4 * (g - 32)))], np.int16)
q_scale = rng.integers(0, 1 << 31, size=(128, 512), dtype=np.int64).astype(np.int32)
t0 = time.perf_counter()
import cupyq, cupyq.runtime
qg = cupyq.QMatrix.from_gptq(qweight, qzeros, scales, g_idx, device=0)
qe = cupyq.QMatrix.from_exl2(q_weight, np.argsort(rng.permutation(4096)).astype(np.int32), q_scale,
                             np.full(128, 0.01, np.float16), groups, device=0)
cupyq.runtime.warmup([qg, qe], max_m=64)
x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
cupyq.gemm(x, qg); cupyq.gemm(x, qe); torch.cuda.synchronize()
print(time.perf_counter() - t0)
"""


def run(cache_dir):
    env = dict(os.environ, CUPY_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"start-up measurement failed:\n{out.stderr}")
    return float(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        cold = run(d)
        warm = run(d)
    print(json.dumps({"cold_s": round(cold, 2), "warm_s": round(warm, 2)}))
