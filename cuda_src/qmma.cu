// Pipelined tensor-core GEMM for batches of rows (qmma), and the transposed dequantisation of the dense path.
//
// qmma computes out[m, n] = sum_k x[m, k] W[k, n] (+ bias[n]) with the activations as the A operand of
// mma.m16n8k16 (16 batch rows x 16 rows of K) and the dequantised weights as the B operand (16 rows of K x 8
// columns). The weight layout is the fragment order of qdq.cuh: inside a 64-row chunk the lane with lane%4 == t
// owns rows t*16 .. t*16 + 15, and word j of its uint4 holds rows t*16 + 8*kh + 2*j + {0, 1} of columns
// n0 + lane/4 and n0 + 8 + lane/4. Mma j of a chunk therefore sums over a permutation of the chunk's rows (its
// "virtual" k = 2t + {0,1} and 8 + 2t + {0,1} are rows t*16 + 2j + {0,1} and t*16 + 8 + 2j + {0,1}).
//
// The activations reach qmma in the matching A-fragment order, written by frag_x: for every 16 batch rows and
// 64-row chunk, 4 x 32 uint4, where uint4 (j, lane) is lane's A fragment of mma j. One 16-byte shared load then
// gives a fragment in the four consecutive registers mma.sync wants (staged in natural order, each fragment
// took four register moves, as many instructions as its dequantisation).
//
// Work: the CTA tile is kMTile batch rows x kNTile columns; its K range is cut into stages of KS chunks. The
// (m block, column block, stage) iterations are numbered m block-major and split into gridDim.x equal
// contiguous ranges, one per CTA (stream-K): a CTA walks its range with a STAGES-deep ring of cp.async copies
// (weights, activations and the scale/zero words of each stage go global -> shared), so the copies run ahead
// across tile boundaries. Inside a CTA, 8 warps = kWK (K slices: each warp multiplies every kWK-th chunk of a
// stage) x WM x WN; at the end of a tile the K slices are added in shared memory. A CTA that covers a tile's
// whole K range writes the tile; otherwise it writes fp32 partial sums to `ws`, and the last of the tile's CTAs
// to finish (counted in `counters`, which it resets) adds them in CTA order, so results do not depend on
// scheduling and the kernel can be replayed in a CUDA graph.
#include "tensor_tiles.cuh"

namespace cupyq {
namespace qmma_detail {

// Shapes and shared-memory layout of one configuration (the host computes the same sizes: cupyq/kernels.py).
template <int MW, int NW, int WM, int WN, int KS, int STAGES, int ZR, bool HAS8>
struct Shape {
    static constexpr int kWK = kWarps / (WM * WN);     // K slices per CTA
    static constexpr int kMTile = WM * MW * 16;         // batch rows per tile
    static constexpr int kNT = WN * NW;                 // 16-column tiles per tile
    static constexpr int kNTile = kNT * 16;
    static constexpr int kChunkVecs = HAS8 ? 64 : 32;   // uint4 per (16-column tile, 64-row chunk), widest storage
    static constexpr int kMBlocks = kMTile / 16;        // 16-row blocks of fragment-ordered activations
    static constexpr int kXVecs = 128;                  // uint4 per (16-row block, chunk): 4 mma x 32 lanes
    static constexpr int kZLd = kNTile + 8;             // scale/zero words per staged row (ZR rows per chunk)
    static constexpr int kWBytes = kNT * KS * kChunkVecs * 16;
    static constexpr int kXBytes = kMBlocks * KS * kXVecs * 16;
    static constexpr int kZBytes = KS * ZR * kZLd * 4;
    static constexpr int kStageBytes = kWBytes + kXBytes + kZBytes;
    static constexpr int kRedBytes = (kWK - 1) * kMTile * kNTile * 4;
    static constexpr int kSmemBytes = STAGES * kStageBytes + kRedBytes;
    static constexpr int kZUnits = KS * ZR * kNTile / 4;  // 16-byte copies of scale/zero words per stage
    static constexpr int kZPerThread = (kZUnits + kThreads - 1) / kThreads;
    static_assert(kWK >= 1 && kWK * WM * WN == kWarps, "8 warps = K slices x WM x WN");
    static_assert(KS % kWK == 0, "every K slice gets the same number of chunks per stage");
    static_assert(4 % KS == 0 || KS % 4 == 0, "stages must not straddle a storage segment (256 rows)");
    static_assert(ZR == 1 || ZR == 4, "one scale/zero row per chunk (its four tiles share a group) or per tile");
};

}  // namespace qmma_detail
}  // namespace cupyq

// Parameters:
//   x: the activations in A-fragment order (frag_x): ceil(M / 16) blocks of (C8 + C4) chunks of 128 uint4.
//   w8, w4, tile_group, zs: the device layout (qdq.cuh, cupyq/layout.py). bias: [N] or null.
//   out: [M, N]. ws: fp32, 2 * gridDim.x * kMTile * kNTile. counters: int, one per (m block, column block),
//   zero before the first launch (the kernel leaves them zero).
//   C8, C4: 64-row chunks of 8-bit and 4-bit storage (multiples of 4).
//   ZR: 1 when the four 16-row tiles of every chunk share a group (tile_group[4c .. 4c + 3] equal), else 4.
// Dynamic shared memory: Shape<...>::kSmemBytes (checked: the kernel traps when given less).
template <typename T, int MW, int NW, int WM, int WN, int KS, int STAGES, int ZR, int MINB, bool HAS8, bool HAS4>
__global__ void __launch_bounds__(cupyq::qmma_detail::kThreads, MINB)
    qmma(const T* __restrict__ x, const uint4* __restrict__ w8, const uint4* __restrict__ w4,
         const int* __restrict__ tile_group, const unsigned* __restrict__ zs, const T* __restrict__ bias,
         T* __restrict__ out, float* __restrict__ ws, int* __restrict__ counters, int M, int N, int Npad, int C8,
         int C4) {
    using namespace cupyq;
    using namespace cupyq::qmma_detail;
    using S = Shape<MW, NW, WM, WN, KS, STAGES, ZR, HAS8>;
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ int is_last;

    {
        unsigned given;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(given));
        if (given < (unsigned)S::kSmemBytes) __trap();
    }

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int wk = warp / (WM * WN);
    const int wm = (warp % (WM * WN)) / WN;
    const int wn = warp % WN;
    const int g = lane >> 2;
    const int t = lane & 3;

    const int T16 = Npad / 16;
    const int ksteps = (C8 + C4) / KS;
    const int nblocks = (T16 + S::kNT - 1) / S::kNT;
    const int mblocks = (M + S::kMTile - 1) / S::kMTile;
    const long long total = (long long)mblocks * nblocks * ksteps;
    const long long ctas = gridDim.x;
    const int begin = (int)range_begin(blockIdx.x, total, ctas);
    const int end = (int)range_begin(blockIdx.x + 1, total, ctas);
    if (begin >= end) return;

    // ---------------------------------------------------------------- producer: one stage of copies
    // Tile group of each of this thread's scale/zero copies, read one stage ahead of the copies that need it.
    int zgroup[S::kZPerThread];
    // Position (K step, column block, m block) of the next stage to load, and K step of the next groups to
    // read: both walk the CTA's range one iteration at a time.
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
            const int row = u / (S::kNTile / 4);  // staged row: (chunk, 16-row tile) or chunk when ZR == 1
            zgroup[r] = u < S::kZUnits ? __ldg(tile_group + (g_ks * KS) * 4 + (ZR == 4 ? row : row * 4)) : 0;
        }
        if (++g_ks == ksteps) g_ks = 0;
    };
    const uint4* xf = reinterpret_cast<const uint4*>(x);
    const int xblocks = (M + 15) / 16;
    const int chunks = C8 + C4;
    // One stage: for each of the tile's 16-column tiles its KS chunks of weights (one contiguous run), for each of
    // its 16-row blocks its KS chunks of activations (one run), and the chunks' scale/zero rows. Runs past the
    // matrix (last column block, last m block) are not copied: their columns and rows are never written.
    RunCopy<S::kNT, KS * 64> copy_w8;
    RunCopy<S::kNT, KS * 32> copy_w4;
    RunCopy<S::kMBlocks, KS * S::kXVecs> copy_x;
    if (HAS8) copy_w8.init(C8 * 64, tid);
    if (HAS4) copy_w4.init(C4 * 32, tid);
    copy_x.init(chunks * S::kXVecs, tid);
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
            copy_w8.copy(st_u32, w8 + ((size_t)nb * S::kNT * C8 + chunk0) * 64, T16 - nb * S::kNT, tid);
        } else {
            copy_w4.copy(st_u32, w4 + ((size_t)nb * S::kNT * C4 + (chunk0 - C8)) * 32, T16 - nb * S::kNT, tid);
        }
        unsigned char* xs = st + S::kWBytes;
        copy_x.copy(st_u32 + S::kWBytes, xf + ((size_t)mb * S::kMBlocks * chunks + chunk0) * S::kXVecs,
                    xblocks - mb * S::kMBlocks, tid);
        unsigned char* zsm = xs + S::kXBytes;
#pragma unroll
        for (int r = 0; r < S::kZPerThread; ++r) {
            const int u = tid + r * kThreads;
            if (u < S::kZUnits) {
                const int row = u / (S::kNTile / 4);
                const int q = u - row * (S::kNTile / 4);
                const int col = nb * S::kNTile + q * 4;
                const bool ok = col < Npad;
                const unsigned* src = ok ? zs + (size_t)zgroup[r] * Npad + col : zs;
                cp_async16(zsm + ((size_t)row * S::kZLd + q * 4) * 4, src, ok);
            }
        }
    };

    // ---------------------------------------------------------------- consumer
    float acc[MW][NW][2][4];
    // f(a, b, h, e) for every accumulator element of the lane; f2(a, b, h, e2) for every pair (e2*2, e2*2 + 1)
    // of adjacent columns (loops unrolled).
    auto each_acc = [&](auto&& f) { for_each_acc<MW, NW, 4>(f); };
    auto each_pair = [&](auto&& f2) { for_each_acc<MW, NW, 2>(f2); };
    auto clear_acc = [&]() { each_acc([&](int a, int b, int h, int e) { acc[a][b][h][e] = 0.0f; }); };
    clear_acc();

    auto compute_chunk = [&](const unsigned char* st, int cc, auto is8_tag) {
        constexpr bool IS8 = decltype(is8_tag)::is8;
        constexpr int kVecs = IS8 ? 2 : 1;  // uint4 of a lane per (16-column tile, chunk)
        using D = Dequant<T>;
        const uint4* wsm = reinterpret_cast<const uint4*>(st);
        const uint4* xsm = reinterpret_cast<const uint4*>(st + S::kWBytes);
        const unsigned* zsm = reinterpret_cast<const unsigned*>(st + S::kWBytes + S::kXBytes);
        typename D::Consts c[NW];
        uint4 v[NW][kVecs];
#pragma unroll
        for (int i = 0; i < NW; ++i) {
            const int ct = wn * NW + i;
            const unsigned* zrow = zsm + (ZR == 4 ? cc * 4 + t : cc) * S::kZLd + ct * 16 + g;
            c[i] = D::template consts<IS8>(zrow[0], zrow[8]);
#pragma unroll
            for (int h = 0; h < kVecs; ++h) v[i][h] = wsm[((size_t)ct * KS + cc) * 32 * kVecs + 32 * h + lane];
        }
        // Mma j: dequantise word j of every column tile, then multiply it with each batch tile's fragment j.
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            unsigned b[NW][4];
#pragma unroll
            for (int i = 0; i < NW; ++i) {
                if constexpr (IS8) {
                    const uint4& w = v[i][j / 2];
                    D::word8(j % 2 ? w.z : w.x, j % 2 ? w.w : w.y, c[i], b[i]);
                } else {
                    const uint4& w = v[i][0];
                    D::word4(j == 0 ? w.x : j == 1 ? w.y : j == 2 ? w.z : w.w, c[i], b[i]);
                }
            }
#pragma unroll
            for (int mt = 0; mt < MW; ++mt) {
                const uint4 av = xsm[((size_t)(wm * MW + mt) * KS + cc) * S::kXVecs + j * 32 + lane];
                const unsigned a[4] = {av.x, av.y, av.z, av.w};
#pragma unroll
                for (int i = 0; i < NW; ++i) {
                    Mma<T>::run(acc[mt][i][0], a, b[i][0], b[i][2]);
                    Mma<T>::run(acc[mt][i][1], a, b[i][1], b[i][3]);
                }
            }
        }
    };

    // Accumulator element (mt, i, h, e) of a lane: batch row (wm*MW + mt)*16 + g + 8*(e/2) of the tile, column
    // (wn*NW + i)*16 + 8*h + 2*t + e%2.
    auto finish_tile = [&](int it) {
        const int tile = it / ksteps;
        const int nb = tile % nblocks;
        const int mb = tile / nblocks;
        const int m0 = mb * S::kMTile;
        const int n0 = nb * S::kNTile;
        float* red = reinterpret_cast<float*>(smem + (size_t)STAGES * S::kStageBytes);
        if (S::kWK > 1) {
            constexpr int kRegs = MW * NW * 8;
            const int slot = warp % (WM * WN);
            if (wk > 0) {
                float* dst = red + ((size_t)(wk - 1) * (WM * WN) + slot) * kRegs * 32 + lane;
                each_acc([&](int a, int b, int h, int e) {
                    dst[(((a * NW + b) * 2 + h) * 4 + e) * 32] = acc[a][b][h][e];
                });
            }
            __syncthreads();
            if (wk == 0) {
                for (int s = 1; s < S::kWK; ++s) {
                    const float* src = red + ((size_t)(s - 1) * (WM * WN) + slot) * kRegs * 32 + lane;
                    each_acc([&](int a, int b, int h, int e) {
                        acc[a][b][h][e] += src[(((a * NW + b) * 2 + h) * 4 + e) * 32];
                    });
                }
            }
        }
        const long long first_it = (long long)tile * ksteps;
        const bool whole = first_it >= begin && first_it + ksteps <= end;
        if (whole) {
            if (wk == 0) {
                each_pair([&](int a, int b, int h, int e2) {
                    const int m = m0 + (wm * MW + a) * 16 + g + 8 * e2;
                    const int n = n0 + (wn * NW + b) * 16 + 8 * h + 2 * t;
                    if (m >= M) return;
#pragma unroll
                    for (int e1 = 0; e1 < 2; ++e1) {
                        if (n + e1 < N) {
                            float v = acc[a][b][h][e2 * 2 + e1];
                            if (bias) v += to_float<T>(bias[n + e1]);
                            out[(size_t)m * N + n + e1] = from_float<T>(v);
                        }
                    }
                });
            }
        } else {
            const int slot = tile == begin / ksteps ? 0 : 1;
            float* part = ws + ((size_t)blockIdx.x * 2 + slot) * S::kMTile * S::kNTile;
            if (wk == 0) {
                each_pair([&](int a, int b, int h, int e2) {
                    const int r = (wm * MW + a) * 16 + g + 8 * e2;
                    const int c = (wn * NW + b) * 16 + 8 * h + 2 * t;
                    *reinterpret_cast<float2*>(part + (size_t)r * S::kNTile + c) =
                        make_float2(acc[a][b][h][e2 * 2], acc[a][b][h][e2 * 2 + 1]);
                });
            }
            add_partials<T, S::kMTile, S::kNTile>(ws, counters, tile, first_it, ksteps, total, ctas, m0, n0, M, N,
                                                  bias, out, tid, &is_last);
        }
        clear_acc();
    };

    // ---------------------------------------------------------------- the pipeline
    read_groups();
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (begin + s < end) {
            load_stage((begin + s) % STAGES);  // buffers are indexed by iteration, as below
            if (begin + s + 1 < end) read_groups();
        }
        cp_async_commit();
    }
    int c_ks = begin % ksteps;  // K step of the iteration being multiplied
    for (int it = begin; it < end; ++it) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage `it` is in shared memory, and every warp is done with the buffer refilled next
        const int ahead = it + STAGES - 1;
        if (ahead < end) {
            load_stage(ahead % STAGES);
            if (ahead + 1 < end) read_groups();
        }
        cp_async_commit();

        const unsigned char* st = smem + (size_t)(it % STAGES) * S::kStageBytes;
        const bool is8 = HAS8 && (!HAS4 || c_ks * KS < C8);
        if (HAS8 && is8) {
#pragma unroll
            for (int r = 0; r < KS / S::kWK; ++r) compute_chunk(st, wk + r * S::kWK, StorageTag<HAS8>{});
        } else {
#pragma unroll
            for (int r = 0; r < KS / S::kWK; ++r) compute_chunk(st, wk + r * S::kWK, StorageTag<false>{});
        }
        if (it + 1 == end || c_ks == ksteps - 1) finish_tile(it);
        if (++c_ks == ksteps) c_ks = 0;
    }
    cp_async_wait<0>();
}

// W^T in sorted padded row order: outT[n, j - 64*chunk_begin] = W[j, n] for sorted rows j of chunks
// [chunk_begin, chunk_begin + gridDim.y * kChunksPerCta), padding rows zero; row stride ld_out elements (a
// multiple of 8), rows n < Npad. Each lane writes its column's 16 rows of a chunk as two 16-byte stores, so the
// pass needs no shared memory. Grid: x = 16-column tiles / 8 (one per warp), y = chunk blocks.
template <typename T, bool HAS8, bool HAS4>
__global__ void __launch_bounds__(cupyq::qmma_detail::kThreads)
    dequant_t(const uint4* __restrict__ w8, const uint4* __restrict__ w4, const int* __restrict__ tile_group,
              const unsigned* __restrict__ zs, T* __restrict__ outT, int ld_out, int Npad, int C8, int C4,
              int chunk_begin, int chunk_end) {
    using namespace cupyq;
    using namespace cupyq::qmma_detail;
    constexpr int kChunksPerCta = kDequantTChunks;
    const int lane = threadIdx.x & 31;
    const int tile = blockIdx.x * kWarps + (threadIdx.x >> 5);
    if (tile >= Npad / 16) return;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int n_lo = tile * 16 + g;
    const int first = chunk_begin + blockIdx.y * kChunksPerCta;
    const int count = min(kChunksPerCta, chunk_end - first);
    // Every load of the CTA's chunks is issued before the first use: the pass is bound by memory latency.
    uint4 v[kChunksPerCta][2];
    int grp[kChunksPerCta];
#pragma unroll
    for (int i = 0; i < kChunksPerCta; ++i) {
        const int chunk = first + i;
        if (i >= count) break;
        grp[i] = __ldg(tile_group + chunk * 4 + t);
        if (HAS8 && (!HAS4 || chunk < C8)) {
            const uint4* p = w8 + ((size_t)tile * C8 + chunk) * 64 + lane;
            v[i][0] = __ldg(p);
            v[i][1] = __ldg(p + 32);
        } else {
            v[i][0] = __ldg(w4 + ((size_t)tile * C4 + (chunk - C8)) * 32 + lane);
        }
    }
    unsigned zlo[kChunksPerCta], zhi[kChunksPerCta];
#pragma unroll
    for (int i = 0; i < kChunksPerCta; ++i) {
        if (i >= count) break;
        zlo[i] = __ldg(zs + (size_t)grp[i] * Npad + n_lo);
        zhi[i] = __ldg(zs + (size_t)grp[i] * Npad + n_lo + 8);
    }
#pragma unroll
    for (int i = 0; i < kChunksPerCta; ++i) {
        if (i >= count) break;
        const int chunk = first + i;
        const bool is8 = HAS8 && (!HAS4 || chunk < C8);
        unsigned b[4][4];
        if (HAS8 && is8) {
            const auto c = Dequant<T>::template consts<true>(zlo[i], zhi[i]);
            Dequant<T>::word8(v[i][0].x, v[i][0].y, c, b[0]);
            Dequant<T>::word8(v[i][0].z, v[i][0].w, c, b[1]);
            Dequant<T>::word8(v[i][1].x, v[i][1].y, c, b[2]);
            Dequant<T>::word8(v[i][1].z, v[i][1].w, c, b[3]);
        } else {
            const auto c = Dequant<T>::template consts<false>(zlo[i], zhi[i]);
            Dequant<T>::word4(v[i][0].x, c, b[0]);
            Dequant<T>::word4(v[i][0].y, c, b[1]);
            Dequant<T>::word4(v[i][0].z, c, b[2]);
            Dequant<T>::word4(v[i][0].w, c, b[3]);
        }
        // b[j][0]: column n_lo, rows t*16 + 2j + {0,1}; b[j][2]: rows t*16 + 8 + 2j + {0,1}; b[j][1], b[j][3]: the
        // same rows of column n_lo + 8.
        const size_t row0 = (size_t)(chunk - chunk_begin) * 64 + t * 16;
        T* lo = outT + (size_t)n_lo * ld_out + row0;
        T* hi = lo + (size_t)8 * ld_out;
        *reinterpret_cast<uint4*>(lo) = make_uint4(b[0][0], b[1][0], b[2][0], b[3][0]);
        *reinterpret_cast<uint4*>(lo + 8) = make_uint4(b[0][2], b[1][2], b[2][2], b[3][2]);
        *reinterpret_cast<uint4*>(hi) = make_uint4(b[0][1], b[1][1], b[2][1], b[3][1]);
        *reinterpret_cast<uint4*>(hi + 8) = make_uint4(b[0][3], b[1][3], b[2][3], b[3][3]);
    }
}

// The activations of qmma in A-fragment order: xf[(b * chunks + c) * 128 + j * 32 + lane] is lane's A fragment
// of mma j (see the header) for batch rows b*16 .. b*16 + 15 and chunk c of the sorted padded rows:
//   {x[r][k], x[r][k+1]}, {x[r+8][k], x[r+8][k+1]}, {x[r][k+8], x[r][k+9]}, {x[r+8][k+8], x[r+8][k+9]}
// with r = b*16 + lane/4 and sorted row k = c*64 + (lane%4)*16 + 2j. Sorted row k holds x[.., row_src[k]]
// (x[.., k] when row_src is null); rows past M and sorted rows without a source (padding, or past K) are zero.
// x: [M, K], row stride K. vec: 1 when row_src is null, K % 8 == 0 and x is 16-byte aligned (16-byte loads).
// Grid: one thread per (16-row block, chunk, lane), ceil(M / 16) * chunks * 32 threads.
template <typename T>
__global__ void __launch_bounds__(cupyq::qmma_detail::kThreads)
    frag_x(const T* __restrict__ x, const int* __restrict__ row_src, uint4* __restrict__ xf, int M, int K,
           int chunks, int vec) {
    using namespace cupyq;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int lane = (int)(idx & 31);
    const long long bc = idx >> 5;  // block * chunks + chunk
    if (bc >= (long long)((M + 15) / 16) * chunks) return;
    const int blk = (int)(bc / chunks);
    const int c = (int)(bc - (long long)blk * chunks);
    const int k0 = c * 64 + (lane & 3) * 16;
    // rows[h]: the 16 sorted rows k0 .. k0 + 15 of batch row blk*16 + lane/4 + 8h, as 8 words (pairs).
    unsigned rows[2][8];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int m = blk * 16 + (lane >> 2) + 8 * h;
        if (vec) {
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const int k = k0 + 8 * q;
                uint4 u = make_uint4(0u, 0u, 0u, 0u);
                if (m < M && k < K) u = __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * K + k));
                rows[h][4 * q] = u.x;
                rows[h][4 * q + 1] = u.y;
                rows[h][4 * q + 2] = u.z;
                rows[h][4 * q + 3] = u.w;
            }
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                unsigned short pair[2];
#pragma unroll
                for (int o = 0; o < 2; ++o) {
                    const int k = k0 + 2 * e + o;
                    const T val = sorted_x(x, row_src, m, M, K, k);
                    pair[o] = *reinterpret_cast<const unsigned short*>(&val);
                }
                rows[h][e] = pair[0] | ((unsigned)pair[1] << 16);
            }
        }
    }
    uint4* dst = xf + (size_t)bc * 128 + lane;
#pragma unroll
    for (int j = 0; j < 4; ++j) dst[j * 32] = make_uint4(rows[0][j], rows[1][j], rows[0][4 + j], rows[1][4 + j]);
}
