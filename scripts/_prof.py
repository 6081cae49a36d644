import sys, numpy as np, torch
from cupyq import kernels, launch, runtime
from cupyq.bench import _random_gptq
from cupyq.qmatrix import QMatrix
rng = np.random.default_rng(0)
k, n = 8192, 28672
t = _random_gptq(rng, k, n, False)
qm = QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], device=0)
for m, key in ((16, 16), (64, 64), (128, 128)):
    cfg = kernels.QMMA_CONFIGS[key]
    plan = launch._qmma_plan(qm, m, "__half", cfg)
    print(m, cfg, "grid", plan.launcher.grid, "smem", plan.launcher.smem, flush=True)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    out = torch.empty(m, n, device="cuda", dtype=torch.float16)
    for _ in range(3):
        launch._launch_plan(qm, plan, x.data_ptr(), out.data_ptr(), m, "__half", runtime.torch_stream(0), lambda: False)
    torch.cuda.synchronize()
