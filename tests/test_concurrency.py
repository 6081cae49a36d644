"""One QMatrix used from several CUDA streams and from several threads at once gives the single-stream results on
every kernel path, and calls made afterwards on one stream are still right.

Each stream has a workspace of its own (partial sums, tile counters, gathered activations, dequantisation
scratch), and a plan's argument slots are filled and launched under one lock, so concurrent launches cannot
see each other's state. Tolerance as in test_gpu_kernels.py (fp16 weights and output, fp32 accumulation).
"""

import threading

import numpy as np
import pytest

from cupyq import reference, rules
from test_gpu_kernels import random_gptq

pytestmark = pytest.mark.gpu

REL_TOL = 4e-3
# One batch size per path of a 4096 x 4096 layer: streaming kernel (one and two m8 tiles), the tensor-core
# kernel with its tilings (qwgmma on sm_90, else qmma; the largest through force_cuda), and the dense path.
BATCHES = {3: False, 12: False, 20: False, 48: False, 100: True, 200: False}


@pytest.fixture(scope="module")
def layer():
    import torch

    from cupyq.qmatrix import QMatrix

    rng = np.random.default_rng(31)
    k = n = 4096
    t = random_gptq(rng, k, n, bits=4, group_size=128, act_order=True)
    qm = QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4, device=0)
    w = torch.from_numpy(reference.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4)).cuda()
    kernels_used = {rules.choose_kernel(qm, m, "__half", force)[0] for m, force in BATCHES.items()}
    tensor_core = "qwgmma" if rules.wgmma_supported(qm) else "qmma"
    assert kernels_used == {"qgemv", "qgemv2", tensor_core, "dense"}
    return qm, w


def _rel(y, ref):
    return float(((y.float() - ref).norm() / ref.norm()).item())


def _run_many(qm, w, stream, seed, rounds=6):
    """Calls on ``stream`` for every batch size, several rounds; returns the worst relative error."""
    import torch

    import cupyq

    g = torch.Generator(device="cuda").manual_seed(seed)
    worst = 0.0
    with torch.cuda.stream(stream):
        cases = []
        for _ in range(rounds):
            for m, force in BATCHES.items():
                x = torch.randn(m, qm.in_features, device="cuda", dtype=torch.float16, generator=g)
                out = torch.full((m, qm.out_features), float("nan"), device="cuda", dtype=torch.float16)
                cupyq.gemm(x, qm, out=out, force_cuda=force)
                cases.append((x, out))
        stream.synchronize()
        for x, out in cases:
            worst = max(worst, _rel(out, x.float() @ w))
    return worst


def test_two_streams_alternating(layer):
    import torch

    import cupyq

    qm, w = layer
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    cases = []
    rng = torch.Generator(device="cuda").manual_seed(5)
    for _ in range(4):
        for m, force in BATCHES.items():
            for s in streams:  # the same matrix, alternately on two streams, nothing synchronised in between
                with torch.cuda.stream(s):
                    x = torch.randn(m, qm.in_features, device="cuda", dtype=torch.float16, generator=rng)
                    out = torch.full((m, qm.out_features), float("nan"), device="cuda", dtype=torch.float16)
                    cupyq.gemm(x, qm, out=out, force_cuda=force)
                    cases.append((m, x, out))
    torch.cuda.synchronize()
    worst = max(_rel(out, x.float() @ w) for _, x, out in cases)
    assert worst < REL_TOL, worst
    # afterwards, on one stream: still right (no counter or workspace was left damaged)
    assert _run_many(qm, w, torch.cuda.current_stream(), seed=9, rounds=1) < REL_TOL


def _in_threads(job, count=4):
    """Run ``job(i)`` in ``count`` threads at once; returns {i: result}, failing with every thread's error."""
    results, errors = {}, []

    def work(i):
        try:
            results[i] = job(i)
        except Exception as exc:  # reported below, with the thread's index
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(results) == count, results
    return results


def test_four_threads_each_on_its_own_stream(layer):
    import torch

    qm, w = layer
    results = _in_threads(lambda i: _run_many(qm, w, torch.cuda.Stream(), seed=100 + i))
    assert max(results.values()) < REL_TOL, results
    assert _run_many(qm, w, torch.cuda.current_stream(), seed=7, rounds=1) < REL_TOL


def test_four_threads_sharing_one_stream(layer):
    import torch

    qm, w = layer
    shared = torch.cuda.Stream()
    results = _in_threads(lambda i: _run_many(qm, w, shared, seed=200 + i, rounds=3))
    assert max(results.values()) < REL_TOL, results
