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
// warpgroups and 128 * NW output columns: each warp holds NW 16-column tiles, one wgmma each per 16 rows of K,
// all multiplying the same staged activations (a wider CTA reads the activations once for more weights). A warp
// dequantises several K steps together (a whole chunk for tiles of up to 64 rows) and issues their wgmmas as one
// group, which stays in flight while it dequantises the next; a stage's wgmmas complete before the barrier that
// lets its buffer be refilled. 16-row tiles on chunk-uniform groups scale each chunk's product instead of the
// weights (see kPostScale).
//
// qwgmma needs sm_90a (wgmma); compiled for any other target its body traps, and dispatch never launches it
// there. frag_xw is plain CUDA.
#include "tensor_tiles.cuh"

namespace cupyq {
namespace qwgmma_detail {
using namespace qmma_detail;

constexpr int kXGroupBytes = 1024;  // one 8-row group's core matrices of one chunk

// The shared-memory matrix descriptor of wgmma's B operand, no swizzle, as its two 32-bit words: the start
// address and the byte distance between core matrices adjacent in K (leading) in the low word, the distance
// between those adjacent in the batch dimension (stride) in the high word, each in units of 16 bytes. Offsets
// are added to the low word: shared addresses stay below 256 KB, so the 14-bit address field does not carry.
struct SmemDesc {
    unsigned lo, hi;
    __device__ __forceinline__ SmemDesc plus(unsigned bytes) const { return {lo + (bytes >> 4), hi}; }
};
__device__ __forceinline__ SmemDesc smem_desc(unsigned addr, unsigned lead_bytes, unsigned stride_bytes) {
    return {((addr & 0x3FFFF) >> 4) | ((lead_bytes >> 4) << 16), stride_bytes >> 4};
}

// One wgmma.mma_async m64nNk16 with A (the dequantised weights) in registers: d = A * B + (scale_d ? d : 0).
template <typename T, int NB>
struct Wgmma;

template <>
struct Wgmma<__half, 16> {
    static __device__ __forceinline__ void run(float (&d)[8], const unsigned (&a)[4], SmemDesc desc,
                                               int scale_d = 1) {
        asm volatile(
            "{\n.reg .pred p;\n.reg .b64 desc;\nsetp.ne.b32 p, %14, 0;\nmov.b64 desc, {%12, %13};\n"
            "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, desc, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(desc.lo), "r"(desc.hi), "r"(scale_d));
    }
};

template <>
struct Wgmma<__nv_bfloat16, 16> {
    static __device__ __forceinline__ void run(float (&d)[8], const unsigned (&a)[4], SmemDesc desc,
                                               int scale_d = 1) {
        asm volatile(
            "{\n.reg .pred p;\n.reg .b64 desc;\nsetp.ne.b32 p, %14, 0;\nmov.b64 desc, {%12, %13};\n"
            "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, desc, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(desc.lo), "r"(desc.hi), "r"(scale_d));
    }
};

template <>
struct Wgmma<__half, 32> {
    static __device__ __forceinline__ void run(float (&d)[16], const unsigned (&a)[4], SmemDesc desc,
                                               int scale_d = 1) {
        asm volatile(
            "{\n.reg .pred p;\n.reg .b64 desc;\nsetp.ne.b32 p, %22, 0;\nmov.b64 desc, {%20, %21};\n"
            "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, desc, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(desc.lo), "r"(desc.hi), "r"(scale_d));
    }
};

template <>
struct Wgmma<__nv_bfloat16, 32> {
    static __device__ __forceinline__ void run(float (&d)[16], const unsigned (&a)[4], SmemDesc desc,
                                               int scale_d = 1) {
        asm volatile(
            "{\n.reg .pred p;\n.reg .b64 desc;\nsetp.ne.b32 p, %22, 0;\nmov.b64 desc, {%20, %21};\n"
            "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, desc, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(desc.lo), "r"(desc.hi), "r"(scale_d));
    }
};

template <>
struct Wgmma<__half, 64> {
    static __device__ __forceinline__ void run(float (&d)[32], const unsigned (&a)[4], SmemDesc desc,
                                               int scale_d = 1) {
        asm volatile(
            "{\n.reg .pred p;\n.reg .b64 desc;\nsetp.ne.b32 p, %38, 0;\nmov.b64 desc, {%36, %37};\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, desc, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(desc.lo), "r"(desc.hi), "r"(scale_d));
    }
};

template <>
struct Wgmma<__nv_bfloat16, 64> {
    static __device__ __forceinline__ void run(float (&d)[32], const unsigned (&a)[4], SmemDesc desc,
                                               int scale_d = 1) {
        asm volatile(
            "{\n.reg .pred p;\n.reg .b64 desc;\nsetp.ne.b32 p, %38, 0;\nmov.b64 desc, {%36, %37};\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, desc, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(desc.lo), "r"(desc.hi), "r"(scale_d));
    }
};

template <>
struct Wgmma<__half, 128> {
    static __device__ __forceinline__ void run(float (&d)[64], const unsigned (&a)[4], SmemDesc desc,
                                               int scale_d = 1) {
        asm volatile(
            "{\n.reg .pred p;\n.reg .b64 desc;\nsetp.ne.b32 p, %70, 0;\nmov.b64 desc, {%68, %69};\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, desc, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(desc.lo), "r"(desc.hi), "r"(scale_d));
    }
};

template <>
struct Wgmma<__nv_bfloat16, 128> {
    static __device__ __forceinline__ void run(float (&d)[64], const unsigned (&a)[4], SmemDesc desc,
                                               int scale_d = 1) {
        asm volatile(
            "{\n.reg .pred p;\n.reg .b64 desc;\nsetp.ne.b32 p, %70, 0;\nmov.b64 desc, {%68, %69};\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, desc, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(desc.lo), "r"(desc.hi), "r"(scale_d));
    }
};

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

template <int NB, int NW, int KS, int STAGES, int ZR, bool HAS8>
struct WShape {
    static constexpr int kNT = 8 * NW;  // 16-column tiles of a CTA: NW per warp
    static constexpr int kNTile = kNT * 16;
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
    static_assert(NB == 16 || NB == 32 || NB == 64 || NB == 128, "wgmma batch tile");
    static_assert(NW == 1 || NW == 2, "column sets per warp");
    static_assert(4 % KS == 0 || KS % 4 == 0, "stages must not straddle a storage segment (256 rows)");
    static_assert(kWBytes % 128 == 0, "core matrices stay 128-byte aligned");
};

}  // namespace qwgmma_detail
}  // namespace cupyq

// Parameters: as qmma (cupyq/kernels.py QMMA_PARAMS), except that x holds the activations in the layout of
// frag_xw: ceil(M / 8) groups of (C8 + C4) chunks of 1 KB. Dynamic shared memory: WShape<...>::kSmemBytes.
// Tiles of up to 32 x 128 whose stages fit two CTAs in a multiprocessor's shared memory (228 KB, less 1 KB per
// CTA for the system) run two CTAs per multiprocessor; their registers are held to the 128 per thread that two
// CTAs allow. Larger tiles measured the same with two CTAs as with one (BENCHMARKS.md) and keep one, with all
// the registers it needs.
template <typename T, int NB, int NW, int KS, int STAGES, int ZR, bool HAS8, bool HAS4>
__global__ void __launch_bounds__(
    cupyq::qmma_detail::kThreads,
    NB * NW <= 32 && cupyq::qwgmma_detail::WShape<NB, NW, KS, STAGES, ZR, HAS8>::kSmemBytes <= 113 * 1024 ? 2 : 1)
    qwgmma(const T* __restrict__ x, const uint4* __restrict__ w8, const uint4* __restrict__ w4,
           const int* __restrict__ tile_group, const unsigned* __restrict__ zs, const T* __restrict__ bias,
           T* __restrict__ out, float* __restrict__ ws, int* __restrict__ counters, int M, int N, int Npad, int C8,
           int C4) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using namespace cupyq;
    using namespace cupyq::qmma_detail;
    using namespace cupyq::qwgmma_detail;
    using S = WShape<NB, NW, KS, STAGES, ZR, HAS8>;
    constexpr int kNT = S::kNT;
    constexpr int kNTile = S::kNTile;
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
    // The stage copies walk (m block, column block, stage) in stream-K order; what depends on the column and m
    // block (source bases, valid runs, this thread's scale/zero columns) is worked out when the block changes,
    // so a stage's copy costs an add per source.
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
    const uint4* w8_block;  // chunk 0 of the column block's first tile
    const uint4* w4_block;  // chunk C8 (the first 4-bit chunk) of the same
    const uint4* x_block;   // chunk 0 of the m block's first 8-row group
    const unsigned* z_block[S::kZPerThread];  // this thread's scale/zero columns in group 0; null past Npad
    int w_runs, x_runs;
    auto enter_block = [&]() {
        w8_block = w8 + (size_t)p_nb * kNT * C8 * 64;
        w4_block = w4 + (size_t)p_nb * kNT * C4 * 32;
        x_block = xw + (size_t)p_mb * S::kXGroups * chunks * (kXGroupBytes / 16);
        w_runs = T16 - p_nb * kNT;
        x_runs = xgroups - p_mb * S::kXGroups;
#pragma unroll
        for (int r = 0; r < S::kZPerThread; ++r) {
            const int col = p_nb * kNTile + ((tid + r * kThreads) % (kNTile / 4)) * 4;
            z_block[r] = col < Npad ? zs + col : nullptr;
        }
    };
    enter_block();
    unsigned char* const zsm0 = smem + S::kWBytes + S::kXBytes;
    auto load_stage = [&](int buf) {
        const int chunk0 = p_ks * KS;
        const unsigned st_u32 = smem_u32(smem) + (unsigned)buf * S::kStageBytes;
        const bool is8 = HAS8 && (!HAS4 || chunk0 < C8);
        if (HAS8 && is8) {
            copy_w8.copy(st_u32, w8_block + (size_t)chunk0 * 64, w_runs, tid);
        } else {
            copy_w4.copy(st_u32, w4_block + (size_t)(chunk0 - C8) * 32, w_runs, tid);
        }
        copy_x.copy(st_u32 + S::kWBytes, x_block + (size_t)chunk0 * (kXGroupBytes / 16), x_runs, tid);
        unsigned char* zsm = zsm0 + (size_t)buf * S::kStageBytes;
#pragma unroll
        for (int r = 0; r < S::kZPerThread; ++r) {
            const int u = tid + r * kThreads;
            if (u < S::kZUnits) {
                const int row = u / (kNTile / 4);
                const int q = u - row * (kNTile / 4);
                const bool ok = z_block[r] != nullptr;
                const unsigned* src = ok ? z_block[r] + (size_t)zgroup[r] * Npad : zs;
                cp_async16(zsm + ((size_t)row * S::kZLd + q * 4) * 4, src, ok);
            }
        }
        if (++p_ks == ksteps) {
            p_ks = 0;
            if (++p_nb == nblocks) {
                p_nb = 0;
                ++p_mb;
            }
            enter_block();
        }
    };

    // ------------------------------------------------------------ consumer
    // Column set s of warp w is the 16-column tile w + 8s of the CTA. Accumulator d[s][4i + 2h + e] of a lane:
    // batch row 8i + 2t + e of the tile, column 16 * (warp + 8s) + g + 8h.
    float d[NW][NB / 2];
    auto clear = [&]() {
#pragma unroll
        for (int s = 0; s < NW; ++s)
#pragma unroll
            for (int i = 0; i < NB / 2; ++i) d[s][i] = 0.0f;
    };
    clear();

    // K steps per commit group: the whole chunk; half of it for two 64-row column sets; one step for 128-row
    // tiles, whose wgmmas are long enough to cover the next step's dequantisation (grouping four measured 3-4 %
    // slower at m = 128 and 256, in two runs on different machines: no gain to keep).
    constexpr int kGroupSteps = NB >= 128 ? 1 : NB * NW >= 128 ? 2 : 4;
    // 16-row tiles on chunk-uniform groups (ZR = 1) multiply the exact integers (q - z) and scale each chunk's
    // fp32 product once per column, as qgemv does: the wgmmas of chunk cc write tmp[cc % 2], which is added to d
    // with the chunk's scales once its group has completed (one chunk later, or at the end of the stage). Per
    // chunk that is 8 FMAs per thread instead of 16 fp16 multiplies; larger tiles have more accumulators than
    // multiplies to save.
    constexpr bool kPostScale = NB == 16 && NW == 1 && ZR == 1;
    float tmp[2][NB / 2];
    float2 tmp_scale[2];
#pragma unroll
    for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int i = 0; i < NB / 2; ++i) tmp[b][i] = 0.0f;
    auto fold = [&](int b) {  // accumulator i belongs to column g + 8 * ((i / 2) % 2) (see d)
#pragma unroll
        for (int i = 0; i < NB / 2; ++i) d[0][i] += ((i >> 1) & 1 ? tmp_scale[b].y : tmp_scale[b].x) * tmp[b][i];
    };
    auto compute_chunk = [&](const unsigned char* st, int cc, auto is8_tag) {
        constexpr bool IS8 = decltype(is8_tag)::is8;
        constexpr int kVecs = IS8 ? 2 : 1;
        using D = Dequant<T>;
        const uint4* wsm = reinterpret_cast<const uint4*>(st);
        const unsigned* zsm = reinterpret_cast<const unsigned*>(st + S::kWBytes + S::kXBytes);
        typename D::Consts c[NW];
        uint4 v[NW][kVecs];
#pragma unroll
        for (int s = 0; s < NW; ++s) {
            const int tile = warp + 8 * s;
            const unsigned* zrow = zsm + (ZR == 4 ? cc * 4 + t : cc) * S::kZLd + tile * 16 + g;
            c[s] = D::template consts<IS8>(zrow[0], zrow[8]);
            if constexpr (kPostScale)  // the fp16 scales of the lane's two columns (low halves of the words)
                tmp_scale[cc & 1] = make_float2(__low2float(as_half2(zrow[0])), __low2float(as_half2(zrow[8])));
#pragma unroll
            for (int h = 0; h < kVecs; ++h) v[s][h] = wsm[((size_t)tile * KS + cc) * 32 * kVecs + 32 * h + lane];
        }
        // Descriptor of this chunk's core matrices; those of its four K steps are 256 bytes apart.
        const SmemDesc xdesc = smem_desc(smem_u32(st + S::kWBytes) + cc * kXGroupBytes, 128, KS * kXGroupBytes);
        // The K steps of a chunk are dequantised together and their wgmmas issued as groups of kGroupSteps
        // steps: many independent dequantisation chains per warp, and several wgmmas queued per warpgroup.
#pragma unroll
        for (int j0 = 0; j0 < 4; j0 += kGroupSteps) {
            unsigned a[kGroupSteps][NW][4];
#pragma unroll
            for (int jj = 0; jj < kGroupSteps; ++jj)
#pragma unroll
                for (int s = 0; s < NW; ++s) {
                    const int j = j0 + jj;
                    if constexpr (IS8) {
                        const uint4& w = v[s][j / 2];
                        if constexpr (kPostScale)
                            D::word8_exact(j % 2 ? w.z : w.x, j % 2 ? w.w : w.y, c[s], a[jj][s]);
                        else
                            D::word8(j % 2 ? w.z : w.x, j % 2 ? w.w : w.y, c[s], a[jj][s]);
                    } else {
                        const uint4& w = v[s][0];
                        const unsigned word = j == 0 ? w.x : j == 1 ? w.y : j == 2 ? w.z : w.w;
                        if constexpr (kPostScale)
                            D::word4_exact(word, c[s], a[jj][s]);
                        else
                            D::word4(word, c[s], a[jj][s]);
                    }
                }
            wgmma_fence();
            // The column sets multiply the same activations (one B descriptor per K step).
#pragma unroll
            for (int jj = 0; jj < kGroupSteps; ++jj)
#pragma unroll
                for (int s = 0; s < NW; ++s) {
                    if constexpr (kPostScale)  // the chunk's first K step overwrites tmp
                        Wgmma<T, NB>::run(tmp[cc & 1], a[jj][s], xdesc.plus((j0 + jj) * 256), j0 + jj > 0);
                    else
                        Wgmma<T, NB>::run(d[s], a[jj][s], xdesc.plus((j0 + jj) * 256));
                }
            wgmma_commit();
            wgmma_wait<1>();  // the previous group's fragment registers (and products) are complete
        }
        if constexpr (kPostScale)
            if (cc > 0) fold((cc - 1) & 1);
    };

    auto finish_tile = [&](int it) {
        const int tile = it / ksteps;
        const int nb = tile % nblocks;
        const int mb = tile / nblocks;
        const int m0 = mb * NB;
        const int n0 = nb * kNTile;
        const long long first_it = (long long)tile * ksteps;
        const bool whole = first_it >= begin && first_it + ksteps <= end;
        // each_acc(f): f(batch row in the tile, column in the tile, accumulator) for every accumulator of the lane.
        auto each_acc = [&](auto f) {
#pragma unroll
            for (int s = 0; s < NW; ++s)
#pragma unroll
                for (int i = 0; i < NB / 8; ++i)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
#pragma unroll
                        for (int e = 0; e < 2; ++e)
                            f(8 * i + 2 * t + e, (warp + 8 * s) * 16 + g + 8 * h, d[s][4 * i + 2 * h + e]);
        };
        if (whole) {
            each_acc([&](int r, int col, float acc) {
                const int m = m0 + r;
                const int n = n0 + col;
                if (m < M && n < N) {
                    float o = acc;
                    if (bias) o += to_float<T>(bias[n]);
                    out[(size_t)m * N + n] = from_float<T>(o);
                }
            });
        } else {
            const int slot = tile == begin / ksteps ? 0 : 1;
            float* part = ws + ((size_t)blockIdx.x * 2 + slot) * NB * kNTile;
            each_acc([&](int r, int col, float acc) { part[(size_t)r * kNTile + col] = acc; });
            add_partials<T, NB, kNTile>(ws, counters, tile, first_it, ksteps, total, ctas, m0, n0, M, N, bias, out,
                                        tid, &is_last);
        }
        clear();
    };

    // ------------------------------------------------------------ the pipeline (as qmma)
    read_groups();
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (begin + s < end) {
            load_stage(s);
            if (begin + s + 1 < end) read_groups();
        }
        cp_async_commit();
    }
    int c_ks = begin % ksteps;
    int c_buf = 0;              // the buffer of stage it: (it - begin) % STAGES
    int p_buf = STAGES - 1;     // the buffer of stage it + STAGES - 1
    for (int it = begin; it < end; ++it) {
        cp_async_wait<STAGES - 2>();
        // The copies were ordinary (generic-proxy) writes; wgmma reads shared memory through the async proxy.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        const int ahead = it + STAGES - 1;
        if (ahead < end) {
            load_stage(p_buf);
            if (ahead + 1 < end) read_groups();
        }
        cp_async_commit();
        if (++p_buf == STAGES) p_buf = 0;

        const unsigned char* st = smem + (size_t)c_buf * S::kStageBytes;
        if (++c_buf == STAGES) c_buf = 0;
        const bool is8 = HAS8 && (!HAS4 || c_ks * KS < C8);
        // Each branch completes its wgmmas before the branches join (this stage's buffer may be refilled after the
        // next barrier): the compiler may move the accumulators at the join, which it must not do while a wgmma
        // still writes them.
        if (HAS8 && is8) {
#pragma unroll
            for (int cc = 0; cc < KS; ++cc) compute_chunk(st, cc, StorageTag<HAS8>{});
            wgmma_wait<0>();
            if constexpr (kPostScale) fold((KS - 1) & 1);
        } else {
#pragma unroll
            for (int cc = 0; cc < KS; ++cc) compute_chunk(st, cc, StorageTag<false>{});
            wgmma_wait<0>();
            if constexpr (kPostScale) fold((KS - 1) & 1);
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
            const T val = sorted_x(x, row_src, m, M, K, k);
            pair[o] = *reinterpret_cast<const unsigned short*>(&val);
        }
        words[p] = pair[0] | ((unsigned)pair[1] << 16);
    }
    xf[(size_t)gc * 64 + u] = make_uint4(words[0], words[1], words[2], words[3]);
}
