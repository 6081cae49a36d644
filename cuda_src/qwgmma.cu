// Warpgroup tensor-core GEMM for batches of rows on sm_90a (qwgmma), and the activation layout it reads.
//
// qwgmma computes out^T = W^T x^T with wgmma.mma_async m64nNBk16: the dequantised weights are the A operand in
// registers (warp w of a warpgroup holds the A fragment of 16 output columns, which is exactly one word of the
// fragment-ordered weight layout of qdq.cuh: the same dequantisation as qmma, no shuffles), and the activations
// are the B operand in shared memory, NB batch rows x 16 rows of K per instruction. wgmma reads B through a
// matrix descriptor in the no-swizzle K-major layout: "core matrices" of 8 batch rows x 8 K elements (128
// contiguous bytes). The K order inside a chunk is the weights' virtual order (see qmma.cu), so the activations
// are written in that order by frag_xw: for every 8 batch rows and 64-row chunk, 4 (mma j) x 2 (K halves) core
// matrices, 1 KB.
//
// Work split and partial sums: as qmma (stream-K over (m block, column block, stage) iterations, a STAGES-deep
// ring of cp.async copies, fp32 partial sums added in CTA order by the last CTA of a tile). A CTA is two
// warpgroups, 128 output columns; both multiply the same staged activations. A warp keeps one wgmma in flight
// while it dequantises the next fragment; a stage's wgmmas complete before the barrier that lets its buffer be
// refilled.
//
// qwgmma needs sm_90a (wgmma); compiled for any other target its body traps, and dispatch never launches it
// there. frag_xw is plain CUDA.
#include "tensor_tiles.cuh"

namespace cupyq {
namespace qwgmma_detail {
using namespace qmma_detail;

constexpr int kNT = 8;          // 16-column tiles per CTA: one per warp
constexpr int kNTile = kNT * 16;
constexpr int kXGroupBytes = 1024;  // one 8-row group's core matrices of one chunk

template <typename T, int NB>
struct Wgmma;

template <>
struct Wgmma<__half, 32> {
    static __device__ __forceinline__ void run(float (&d)[16], const unsigned (&a)[4], unsigned long long desc) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
    }
};

template <>
struct Wgmma<__nv_bfloat16, 32> {
    static __device__ __forceinline__ void run(float (&d)[16], const unsigned (&a)[4], unsigned long long desc) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
    }
};

template <>
struct Wgmma<__half, 64> {
    static __device__ __forceinline__ void run(float (&d)[32], const unsigned (&a)[4], unsigned long long desc) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
    }
};

template <>
struct Wgmma<__half, 128> {
    static __device__ __forceinline__ void run(float (&d)[64], const unsigned (&a)[4], unsigned long long desc) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
    }
};

template <>
struct Wgmma<__nv_bfloat16, 64> {
    static __device__ __forceinline__ void run(float (&d)[32], const unsigned (&a)[4], unsigned long long desc) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
    }
};

template <>
struct Wgmma<__nv_bfloat16, 128> {
    static __device__ __forceinline__ void run(float (&d)[64], const unsigned (&a)[4], unsigned long long desc) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
    }
};

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Shared-memory matrix descriptor, no swizzle: start address, then the byte distances between core matrices
// adjacent in K (leading) and in the batch dimension (stride), each in units of 16 bytes.
__device__ __forceinline__ unsigned long long smem_desc(unsigned addr, unsigned lead_bytes, unsigned stride_bytes) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(lead_bytes >> 4) << 16) |
           ((unsigned long long)(stride_bytes >> 4) << 32);
}

template <int NB, int KS, int STAGES, int ZR, bool HAS8>
struct WShape {
    static constexpr int kMTile = NB;
    static constexpr int kXGroups = NB / 8;
    static constexpr int kChunkVecs = HAS8 ? 64 : 32;
    static constexpr int kZLd = kNTile + 8;
    static constexpr int kWBytes = kNT * KS * kChunkVecs * 16;
    static constexpr int kXBytes = kXGroups * KS * kXGroupBytes;
    static constexpr int kZBytes = KS * ZR * kZLd * 4;
    static constexpr int kStageBytes = (kWBytes + kXBytes + kZBytes + 127) / 128 * 128;  // core matrices 128-aligned
    static constexpr int kSmemBytes = STAGES * kStageBytes;
    static constexpr int kZUnits = KS * ZR * kNTile / 4;
    static constexpr int kZPerThread = (kZUnits + kThreads - 1) / kThreads;
    static_assert(NB == 32 || NB == 64 || NB == 128, "wgmma batch tile");
    static_assert(4 % KS == 0 || KS % 4 == 0, "stages must not straddle a storage segment (256 rows)");
    static_assert(kWBytes % 128 == 0, "core matrices stay 128-byte aligned");
};

}  // namespace qwgmma_detail
}  // namespace cupyq

// Parameters: as qmma (cupyq/kernels.py QMMA_PARAMS), except that x holds the activations in the layout of
// frag_xw: ceil(M / 8) groups of (C8 + C4) chunks of 1 KB. Dynamic shared memory: WShape<...>::kSmemBytes.
template <typename T, int NB, int KS, int STAGES, int ZR, bool HAS8, bool HAS4>
__global__ void __launch_bounds__(cupyq::qmma_detail::kThreads, 1)
    qwgmma(const T* __restrict__ x, const uint4* __restrict__ w8, const uint4* __restrict__ w4,
           const int* __restrict__ tile_group, const unsigned* __restrict__ zs, const T* __restrict__ bias,
           T* __restrict__ out, float* __restrict__ ws, int* __restrict__ counters, int M, int N, int Npad, int C8,
           int C4) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using namespace cupyq;
    using namespace cupyq::qmma_detail;
    using namespace cupyq::qwgmma_detail;
    using S = WShape<NB, KS, STAGES, ZR, HAS8>;
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ int is_last;
    {
        unsigned given;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(given));
        if (given < (unsigned)S::kSmemBytes) __trap();
    }
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int g = lane >> 2;
    const int t = lane & 3;

    const int T16 = Npad / 16;
    const int ksteps = (C8 + C4) / KS;
    const int nblocks = (T16 + kNT - 1) / kNT;
    const int mblocks = (M + NB - 1) / NB;
    const long long total = (long long)mblocks * nblocks * ksteps;
    const long long ctas = gridDim.x;
    const int begin = (int)range_begin(blockIdx.x, total, ctas);
    const int end = (int)range_begin(blockIdx.x + 1, total, ctas);
    if (begin >= end) return;

    // ------------------------------------------------------------ producer (as qmma)
    int zgroup[S::kZPerThread];
    int p_ks, p_nb, p_mb;
    {
        const int tile = begin / ksteps;
        p_ks = begin - tile * ksteps;
        p_nb = tile % nblocks;
        p_mb = tile / nblocks;
    }
    int g_ks = p_ks;
    auto read_groups = [&]() {
#pragma unroll
        for (int r = 0; r < S::kZPerThread; ++r) {
            const int u = tid + r * kThreads;
            const int row = u / (kNTile / 4);
            zgroup[r] = u < S::kZUnits ? __ldg(tile_group + (g_ks * KS) * 4 + (ZR == 4 ? row : row * 4)) : 0;
        }
        if (++g_ks == ksteps) g_ks = 0;
    };
    const uint4* xw = reinterpret_cast<const uint4*>(x);
    const int xgroups = (M + 7) / 8;
    const int chunks = C8 + C4;
    RunCopy<kNT, KS * 64> copy_w8;
    RunCopy<kNT, KS * 32> copy_w4;
    RunCopy<S::kXGroups, KS * kXGroupBytes / 16> copy_x;
    if (HAS8) copy_w8.init(C8 * 64, tid);
    if (HAS4) copy_w4.init(C4 * 32, tid);
    copy_x.init(chunks * kXGroupBytes / 16, tid);
    auto load_stage = [&](int buf) {
        const int nb = p_nb;
        const int mb = p_mb;
        const int chunk0 = p_ks * KS;
        if (++p_ks == ksteps) {
            p_ks = 0;
            if (++p_nb == nblocks) {
                p_nb = 0;
                ++p_mb;
            }
        }
        unsigned char* st = smem + (size_t)buf * S::kStageBytes;
        const unsigned st_u32 = smem_u32(st);
        const bool is8 = HAS8 && (!HAS4 || chunk0 < C8);
        if (HAS8 && is8) {
            copy_w8.copy(st_u32, w8 + ((size_t)nb * kNT * C8 + chunk0) * 64, T16 - nb * kNT, tid);
        } else {
            copy_w4.copy(st_u32, w4 + ((size_t)nb * kNT * C4 + (chunk0 - C8)) * 32, T16 - nb * kNT, tid);
        }
        copy_x.copy(st_u32 + S::kWBytes,
                    xw + ((size_t)mb * S::kXGroups * chunks + chunk0) * (kXGroupBytes / 16),
                    xgroups - mb * S::kXGroups, tid);
        unsigned char* zsm = st + S::kWBytes + S::kXBytes;
#pragma unroll
        for (int r = 0; r < S::kZPerThread; ++r) {
            const int u = tid + r * kThreads;
            if (u < S::kZUnits) {
                const int row = u / (kNTile / 4);
                const int q = u - row * (kNTile / 4);
                const int col = nb * kNTile + q * 4;
                const bool ok = col < Npad;
                const unsigned* src = ok ? zs + (size_t)zgroup[r] * Npad + col : zs;
                cp_async16(zsm + ((size_t)row * S::kZLd + q * 4) * 4, src, ok);
            }
        }
    };

    // ------------------------------------------------------------ consumer
    // Accumulator d[4i + 2h + e] of a lane: batch row 8i + 2t + e of the tile, column 16*warp + g + 8h.
    float d[NB / 2];
#pragma unroll
    for (int i = 0; i < NB / 2; ++i) d[i] = 0.0f;

    auto compute_chunk = [&](const unsigned char* st, int cc, auto is8_tag) {
        constexpr bool IS8 = decltype(is8_tag)::is8;
        constexpr int kVecs = IS8 ? 2 : 1;
        using D = Dequant<T>;
        const uint4* wsm = reinterpret_cast<const uint4*>(st);
        const unsigned* zsm = reinterpret_cast<const unsigned*>(st + S::kWBytes + S::kXBytes);
        const unsigned* zrow = zsm + (ZR == 4 ? cc * 4 + t : cc) * S::kZLd + warp * 16 + g;
        const typename D::Consts c = D::template consts<IS8>(zrow[0], zrow[8]);
        uint4 v[kVecs];
#pragma unroll
        for (int h = 0; h < kVecs; ++h) v[h] = wsm[((size_t)warp * KS + cc) * 32 * kVecs + 32 * h + lane];
        const unsigned xs = smem_u32(st + S::kWBytes) + cc * kXGroupBytes;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            unsigned a[4];
            if constexpr (IS8) {
                const uint4& w = v[j / 2];
                D::word8(j % 2 ? w.z : w.x, j % 2 ? w.w : w.y, c, a);
            } else {
                D::word4(j == 0 ? v[0].x : j == 1 ? v[0].y : j == 2 ? v[0].z : v[0].w, c, a);
            }
            wgmma_fence();
            Wgmma<T, NB>::run(d, a, smem_desc(xs + j * 256, 128, KS * kXGroupBytes));
            wgmma_commit();
            wgmma_wait<1>();  // the previous fragment's registers are free again
        }
    };

    auto finish_tile = [&](int it) {
        const int tile = it / ksteps;
        const int nb = tile % nblocks;
        const int mb = tile / nblocks;
        const int m0 = mb * NB;
        const int n0 = nb * kNTile;
        const long long first_it = (long long)tile * ksteps;
        const bool whole = first_it >= begin && first_it + ksteps <= end;
        if (whole) {
#pragma unroll
            for (int i = 0; i < NB / 8; ++i)
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int m = m0 + 8 * i + 2 * t + e;
                        const int n = n0 + warp * 16 + g + 8 * h;
                        if (m < M && n < N) {
                            float o = d[4 * i + 2 * h + e];
                            if (bias) o += to_float<T>(bias[n]);
                            out[(size_t)m * N + n] = from_float<T>(o);
                        }
                    }
        } else {
            const int slot = tile == begin / ksteps ? 0 : 1;
            float* part = ws + ((size_t)blockIdx.x * 2 + slot) * NB * kNTile;
#pragma unroll
            for (int i = 0; i < NB / 8; ++i)
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        part[(size_t)(8 * i + 2 * t + e) * kNTile + warp * 16 + g + 8 * h] = d[4 * i + 2 * h + e];
            add_partials<T, NB, kNTile>(ws, counters, tile, first_it, ksteps, total, ctas, m0, n0, M, N, bias, out,
                                        tid, &is_last);
        }
#pragma unroll
        for (int i = 0; i < NB / 2; ++i) d[i] = 0.0f;
    };

    // ------------------------------------------------------------ the pipeline (as qmma)
    read_groups();
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (begin + s < end) {
            load_stage((begin + s) % STAGES);
            if (begin + s + 1 < end) read_groups();
        }
        cp_async_commit();
    }
    int c_ks = begin % ksteps;
    for (int it = begin; it < end; ++it) {
        cp_async_wait<STAGES - 2>();
        // The copies were ordinary (generic-proxy) writes; wgmma reads shared memory through the async proxy.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        const int ahead = it + STAGES - 1;
        if (ahead < end) {
            load_stage(ahead % STAGES);
            if (ahead + 1 < end) read_groups();
        }
        cp_async_commit();

        const unsigned char* st = smem + (size_t)(it % STAGES) * S::kStageBytes;
        const bool is8 = HAS8 && (!HAS4 || c_ks * KS < C8);
        // Each branch completes its wgmmas before the branches join (this stage's buffer may be refilled after the
        // next barrier): the compiler may move the accumulators at the join, which it must not do while a wgmma
        // still writes them.
        if (HAS8 && is8) {
#pragma unroll
            for (int cc = 0; cc < KS; ++cc) compute_chunk(st, cc, StorageTag<HAS8>{});
            wgmma_wait<0>();
        } else {
#pragma unroll
            for (int cc = 0; cc < KS; ++cc) compute_chunk(st, cc, StorageTag<false>{});
            wgmma_wait<0>();
        }
        if (it + 1 == end || c_ks == ksteps - 1) finish_tile(it);
        if (++c_ks == ksteps) c_ks = 0;
    }
    cp_async_wait<0>();
#else
    __trap();
#endif
}

// The activations of qwgmma: core matrix (group, c, j, h) at xf + ((group * chunks + c) * 8 + j * 2 + h) * 128
// bytes holds batch rows group*8 .. group*8 + 7 (one 16-byte row each) and, in element e, sorted row
// k = c*64 + (e/2)*16 + 8h + 2j + e%2 (the weights' virtual order for mma j of chunk c). Sorted row k holds
// x[.., row_src[k]] (x[.., k] when row_src is null); rows past M and sorted rows without a source are zero.
// x: [M, K], row stride K. Grid: one thread per 16-byte row of a core matrix, ceil(M / 8) * chunks * 64.
template <typename T>
__global__ void __launch_bounds__(cupyq::qmma_detail::kThreads)
    frag_xw(const T* __restrict__ x, const int* __restrict__ row_src, uint4* __restrict__ xf, int M, int K,
            int chunks) {
    using namespace cupyq;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int u = (int)(idx & 63);   // (j, h, r) of the 64 core-matrix rows of one (group, chunk)
    const long long gc = idx >> 6;   // group * chunks + chunk
    if (gc >= (long long)((M + 7) / 8) * chunks) return;
    const int group = (int)(gc / chunks);
    const int c = (int)(gc - (long long)group * chunks);
    const int j = u >> 4;
    const int h = (u >> 3) & 1;
    const int m = group * 8 + (u & 7);
    unsigned words[4];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        unsigned short pair[2];
#pragma unroll
        for (int o = 0; o < 2; ++o) {
            const int k = c * 64 + p * 16 + 8 * h + 2 * j + o;
            const int src = row_src ? __ldg(row_src + k) : (k < K ? k : -1);
            T val = from_float<T>(0.0f);
            if (m < M && src >= 0 && src < K) val = x[(size_t)m * K + src];
            pair[o] = *reinterpret_cast<const unsigned short*>(&val);
        }
        words[p] = pair[0] | ((unsigned)pair[1] << 16);
    }
    xf[(size_t)gc * 64 + u] = make_uint4(words[0], words[1], words[2], words[3]);
}
