// Small-batch GEMM for GPTQ and EXL2 matrices, out[m, n] = sum_k x[m, k] W[k, n] (+ bias[n]), the dequantise
// pass of QMatrix.dequantize, and the activation gather. Larger batches run qmma (qmma.cu).
//
// Weights stay quantized in device memory (layout in qdq.cuh) and are dequantised in registers straight into
// tensor-core A fragments; activations are staged in shared memory and read as B fragments. Accumulation is
// fp32. Permuted matrices get their activations in sorted row order from gather_columns.
//
// Grid of qgemv: x = blocks of 128 output columns (8 warps, 16 columns each), y = split-K slices of the sorted
// rows. With more than one split, every CTA writes fp32 partial sums to `ws` and the last CTA of a column block
// (counted in `counters`) adds them in split order, so results do not depend on scheduling. The counter is
// reset by that CTA, so the kernel can be replayed in a CUDA graph.
#include "qdq.cuh"

// Constants shared with Python come from cupyq/kernels.py (NVRTC_DEFINES) as -D options.
#if !defined(CUPYQ_GEMV_THREADS) || !defined(CUPYQ_STEP_CHUNKS)
#error "CUPYQ_GEMV_THREADS or CUPYQ_STEP_CHUNKS is not defined: compile with cupyq.nvrtc.kernel_options()"
#endif

namespace cupyq {

constexpr int kThreads = CUPYQ_GEMV_THREADS;
constexpr int kWarps = kThreads / 32;
constexpr int kCtaCols = kWarps * 16;
constexpr int kStepChunks = CUPYQ_STEP_CHUNKS;      // 64-row chunks per step (one step of weights in flight)
static_assert(kThreads % 32 == 0, "whole warps");
static_assert(kStepChunks == 4, "a step reads the groups of its chunks as one int4");

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
    // Weights are read once: keep them out of L1 so the small tables stay there.
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

// Writes the CTA's results. Accumulator element (mt, e) of a lane holds column n = tile*16 + lane/4 + 8*(e/2)
// and batch row m = m0 + mt*8 + 2*(lane%4) + e%2. With one split the values (plus bias) go straight to `out`;
// otherwise every CTA writes fp32 partial sums to `ws`, and the last CTA of its column block (counted in
// `counters`, which it resets for the next launch) adds them in split order.
template <typename T, int MT>
__device__ __forceinline__ void write_result(const float (&acc)[MT][4], bool active, int tile, int lane, int m0,
                                             const T* __restrict__ bias, T* __restrict__ out,
                                             float* __restrict__ ws, int* __restrict__ counters, int M, int N,
                                             int Npad) {
    __shared__ int is_last;
    const int n_lo = tile * 16 + (lane >> 2);
    if (gridDim.y == 1) {
        if (!active) return;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int n = n_lo + 8 * (e >> 1);
                const int m = m0 + mt * 8 + 2 * (lane & 3) + (e & 1);
                if (m < M && n < N) {
                    float v = acc[mt][e];
                    if (bias) v += to_float<T>(bias[n]);
                    out[(size_t)m * N + n] = from_float<T>(v);
                }
            }
        }
        return;
    }

    const int Mtot = gridDim.z * MT * 8;
    if (active) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int n = n_lo + 8 * (e >> 1);
                const int m = m0 + mt * 8 + 2 * (lane & 3) + (e & 1);
                if (m < M) ws[((size_t)blockIdx.y * Mtot + m) * Npad + n] = acc[mt][e];
            }
        }
    }
    int* counter = counters + blockIdx.z * gridDim.x + blockIdx.x;
    // The barrier orders the CTA's partial sums before thread 0's count, whose release makes them visible to
    // the CTA that counts last; its acquire (then the barrier) makes every split's sums visible to that CTA.
    __syncthreads();
    if (threadIdx.x == 0) {
        int before;
        asm volatile("atom.add.acq_rel.gpu.s32 %0, [%1], 1;" : "=r"(before) : "l"(counter) : "memory");
        is_last = before == (int)gridDim.y - 1;
    }
    __syncthreads();
    if (!is_last) return;
    const int col0 = blockIdx.x * kCtaCols;
    for (int i = threadIdx.x; i < MT * 8 * kCtaCols; i += kThreads) {
        const int m = m0 + i / kCtaCols;
        const int n = col0 + i % kCtaCols;
        if (m < M && n < N) {
            float v = 0.0f;
            for (int s = 0; s < (int)gridDim.y; ++s) v += __ldcg(ws + ((size_t)s * Mtot + m) * Npad + n);
            if (bias) v += to_float<T>(bias[n]);
            out[(size_t)m * N + n] = from_float<T>(v);
        }
    }
    if (threadIdx.x == 0) *counter = 0;
}

}  // namespace cupyq

// ------------------------------------------------------------------------------------------------------------
// Small batches (M <= 16): a lean variant of the same product, built to stream the weights at full bandwidth.
//
// One or two m8 tiles of batch rows (MT). The host splits K so that the
// CTAs fill whole waves (normally one), so every warp streams a long range of rows. Only the M activation rows
// are staged (lanes of batch rows >= M read row M - 1; those accumulator rows are never written), together
// with the group of every 16-row tile of the CTA's range, so scale loads wait on shared memory only.
// A chunk whose four tiles share one group (every chunk of GPTQ with groups of 64 rows or more) is multiplied
// with the exact integers (q - z) and its fp32 product scaled once per column, which saves the fp16 scaling of
// every weight; other chunks scale the fragments. The choice is made per step, so that the
// products of its chunks are independent chains the scheduler can interleave. Two steps of weights live in
// registers (the loop is unrolled by two, so nothing is copied): one is in flight while the other is multiplied.
namespace cupyq {

template <bool HAS8>
struct GemvStep {
    uint4 v[kStepChunks][HAS8 ? 2 : 1];
    unsigned zlo[kStepChunks], zhi[kStepChunks];
};

template <bool HAS8, bool HAS4>
__device__ __forceinline__ bool is_step8(int chunk, int C8) {
    return HAS8 && (!HAS4 || chunk < C8);  // C8 % kStepChunks == 0: a step never straddles the two storages
}

// bf16 activations are multiplied in fp16: each batch row of a CTA's range is scaled by a power of two 2^-E that
// brings its largest magnitude into [2^14, 2^15), which makes every bf16 value of at least 2^-28 times that
// maximum an exact fp16 value (bf16 carries 8 significant bits, fp16 11), and the row's fp32 sums are scaled
// back by 2^E. The fragments then come from the fp16 dequantisation, which a bf16 mantissa is too short for (the
// magic-number conversion gives an exact integer only for the lowest nibble of a lane).
// E for a row whose largest |value| has the bf16 bits `big`; E >= -126 keeps 2^E and 2^-E normal fp32 numbers.
__device__ __forceinline__ int bf16_row_exponent(unsigned big) { return max((int)(big >> 7) - 141, -126); }

// The largest |value| among eight bf16, as bf16 bits (non-negative values order as their bits).
__device__ __forceinline__ unsigned bf16x8_absmax_bits(uint4 v) {
    const unsigned m = __vmaxu2(__vmaxu2(v.x & 0x7fff7fffu, v.y & 0x7fff7fffu),
                                __vmaxu2(v.z & 0x7fff7fffu, v.w & 0x7fff7fffu));
    return max(m & 0xffffu, m >> 16);
}

// Two bf16 (one word) times `down` (a power of two), rounded to two fp16.
__device__ __forceinline__ unsigned bf16x2_to_half2(unsigned w, float down) {
    return as_u32(__floats2half2_rn(__uint_as_float(w << 16) * down, __uint_as_float(w & 0xffff0000u) * down));
}

template <bool HAS8, bool HAS4>
__device__ __forceinline__ void gemv_load_weights(GemvStep<HAS8>& r, const uint4* __restrict__ w8,
                                                  const uint4* __restrict__ w4, int tile, int chunk, int C8,
                                                  int C4, int lane) {
    if (is_step8<HAS8, HAS4>(chunk, C8)) {
        const uint4* p = w8 + ((size_t)(tile * C8 + chunk) * 2) * 32 + lane;
#pragma unroll
        for (int i = 0; i < kStepChunks; ++i) {
            r.v[i][0] = load_stream(p + i * 64);
            r.v[i][HAS8 ? 1 : 0] = load_stream(p + i * 64 + 32);
        }
    } else {
        const uint4* p = w4 + (size_t)(tile * C4 + (chunk - C8)) * 32 + lane;
#pragma unroll
        for (int i = 0; i < kStepChunks; ++i) r.v[i][0] = load_stream(p + i * 32);
    }
}

// cg: group of each staged chunk (-1 when its tiles differ), tg: group of each staged tile; local: the step's
// first chunk relative to the staged range; zsn: the scale/zero words of the lane's first column.
template <bool HAS8>
__device__ __forceinline__ void gemv_load_scales(GemvStep<HAS8>& r, const int* cg, const int* tg,
                                                 const unsigned* __restrict__ zsn, int local, int Npad, int lane) {
    const int4 cg4 = *reinterpret_cast<const int4*>(cg + local);
    const int chunk_group[kStepChunks] = {cg4.x, cg4.y, cg4.z, cg4.w};
#pragma unroll
    for (int i = 0; i < kStepChunks; ++i) {
        const int g = chunk_group[i] >= 0 ? chunk_group[i] : tg[(local + i) * 4 + (lane & 3)];
        const unsigned* p = zsn + g * Npad;
        r.zlo[i] = __ldg(p);
        r.zhi[i] = __ldg(p + 8);
    }
}

// The same, for the first step, straight from the global tile groups (before they are staged).
template <bool HAS8>
__device__ __forceinline__ void gemv_load_scales_global(GemvStep<HAS8>& r, const int* __restrict__ tile_group,
                                                        const unsigned* __restrict__ zsn, int chunk, int Npad,
                                                        int lane) {
#pragma unroll
    for (int i = 0; i < kStepChunks; ++i) {
        const int4 g4 = __ldg(reinterpret_cast<const int4*>(tile_group) + chunk + i);
        const int r4 = lane & 3;
        const int g = r4 == 0 ? g4.x : r4 == 1 ? g4.y : r4 == 2 ? g4.z : g4.w;
        const unsigned* p = zsn + g * Npad;
        r.zlo[i] = __ldg(p);
        r.zhi[i] = __ldg(p + 8);
    }
}

// The zeros (the zc halves of the scale/zero words) of chunk i of a step, as dequant4_exact / dequant8_exact take
// them: unpacked per chunk, where they are used, so that they do not stay in registers for the whole step beside
// the packed words.
template <bool HAS8>
__device__ __forceinline__ void gemv_zeros(const GemvStep<HAS8>& r, int i, bool is8, __half2& zlo, __half2& zhi) {
    zlo = __high2half2(as_half2(r.zlo[i]));
    zhi = __high2half2(as_half2(r.zhi[i]));
    if (HAS8 && is8) zhi = __hsub2(__half2half2(__ushort_as_half(0x6380)), zhi);  // 960 + 64 + z
}

// Word j of chunk i of a step on 4-bit storage.
template <bool HAS8>
__device__ __forceinline__ unsigned gemv_word4(const GemvStep<HAS8>& r, int i, int j) {
    const uint4& v = r.v[i][0];
    return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// Exact integers (q - z) of word j of chunk i of a step.
template <bool HAS8, bool HAS4>
__device__ __forceinline__ void gemv_dequant(const GemvStep<HAS8>& r, int i, int j, bool is8, __half2 zlo,
                                             __half2 zhi, __half2 q[4]) {
    if (HAS8 && is8) {
        const uint4& v = r.v[i][(j >> 1) & (HAS8 ? 1 : 0)];
        dequant8_exact((j & 1) ? v.z : v.x, (j & 1) ? v.w : v.y, zlo, zhi, q);
    } else {
        dequant4_exact(gemv_word4(r, i, j), zlo, zhi, q);
    }
}

// The fp16 A fragments of one chunk's words: exact(...) the integers (q - z) (chunks whose tiles share a group;
// the product is scaled afterwards), scaled(...) the weights (q - z) * s.
template <bool HAS8, bool HAS4>
struct GemvFragments {
    __device__ __forceinline__ GemvFragments(__half2, __half2) {}
    __device__ __forceinline__ void exact(const GemvStep<HAS8>& r, int i, int j, bool is8, __half2 zlo, __half2 zhi,
                                          unsigned a[4]) const {
        __half2 q[4];
        gemv_dequant<HAS8, HAS4>(r, i, j, is8, zlo, zhi, q);
        Frag<__half>::exact(q, a);
    }
    __device__ __forceinline__ void scaled(const GemvStep<HAS8>& r, int i, int j, bool is8, __half2 zlo,
                                           __half2 zhi, __half2 slo, __half2 shi, unsigned a[4]) const {
        __half2 q[4];
        gemv_dequant<HAS8, HAS4>(r, i, j, is8, zlo, zhi, q);
        Frag<__half>::scale(q, slo, shi, a);
    }
};

// The B fragments of one chunk's four mmas: mma j takes bx[2j] (rows 2j, 2j+1) and bx[2j+1] (rows 8+2j, 9+2j).
template <typename T>
__device__ __forceinline__ void gemv_load_x(const T* p, unsigned bx[8]) {
    *reinterpret_cast<uint4*>(bx) = *reinterpret_cast<const uint4*>(p);
    *reinterpret_cast<uint4*>(bx + 4) = *reinterpret_cast<const uint4*>(p + 8);
}

// xrow[mt]: the lane's activations (batch row mt*8 + lane/4, its 16 rows of each chunk, interleaved as staged by
// qgemv) of the step's first chunk; cg: the step's chunk groups (negative: the chunk's tiles differ). The choice
// between the two ways is made per step, so that the chunks' products form independent chains the scheduler
// can interleave (four chains with one m8 tile, two with two tiles, which need twice the accumulators; two with
// 8-bit storage alone, whose two steps of weights in registers take twice as many).
template <int MT, bool HAS8, bool HAS4>
__device__ __forceinline__ void gemv_compute(const GemvStep<HAS8>& r, const __half* const* xrow, const int* cg,
                                             bool is8, float (&acc)[MT][4]) {
    constexpr int kChains = (HAS8 && !HAS4 ? 2 : kStepChunks) / MT;
    // One m8 tile on 4-bit storage has the registers to unpack the step's zeros up front (measured faster there);
    // the other variants unpack each chunk's zeros where they are used, which keeps them free of spills.
    constexpr bool kZerosUpFront = MT == 1 && HAS4 && !HAS8;
    const int4 cg4 = *reinterpret_cast<const int4*>(cg);
    __half2 zlo_all[kStepChunks], zhi_all[kStepChunks];
    if constexpr (kZerosUpFront) {
#pragma unroll
        for (int i = 0; i < kStepChunks; ++i) gemv_zeros(r, i, is8, zlo_all[i], zhi_all[i]);
    }
    auto zeros = [&](int i, __half2& zlo, __half2& zhi) {
        if constexpr (kZerosUpFront) {
            zlo = zlo_all[i];
            zhi = zhi_all[i];
        } else {
            gemv_zeros(r, i, is8, zlo, zhi);
        }
    };
    if ((cg4.x | cg4.y | cg4.z | cg4.w) >= 0) {
#pragma unroll
        for (int i0 = 0; i0 < kStepChunks; i0 += kChains) {
            float d[kChains][MT][4];
#pragma unroll
            for (int c = 0; c < kChains; ++c) {
                const int i = i0 + c;
                __half2 zlo, zhi;
                zeros(i, zlo, zhi);
                unsigned bx[MT][8];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    gemv_load_x(xrow[mt] + i * 64, bx[mt]);
                    d[c][mt][0] = d[c][mt][1] = d[c][mt][2] = d[c][mt][3] = 0.0f;
                }
                const GemvFragments<HAS8, HAS4> frag(zlo, zhi);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    unsigned a[4];
                    frag.exact(r, i, j, is8, zlo, zhi, a);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) Mma<__half>::run(d[c][mt], a, bx[mt][2 * j], bx[mt][2 * j + 1]);
                }
            }
#pragma unroll
            for (int c = 0; c < kChains; ++c) {  // d[.][.][0..1]: column n0, d[.][.][2..3]: column n0 + 8
                const float slo = __low2float(as_half2(r.zlo[i0 + c])), shi = __low2float(as_half2(r.zhi[i0 + c]));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    acc[mt][0] = fmaf(slo, d[c][mt][0], acc[mt][0]);
                    acc[mt][1] = fmaf(slo, d[c][mt][1], acc[mt][1]);
                    acc[mt][2] = fmaf(shi, d[c][mt][2], acc[mt][2]);
                    acc[mt][3] = fmaf(shi, d[c][mt][3], acc[mt][3]);
                }
            }
        }
    } else {
        float d[2][MT][4];  // two chains per tile
#pragma unroll
        for (int c = 0; c < 2; ++c)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) d[c][mt][0] = d[c][mt][1] = d[c][mt][2] = d[c][mt][3] = 0.0f;
#pragma unroll
        for (int i = 0; i < kStepChunks; ++i) {
            const __half2 slo = __low2half2(as_half2(r.zlo[i])), shi = __low2half2(as_half2(r.zhi[i]));
            __half2 zlo, zhi;
            zeros(i, zlo, zhi);
            const GemvFragments<HAS8, HAS4> frag(zlo, zhi);
            unsigned bx[MT][8];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) gemv_load_x(xrow[mt] + i * 64, bx[mt]);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                unsigned a[4];
                frag.scaled(r, i, j, is8, zlo, zhi, slo, shi, a);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) Mma<__half>::run(d[i & 1][mt], a, bx[mt][2 * j], bx[mt][2 * j + 1]);
            }
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][e] += d[0][mt][e] + d[1][mt][e];
    }
}

}  // namespace cupyq

#ifndef CUPYQ_GEMV_MIN_BLOCKS
#define CUPYQ_GEMV_MIN_BLOCKS 2
#endif

// x must be in sorted row order (gathered beforehand by gather_columns for permuted or padded matrices).
// MT m8 tiles of batch rows (1 or 2): requires M <= MT * 8 and chunks_per_split % kStepChunks == 0. Dynamic
// shared memory: M * (chunks_per_split * 64 + 8) halves (the activations, fp16 for either T), then
// 5 * chunks_per_split ints, then for bf16 M * (chunks_per_split / kStepChunks + 1) words (the largest |x| of
// each batch row and step, then each row's scale).
template <typename T, int MT, bool HAS8, bool HAS4>
__global__ void __launch_bounds__(cupyq::kThreads, CUPYQ_GEMV_MIN_BLOCKS)
    qgemv(const T* __restrict__ x, const uint4* __restrict__ w8, const uint4* __restrict__ w4,
          const int* __restrict__ tile_group, const unsigned* __restrict__ zs, const T* __restrict__ bias,
          T* __restrict__ out, float* __restrict__ ws, int* __restrict__ counters, int M, int K, int N, int Npad,
          int C8, int C4, int chunks_per_split, int x_vec) {
    using namespace cupyq;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int tile = blockIdx.x * kWarps + warp;
    const bool active = tile < Npad / 16;
    const int chunk_begin = blockIdx.y * chunks_per_split;
    const int nchunks = min(C8 + C4, chunk_begin + chunks_per_split) - chunk_begin;
    const int ld = chunks_per_split * 64 + 8;
    constexpr bool kScaledX = !is_half<T>::value;  // bf16 activations staged as scaled fp16 (above)
    __half* xs = reinterpret_cast<__half*>(smem_raw);
    int* cg = reinterpret_cast<int*>(xs + M * ld);
    int* tg = cg + chunks_per_split;
    // bf16 only: the largest |x| of each (batch row, step) as bf16 bits, then each batch row's scale.
    const int steps_per_split = chunks_per_split / kStepChunks;
    unsigned* step_max = reinterpret_cast<unsigned*>(tg + 4 * chunks_per_split);  // [M][steps_per_split]
    float* row_scale = reinterpret_cast<float*>(step_max + M * steps_per_split);  // [M]

    cupyq::GemvStep<HAS8> ra, rb;
    const int n_lo = tile * 16 + (lane >> 2);
    const unsigned* zsn = zs + n_lo;
    if (active) {
        gemv_load_weights<HAS8, HAS4>(ra, w8, w4, tile, chunk_begin, C8, C4, lane);
        gemv_load_scales_global<HAS8>(ra, tile_group, zsn, chunk_begin, Npad, lane);
    }

    for (int i = threadIdx.x; i < nchunks; i += kThreads) {
        const int4 g = reinterpret_cast<const int4*>(tile_group)[chunk_begin + i];
        reinterpret_cast<int4*>(tg)[i] = g;
        cg[i] = (g.x == g.y && g.y == g.z && g.z == g.w) ? g.x : -1;
    }
    const int row0 = chunk_begin * 64;
    const int nrows = nchunks * 64;
    // Row t of each 16-row tile is stored at 4 * ((t / 2) % 4) + 2 * (t / 8) + t % 2, so that the two B words
    // of each mma are adjacent.
    if constexpr (kScaledX) {
        // One warp per (batch row, step), eight rows per lane: the step's maximum is one warp reduction, the
        // row's the largest of its steps' (after the barrier); the second pass finds x in L1.
        const int nsteps = nchunks / kStepChunks;
        auto load8 = [&](int m, int s) {
            const int kk = s * (kStepChunks * 64) + lane * 8;
            const T* src = x + (size_t)m * K + row0 + kk;
            if (x_vec) return row0 + kk < K ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
            unsigned short e[8];
#pragma unroll
            for (int q = 0; q < 8; ++q) e[q] = row0 + kk + q < K ? __bfloat16_as_ushort(src[q]) : 0;
            return make_uint4(e[0] | (unsigned)e[1] << 16, e[2] | (unsigned)e[3] << 16, e[4] | (unsigned)e[5] << 16,
                              e[6] | (unsigned)e[7] << 16);
        };
        for (int p = warp; p < M * nsteps; p += kWarps) {
            const int m = p / nsteps, s = p - m * nsteps;
            const unsigned big = __reduce_max_sync(0xffffffffu, bf16x8_absmax_bits(load8(m, s)));
            if (lane == 0) step_max[m * steps_per_split + s] = big;
        }
        __syncthreads();
        for (int p = warp; p < M * nsteps; p += kWarps) {
            const int m = p / nsteps, s = p - m * nsteps;
            unsigned big = 0;
            for (int t = lane; t < nsteps; t += 32) big = max(big, step_max[m * steps_per_split + t]);
            const int E = bf16_row_exponent(__reduce_max_sync(0xffffffffu, big));
            const float down = __uint_as_float((unsigned)(127 - E) << 23);
            const uint4 v = load8(m, s);
            const int kk = s * (kStepChunks * 64) + lane * 8;
            unsigned* dst = reinterpret_cast<unsigned*>(xs + m * ld + (kk & ~15)) + ((kk >> 3) & 1);
            dst[0] = bf16x2_to_half2(v.x, down);
            dst[2] = bf16x2_to_half2(v.y, down);
            dst[4] = bf16x2_to_half2(v.z, down);
            dst[6] = bf16x2_to_half2(v.w, down);
            if (s == 0 && lane == 0) row_scale[m] = __uint_as_float((unsigned)(127 + E) << 23);
        }
    } else if (x_vec) {  // K % 8 == 0, 16-byte aligned rows
        const int per_row = nrows / 8;
        for (int i = threadIdx.x; i < M * per_row; i += kThreads) {
            const int m = i / per_row;
            const int kk = (i - m * per_row) * 8;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (row0 + kk < K) v = *reinterpret_cast<const uint4*>(x + (size_t)m * K + row0 + kk);
            unsigned* dst = reinterpret_cast<unsigned*>(xs + m * ld + (kk & ~15)) + ((kk >> 3) & 1);
            dst[0] = v.x;
            dst[2] = v.y;
            dst[4] = v.z;
            dst[6] = v.w;
        }
    } else {
        for (int kk = threadIdx.x; kk < nrows; kk += kThreads) {
            const int j = row0 + kk;
            const int t = kk & 15;
            const int pos = (kk & ~15) + 4 * ((t >> 1) & 3) + 2 * (t >> 3) + (t & 1);
            for (int m = 0; m < M; ++m) xs[m * ld + pos] = j < K ? x[(size_t)m * K + j] : from_float<T>(0.0f);
        }
    }
    __syncthreads();

    float acc[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.0f;
    if (active) {
        const __half* xrow[MT];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) xrow[mt] = xs + min(mt * 8 + (lane >> 2), M - 1) * ld + (lane & 3) * 16;
        for (int c = 0; c < nchunks; c += 2 * kStepChunks) {
#define CUPYQ_GEMV_STAGE(cur, nxt, k)                                                                               \
    {                                                                                                             \
        const int here = c + (k) * kStepChunks, ahead = here + kStepChunks;                                       \
        if (here >= nchunks) break;                                                                               \
        if (ahead < nchunks) {                                                                                    \
            gemv_load_weights<HAS8, HAS4>(nxt, w8, w4, tile, chunk_begin + ahead, C8, C4, lane);                  \
            gemv_load_scales<HAS8>(nxt, cg, tg, zsn, ahead, Npad, lane);                                          \
        }                                                                                                         \
        const __half* xhere[MT];                                                                                  \
        for (int mt = 0; mt < MT; ++mt) xhere[mt] = xrow[mt] + here * 64;                                         \
        gemv_compute<MT, HAS8, HAS4>(cur, xhere, cg + here, is_step8<HAS8, HAS4>(chunk_begin + here, C8), acc);   \
    }
            CUPYQ_GEMV_STAGE(ra, rb, 0)
            CUPYQ_GEMV_STAGE(rb, ra, 1)
#undef CUPYQ_GEMV_STAGE
        }
        if constexpr (kScaledX) {  // undo the row scales (element e of tile mt: batch row mt*8 + 2*(lane%4) + e%2)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const float f0 = row_scale[min(mt * 8 + 2 * (lane & 3), M - 1)];
                const float f1 = row_scale[min(mt * 8 + 2 * (lane & 3) + 1, M - 1)];
                acc[mt][0] *= f0;
                acc[mt][1] *= f1;
                acc[mt][2] *= f0;
                acc[mt][3] *= f1;
            }
        }
    }
    write_result<T, MT>(acc, active, tile, lane, 0, bias, out, ws, counters, M, N, Npad);
}

// Dequantise the whole matrix into `out` (row stride ld_out elements) in original row order: sorted row j goes
// to out row row_src[j] (j without row_src), padding rows are skipped. One CTA row per 64-row chunk.
template <typename T, bool HAS8, bool HAS4>
__global__ void __launch_bounds__(cupyq::kThreads)
    dequant(const uint4* __restrict__ w8, const uint4* __restrict__ w4, const int* __restrict__ tile_group,
            const unsigned* __restrict__ zs, const int* __restrict__ row_src, T* __restrict__ out, int ld_out,
            int N, int Npad, int C8, int C4) {
    using namespace cupyq;
    constexpr int kLd = 16 + 8;
    __shared__ __align__(16) T tiles[kWarps][kChunkRows][kLd];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int tile = blockIdx.x * kWarps + warp;
    const int chunk = blockIdx.y;
    if (tile >= Npad / 16) return;
    const bool is8 = HAS8 && (!HAS4 || chunk < C8);
    uint4 v0, v1 = make_uint4(0, 0, 0, 0);
    if (is8) {
        const uint4* p = w8 + ((size_t)(tile * C8 + chunk) * 2) * 32 + lane;
        v0 = __ldg(p);
        v1 = __ldg(p + 32);
    } else {
        v0 = __ldg(w4 + (size_t)(tile * C4 + (chunk - C8)) * 32 + lane);
    }
    const int n_lo = tile * 16 + (lane >> 2);
    const int g = __ldg(tile_group + chunk * 4 + (lane & 3));  // the lane's rows: one 16-row tile
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        __half2 slo_zlo = as_half2(__ldg(zs + (size_t)g * Npad + n_lo));
        __half2 shi_zhi = as_half2(__ldg(zs + (size_t)g * Npad + n_lo + 8));
        __half2 zlo = __half2half2(__high2half(slo_zlo));
        __half2 zhi = __half2half2(__high2half(shi_zhi));
        __half2 d[4];
        if (is8) {
            const uint4& v = (j >> 1) ? v1 : v0;
            const unsigned w0 = (j & 1) ? v.z : v.x;
            const unsigned w1 = (j & 1) ? v.w : v.y;
            zhi = __hsub2(__half2half2(__ushort_as_half(0x6380)), zhi);
            dequant8_exact(w0, w1, zlo, zhi, d);
        } else {
            const unsigned w = j == 0 ? v0.x : j == 1 ? v0.y : j == 2 ? v0.z : v0.w;
            dequant4_exact(w, zlo, zhi, d);
        }
        unsigned a[4];
        Frag<T>::scale(d, __half2half2(__low2half(slo_zlo)), __half2half2(__low2half(shi_zhi)), a);
        const int r = (lane & 3) * 16 + 2 * j;
        const int c = lane >> 2;
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            const T* e = reinterpret_cast<const T*>(&a[p]);
            const int rr = r + 8 * (p >> 1);
            const int cc = c + 8 * (p & 1);
            tiles[warp][rr][cc] = e[0];
            tiles[warp][rr + 1][cc] = e[1];
        }
    }
    __syncwarp();
    // 64 rows x 16 columns: two 16-byte pieces per row, 4 per lane.
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const int rr = p * 16 + (lane >> 1);
        const int half_idx = lane & 1;
        const int j = chunk * kChunkRows + rr;
        const int dst = row_src ? __ldg(row_src + j) : j;
        if (dst < 0) continue;
        const int n = tile * 16 + half_idx * 8;
        const uint4 val = *reinterpret_cast<const uint4*>(&tiles[warp][rr][half_idx * 8]);
        T* dp = out + (size_t)dst * ld_out + n;
        if (n + 8 <= N && (ld_out & 7) == 0) {
            *reinterpret_cast<uint4*>(dp) = val;
        } else {
            const T* e = reinterpret_cast<const T*>(&val);
            for (int q = 0; q < 8; ++q)
                if (n + q < N) dp[q] = e[q];
        }
    }
}

// x_sorted[m, j] = x[m, row_src[j]] (zero for padding rows), j in [0, Kp); without row_src a copy (rows j < K).
template <typename T>
__global__ void gather_columns(const T* __restrict__ x, const int* __restrict__ row_src, T* __restrict__ out,
                               int M, int K, int Kp) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int m = blockIdx.y;
    if (j >= Kp || m >= M) return;
    const int src = row_src ? row_src[j] : j;  // the rule of cupyq::sorted_x (qdq.cuh); m < M holds here
    out[(size_t)m * Kp + j] = (src >= 0 && src < K) ? x[(size_t)m * K + src] : cupyq::from_float<T>(0.0f);
}
