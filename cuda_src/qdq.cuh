// Dequantisation and tensor-core helpers shared by the cupyq kernels.
//
// Device weight layout (built by cupyq/layout.py). The quantized matrix is stored in "sorted, padded" row
// order: rows are grouped so that every quantisation group starts on a 16-row tile, storage segments (8-bit
// then 4-bit) start on 256-row steps, and padding rows read a zero activation. The kernels compute
// y^T = W^T x^T with W^T as the A operand of mma.m16n8k16 (16 output columns x 16 rows), so each lane holds
// exactly the eight weights of its A fragment:
//   a0,a1: column n0 = lane/4,     rows 2*(lane%4) + {0,1}
//   a2,a3: column n0 + 8,          same rows
//   a4,a5: column n0,              rows 8 + 2*(lane%4) + {0,1}
//   a6,a7: column n0 + 8,          rows 8 + ...
// 4-bit storage, one 32-bit word per lane and 16-row tile: nibble p = dnh + 2*kh + 4*kodd holds the value of
// column n0 + 8*dnh, row 8*kh + 2*(lane%4) + kodd. Masking with 0x000F000F / 0x00F000F0 and or-ing the fp16
// exponent 0x6400 gives (1024 + v) for columns n0 and (1024 + 16 v) for columns n0 + 8, two rows per half2.
// 8-bit storage, two words per lane and tile: word kh, byte dnh*2 + kodd.
// Scales and zeros: one 32-bit word per (group, column), half2 (scale, zc) with zc = 1024 + z for columns with
// n % 16 < 8 and zc = -(64 + z) for the others, so that one HSUB2 or HFMA2 yields the exact integer (q - z).
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// Constants shared with Python come from cupyq/kernels.py (NVRTC_DEFINES) as -D options.
#ifndef CUPYQ_CHUNK_ROWS
#error "CUPYQ_CHUNK_ROWS is not defined: compile with cupyq.nvrtc.kernel_options()"
#endif

namespace cupyq {

constexpr int kChunkRows = CUPYQ_CHUNK_ROWS;  // rows of one chunk: four 16-row tiles
static_assert(kChunkRows == 64, "the fragment layout above has 64-row chunks of four 16-row tiles");

__device__ __forceinline__ unsigned lop3_and_or(unsigned a, unsigned mask, unsigned magic) {
    unsigned r;
    // r = (a & mask) | magic
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(mask), "r"(magic));
    return r;
}

__device__ __forceinline__ __half2 as_half2(unsigned u) {
    return *reinterpret_cast<__half2*>(&u);
}

__device__ __forceinline__ unsigned as_u32(__half2 h) {
    return *reinterpret_cast<unsigned*>(&h);
}

// Exact integer (q - z) for the four pairs of one 4-bit word. zlo: half2(1024 + z) of column n0,
// zhi: half2(-(64 + z)) of column n0 + 8.
__device__ __forceinline__ void dequant4_exact(unsigned w, __half2 zlo, __half2 zhi, __half2 d[4]) {
    const unsigned magic = 0x64006400u;
    const __half2 sixteenth = __half2half2(__ushort_as_half(0x2c00));  // 1/16
    unsigned w8 = w >> 8;
    d[0] = __hsub2(as_half2(lop3_and_or(w, 0x000f000fu, magic)), zlo);
    d[1] = __hfma2(as_half2(lop3_and_or(w, 0x00f000f0u, magic)), sixteenth, zhi);
    d[2] = __hsub2(as_half2(lop3_and_or(w8, 0x000f000fu, magic)), zlo);
    d[3] = __hfma2(as_half2(lop3_and_or(w8, 0x00f000f0u, magic)), sixteenth, zhi);
}

__device__ __forceinline__ __nv_bfloat162 as_bf162(unsigned u) {
    return *reinterpret_cast<__nv_bfloat162*>(&u);
}
__device__ __forceinline__ unsigned bf162_u32(__nv_bfloat162 h) {
    return *reinterpret_cast<unsigned*>(&h);
}

// The same integers as bf16 pairs, built in bf16: or-ing the exponent of 128 into each nibble (each shifted to
// the bottom of its half) gives 128 + q exactly, and one subtraction of 128 + z the exact (q - z), with no
// conversion from fp16. zl, zh: bf16 (128 + z) of columns n0 and n0 + 8. b[0], b[2]: column n0; b[1], b[3]:
// column n0 + 8 (the pair order of dequant4_exact).
__device__ __forceinline__ void dequant4_bf16_exact(unsigned w, __nv_bfloat162 zl, __nv_bfloat162 zh, unsigned b[4]) {
    const unsigned magic = 0x43004300u;  // bf16 128.0 in both halves
    b[0] = bf162_u32(__hsub2(as_bf162(lop3_and_or(w, 0x000f000fu, magic)), zl));
    b[1] = bf162_u32(__hsub2(as_bf162(lop3_and_or(w >> 4, 0x000f000fu, magic)), zh));
    b[2] = bf162_u32(__hsub2(as_bf162(lop3_and_or(w >> 8, 0x000f000fu, magic)), zl));
    b[3] = bf162_u32(__hsub2(as_bf162(lop3_and_or(w >> 12, 0x000f000fu, magic)), zh));
}

// b (pairs of dequant4_bf16_exact) times the bf16 scales of columns n0 (sl, for b[0], b[2]) and n0 + 8 (sh).
__device__ __forceinline__ void scale4_bf16(unsigned b[4], __nv_bfloat162 sl, __nv_bfloat162 sh) {
    b[0] = bf162_u32(__hmul2(as_bf162(b[0]), sl));
    b[1] = bf162_u32(__hmul2(as_bf162(b[1]), sh));
    b[2] = bf162_u32(__hmul2(as_bf162(b[2]), sl));
    b[3] = bf162_u32(__hmul2(as_bf162(b[3]), sh));
}

// bf16 (128 + z) of the lane's two columns from the zc halves dequant4_exact takes (zlo: 1024 + z of column n0,
// zhi: -(64 + z) of column n0 + 8).
__device__ __forceinline__ void bf16_zeros4(__half2 zlo, __half2 zhi, __nv_bfloat162& zl, __nv_bfloat162& zh) {
    zl = __float2bfloat162_rn(__low2float(zlo) - 896.0f);
    zh = __float2bfloat162_rn(64.0f - __low2float(zhi));
}

// Exact integer (q - z) for the four pairs of one tile of 8-bit storage (two words). zlo, zhi: half2(1024 + z)
// of columns n0 and n0 + 8.
__device__ __forceinline__ void dequant8_exact(unsigned w0, unsigned w1, __half2 zlo, __half2 zhi,
                                               __half2 d[4]) {
    const unsigned magic = 0x64646464u;
    d[0] = __hsub2(as_half2(__byte_perm(w0, magic, 0x4140)), zlo);
    d[1] = __hsub2(as_half2(__byte_perm(w0, magic, 0x4342)), zhi);
    d[2] = __hsub2(as_half2(__byte_perm(w1, magic, 0x4140)), zlo);
    d[3] = __hsub2(as_half2(__byte_perm(w1, magic, 0x4342)), zhi);
}

template <typename T> struct is_half { static constexpr bool value = false; };
template <> struct is_half<__half> { static constexpr bool value = true; };

// Scale the exact integers into the A fragment of element type T.
template <typename T> struct Frag;

template <> struct Frag<__half> {
    // The exact integers themselves as the A fragment (the scale is applied to the product instead).
    static __device__ __forceinline__ void exact(const __half2 d[4], unsigned a[4]) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = as_u32(d[i]);
    }
    static __device__ __forceinline__ void scale(const __half2 d[4], __half2 slo, __half2 shi, unsigned a[4]) {
        a[0] = as_u32(__hmul2(d[0], slo));
        a[1] = as_u32(__hmul2(d[1], shi));
        a[2] = as_u32(__hmul2(d[2], slo));
        a[3] = as_u32(__hmul2(d[3], shi));
    }
};

template <> struct Frag<__nv_bfloat16> {
    static __device__ __forceinline__ unsigned one(__half2 d, float s) {
        float2 f = __half22float2(d);
        __nv_bfloat162 r = __floats2bfloat162_rn(f.x * s, f.y * s);
        return *reinterpret_cast<unsigned*>(&r);
    }
    // |q - z| <= 255 is exact in bf16 (8 significant bits).
    static __device__ __forceinline__ void exact(const __half2 d[4], unsigned a[4]) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = one(d[i], 1.0f);
    }
    static __device__ __forceinline__ void scale(const __half2 d[4], __half2 slo, __half2 shi, unsigned a[4]) {
        float flo = __low2float(slo), fhi = __low2float(shi);
        a[0] = one(d[0], flo);
        a[1] = one(d[1], fhi);
        a[2] = one(d[2], flo);
        a[3] = one(d[3], fhi);
    }
};

template <typename T> struct Mma;

template <> struct Mma<__half> {
    static __device__ __forceinline__ void run(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
    return __bfloat162float(v);
}

// Sorted row k of activation row m, the rule of every kernel that writes activations in the weights' row order
// (frag_x, frag_xw; gather_columns writes it out for its one row per thread): x[m, row_src[k]], or x[m, k] when
// row_src is null; zero for rows m >= M and for sorted rows without a source (row_src[k] < 0, the padding; k >= K
// without row_src). x: [M, K], row stride K.
template <typename T>
__device__ __forceinline__ T sorted_x(const T* __restrict__ x, const int* __restrict__ row_src, int m, int M, int K,
                                      int k) {
    const int src = row_src ? __ldg(row_src + k) : (k < K ? k : -1);
    T val = from_float<T>(0.0f);
    if (m < M && src >= 0 && src < K) val = x[(size_t)m * K + src];
    return val;
}

}  // namespace cupyq
