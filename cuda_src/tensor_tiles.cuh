// Pieces shared by the tensor-core kernels (qmma.cu, qwgmma.cu): asynchronous copies, the stage copy of
// contiguous runs, the dequantisation of one chunk word into mma fragments, and the stream-K range split.
#pragma once
#include "qdq.cuh"

// Constants shared with Python come from cupyq/kernels.py (NVRTC_DEFINES) as -D options.
#if !defined(CUPYQ_TC_THREADS) || !defined(CUPYQ_DEQUANT_T_CHUNKS)
#error "CUPYQ_TC_THREADS or CUPYQ_DEQUANT_T_CHUNKS is not defined: compile with cupyq.nvrtc.kernel_options()"
#endif

namespace cupyq {
namespace qmma_detail {

constexpr int kThreads = CUPYQ_TC_THREADS;
constexpr int kDequantTChunks = CUPYQ_DEQUANT_T_CHUNKS;  // 64-row chunks of one dequant_t CTA (qmma.cu)
static_assert(kThreads == 256, "8 warps: two warpgroups (qwgmma), K slices x WM x WN (qmma)");
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Copies of one stage's kRuns runs of kRunVecs contiguous uint4 (run i at src + i * run_stride) to consecutive
// shared memory. The CTA's threads take consecutive uint4; each thread's byte offsets from `src` do not change
// from stage to stage, so they are computed once and a copy costs a 64-bit add and a compare.
template <int kRuns, int kRunVecs>
struct RunCopy {
    static_assert(kRunVecs % kThreads == 0 || kThreads % kRunVecs == 0, "runs tile the thread block evenly");
    static constexpr int kUnits = kRuns * kRunVecs;
    static constexpr int kPerThread = (kUnits + kThreads - 1) / kThreads;
    static constexpr int kRunsPerPass = kRunVecs >= kThreads ? 0 : kThreads / kRunVecs;
    // Run of unit tid + r * kThreads, relative to run0.
    static __device__ __forceinline__ constexpr int run_step(int r) {
        return kRunsPerPass ? r * kRunsPerPass : (r * kThreads) / kRunVecs;
    }
    unsigned off[kPerThread];
    int run0;

    __device__ __forceinline__ void init(int run_stride, int tid) {
        run0 = kRunsPerPass ? tid / kRunVecs : 0;
        const int pos0 = kRunsPerPass ? tid % kRunVecs : tid;
#pragma unroll
        for (int r = 0; r < kPerThread; ++r) {
            const int dp = kRunsPerPass ? 0 : (r * kThreads) % kRunVecs;
            off[r] = ((unsigned)(run0 + run_step(r)) * (unsigned)run_stride + (unsigned)(pos0 + dp)) * 16u;
        }
    }
    // dst: shared-space address of the stage's first uint4; runs from runs_valid on are not copied.
    __device__ __forceinline__ void copy(unsigned dst, const uint4* src, int runs_valid, int tid) const {
        const char* base = reinterpret_cast<const char*>(src);
        const unsigned d = dst + (unsigned)tid * 16u;
#pragma unroll
        for (int r = 0; r < kPerThread; ++r) {
            if ((kUnits % kThreads == 0 || tid + r * kThreads < kUnits) && run0 + run_step(r) < runs_valid)
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d + r * kThreads * 16),
                             "l"(base + off[r]));
        }
    }
};

// B fragments of one chunk word: b[0], b[2] are the fragment of columns n0 .. n0 + 7, b[1], b[3] that of
// columns n0 + 8 .. n0 + 15 (rows as in the header). Scale and zero of the lane's two columns come from the
// (scale, zc) words of qdq.cuh.
template <typename T>
struct Dequant;

template <>
struct Dequant<__half> {
    struct Consts {
        __half2 slo, shi, zlo, zhi;
    };
    template <bool IS8>
    static __device__ __forceinline__ Consts consts(unsigned lo, unsigned hi) {
        Consts c;
        c.slo = __low2half2(as_half2(lo));
        c.shi = __low2half2(as_half2(hi));
        c.zlo = __high2half2(as_half2(lo));
        c.zhi = __high2half2(as_half2(hi));
        if constexpr (IS8) c.zhi = __hsub2(__half2half2(__ushort_as_half(0x6380)), c.zhi);  // 960 + 64 + z = 1024 + z
        return c;
    }
    static __device__ __forceinline__ void word4(unsigned w, const Consts& c, unsigned b[4]) {
        __half2 d[4];
        dequant4_exact(w, c.zlo, c.zhi, d);
        Frag<__half>::scale(d, c.slo, c.shi, b);
    }
    static __device__ __forceinline__ void word8(unsigned w0, unsigned w1, const Consts& c, unsigned b[4]) {
        __half2 d[4];
        dequant8_exact(w0, w1, c.zlo, c.zhi, d);
        Frag<__half>::scale(d, c.slo, c.shi, b);
    }
    // The exact integers (q - z), unscaled (the caller scales the product).
    static __device__ __forceinline__ void word4_exact(unsigned w, const Consts& c, unsigned b[4]) {
        __half2 d[4];
        dequant4_exact(w, c.zlo, c.zhi, d);
        Frag<__half>::exact(d, b);
    }
    static __device__ __forceinline__ void word8_exact(unsigned w0, unsigned w1, const Consts& c, unsigned b[4]) {
        __half2 d[4];
        dequant8_exact(w0, w1, c.zlo, c.zhi, d);
        Frag<__half>::exact(d, b);
    }
};

template <>
struct Dequant<__nv_bfloat16> {
    // 4-bit storage: bf16 (128 + q) by or-ing the exponent of 128 into each nibble, minus (128 + z), exact, times
    // the scale in bf16. 8-bit storage (values up to 255 do not fit 7 mantissa bits): exact (q - z) in fp16, then
    // scaled in fp32 and rounded to bf16.
    struct Consts {
        __nv_bfloat162 slo, shi, zlo, zhi;  // 4-bit
        __half2 hzlo, hzhi, hslo, hshi;     // 8-bit
    };
    template <bool IS8>
    static __device__ __forceinline__ Consts consts(unsigned lo, unsigned hi) {
        Consts c;
        if constexpr (IS8) {
            c.hslo = __low2half2(as_half2(lo));
            c.hshi = __low2half2(as_half2(hi));
            c.hzlo = __high2half2(as_half2(lo));
            c.hzhi = __hsub2(__half2half2(__ushort_as_half(0x6380)), __high2half2(as_half2(hi)));
        } else {
            bf16_zeros4(__high2half2(as_half2(lo)), __high2half2(as_half2(hi)), c.zlo, c.zhi);
            c.slo = __float2bfloat162_rn(__low2float(as_half2(lo)));
            c.shi = __float2bfloat162_rn(__low2float(as_half2(hi)));
        }
        return c;
    }
    static __device__ __forceinline__ void word4(unsigned w, const Consts& c, unsigned b[4]) {
        dequant4_bf16_exact(w, c.zlo, c.zhi, b);
        scale4_bf16(b, c.slo, c.shi);
    }
    static __device__ __forceinline__ void word8(unsigned w0, unsigned w1, const Consts& c, unsigned b[4]) {
        __half2 d[4];
        dequant8_exact(w0, w1, c.hzlo, c.hzhi, d);
        Frag<__nv_bfloat16>::scale(d, c.hslo, c.hshi, b);
    }
    // The exact integers (q - z), unscaled (the caller scales the product).
    static __device__ __forceinline__ void word4_exact(unsigned w, const Consts& c, unsigned b[4]) {
        dequant4_bf16_exact(w, c.zlo, c.zhi, b);
    }
    static __device__ __forceinline__ void word8_exact(unsigned w0, unsigned w1, const Consts& c, unsigned b[4]) {
        __half2 d[4];
        dequant8_exact(w0, w1, c.hzlo, c.hzhi, d);
        Frag<__nv_bfloat16>::exact(d, b);
    }
};

template <bool B>
struct StorageTag {
    static constexpr bool is8 = B;
};

// The CTA that owns iteration `it` when `total` iterations are split into `ctas` equal contiguous ranges
// [c * total / ctas, (c + 1) * total / ctas).
__device__ __forceinline__ int owner_of(long long it, long long total, long long ctas) {
    return static_cast<int>(((it + 1) * ctas - 1) / total);
}
__device__ __forceinline__ long long range_begin(long long c, long long total, long long ctas) {
    return c * total / ctas;
}

// f(a, b, h, e) for every a < A, b < B, h < 2, e < E, loops unrolled: qmma's walk over a lane's accumulators
// (E = 4) or over their pairs of adjacent columns (E = 2).
template <int A, int B, int E, typename F>
__device__ __forceinline__ void for_each_acc(F&& f) {
#pragma unroll
    for (int a = 0; a < A; ++a)
#pragma unroll
        for (int b = 0; b < B; ++b)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int e = 0; e < E; ++e) f(a, b, h, e);
}

// Called by every thread of a CTA that has written its fp32 partial sums of tile `tile` (iterations
// first_it .. first_it + ksteps - 1 of the stream-K numbering) to its slot of `ws` (slot 0 when the tile is the
// first of the CTA's range, else 1; kMTile x kNTile floats, row-major): the CTA that counts last in `counters`
// adds every CTA's sums in CTA order, adds the bias, writes `out` and resets the counter for the next launch.
template <typename T, int kMTile, int kNTile>
__device__ __forceinline__ void add_partials(const float* __restrict__ ws, int* __restrict__ counters, int tile,
                                             long long first_it, int ksteps, long long total, long long ctas,
                                             int m0, int n0, int M, int N, const T* __restrict__ bias,
                                             T* __restrict__ out, int tid, int* is_last) {
    const int c_first = owner_of(first_it, total, ctas);
    const int c_last = owner_of(first_it + ksteps - 1, total, ctas);
    int* counter = counters + tile;
    // The barrier orders the CTA's partial sums before thread 0's count, whose release makes them visible to the
    // CTA that counts last; its acquire (then the barrier) makes every CTA's sums visible there.
    __syncthreads();
    if (tid == 0) {
        int before;
        asm volatile("atom.add.acq_rel.gpu.s32 %0, [%1], 1;" : "=r"(before) : "l"(counter) : "memory");
        *is_last = before == c_last - c_first;
    }
    __syncthreads();
    if (!*is_last) return;
    for (int i = tid; i < kMTile * kNTile / 4; i += kThreads) {
        const int r = i / (kNTile / 4);
        const int c = (i - r * (kNTile / 4)) * 4;
        const int m = m0 + r;
        if (m >= M || n0 + c >= N) continue;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int k = c_first; k <= c_last; ++k) {
            const int s = tile == range_begin(k, total, ctas) / ksteps ? 0 : 1;
            const float4 p = __ldcg(reinterpret_cast<const float4*>(ws + ((size_t)k * 2 + s) * kMTile * kNTile +
                                                                    (size_t)r * kNTile + c));
            v.x += p.x;
            v.y += p.y;
            v.z += p.z;
            v.w += p.w;
        }
        const float vals[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int n = n0 + c + e;
            if (n < N) {
                float o = vals[e];
                if (bias) o += to_float<T>(bias[n]);
                out[(size_t)m * N + n] = from_float<T>(o);
            }
        }
    }
    if (tid == 0) *counter = 0;
}

}  // namespace qmma_detail
}  // namespace cupyq
