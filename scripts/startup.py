"""Start-up cost: first use on a GPU with an empty kernel cache, then again with the cache warm.

Each measurement runs in a fresh process: import cupyq, build a 4-bit GPTQ act-order matrix and an EXL2 [8, 4]
matrix, compile and load every kernel they need (fp16, batches up to 64 and the dequantise path), run one call.
Prints JSON {"cold_s": ..., "warm_s": ...}.
"""

import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import time
t0 = time.perf_counter()
import numpy as np, torch, cupyq, cupyq.runtime
from cupyq import bench
rng = np.random.default_rng(0)
g = bench._random_gptq(rng, 4096, 4096, True)
qg = cupyq.QMatrix.from_gptq(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], device=0)
from cupyq.formats import exl2 as E
q = rng.integers(0, 16, size=(4096, 4096))
q[:1024] = rng.integers(0, 256, size=(1024, 4096))
w, groups = E.pack_q_weight(q, [8] * 32 + [4] * 96, [32] * 128)
qe = cupyq.QMatrix.from_exl2(w, np.arange(4096, dtype=np.int32), E.encode_scale_codes(rng.integers(0, 16, (128, 4096))),
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
