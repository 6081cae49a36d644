"""Small-batch profiling helper: times cupyq.gemm for one shape and batch, and a plain streaming-read kernel
over the same number of bytes, so the quantized kernel can be compared with what the memory system gives.

    python scripts/profile_gemv.py --shape 8192x28672 --m 1 --format gptq [--calls 20]

Run it under ``ncu -k regex:qgemv`` (batches of up to 16 rows) or ``regex:qgemm`` to profile the GEMM kernel
alone.
"""

from __future__ import annotations

import argparse

import numpy as np

_READ_SRC = r"""
extern "C" __global__ void stream_read(const uint4* __restrict__ p, size_t n, unsigned* __restrict__ sink) {
    unsigned acc = 0;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        uint4 a = __ldg(p + i), b = __ldg(p + i + stride), c = __ldg(p + i + 2 * stride), d = __ldg(p + i + 3 * stride);
        acc ^= a.x ^ b.y ^ c.z ^ d.w;
    }
    for (; i < n; i += stride) acc ^= __ldg(p + i).x;
    if (acc == 0x12345678u) sink[0] = acc;
}
"""


def main():
    import cupy
    import torch

    import cupyq
    from cupyq import bench

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8192x28672")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--format", default="gptq", choices=("gptq", "gptq_act", "exl2"))
    ap.add_argument("--calls", type=int, default=20)
    a = ap.parse_args()
    k, n = (int(v) for v in a.shape.split("x"))
    rng = np.random.default_rng(0)
    copies = max(1, -(-(256 << 20) // (k * n // 2)))
    qms = bench._make_qmatrices(a.format, k, n, copies, rng, 0)
    x = torch.randn(a.m, k, device="cuda", dtype=torch.float16)
    for i in range(a.calls):
        cupyq.gemm(x, qms[i % len(qms)])
    torch.cuda.synchronize()
    us = bench._time_graph(torch, lambda i: cupyq.gemm(x, qms[i % len(qms)]), 40, 5)
    nbytes = k * n // 2
    print(f"gemm {a.format} {k}x{n} m={a.m}: {us:.2f} us per call, {nbytes / us / 1e6:.2f} TB/s of 4-bit weights")

    kern = cupy.RawKernel(_READ_SRC, "stream_read")
    bufs = [cupy.random.randint(0, 2**31, size=nbytes // 4, dtype=cupy.int32) for _ in range(copies)]
    sink = cupy.zeros(1, dtype=cupy.uint32)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for blocks_per_sm in (4, 8, 16):
        def read(i, bps=blocks_per_sm):
            b = bufs[i % len(bufs)]
            kern((sms * bps,), (256,), (b, np.uint64(b.nbytes // 16), sink),
                 stream=cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream))
        rus = bench._time_graph(torch, read, 40, 5)
        print(f"stream_read {nbytes / 1e6:.1f} MB, {blocks_per_sm} CTAs/SM: {rus:.2f} us, {nbytes / rus / 1e6:.2f} TB/s")


if __name__ == "__main__":
    main()
