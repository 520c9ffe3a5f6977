// Device helpers shared by the CUDA M2RNN kernels (compiled by NVRTC: no CUDA headers, inline PTX only).
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4), which every kernel here builds on:
//   accumulator (16 x 8, float32): c0, c1 = row g, cols 2t, 2t+1;  c2, c3 = row g+8, same cols
//   A (16 x 16, 16-bit pairs):      a0 = row g, cols 2t..2t+1;  a1 = row g+8;  a2 = row g, cols 2t+8..;  a3 = row g+8
//   B (16 x 8, 16-bit pairs):       b0 = rows 2t..2t+1, col g;  b1 = rows 2t+8..2t+9, col g
// so two accumulator tiles side by side (16 x 16), packed to 16-bit pairs, are an A operand as they are, and
// movmatrix.trans of each 8 x 8 quarter gives the transposed tile's A (or B) fragments.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;

struct alignas(8) Float2 {
    float x, y;
};

struct alignas(16) U32x4 {
    u32 x, y, z, w;
};

// 16-bit input element -> float (bfloat16 when M2_BF16, else float16).
__device__ __forceinline__ float in_to_float(u16 x) {
#if M2_BF16
    return __uint_as_float(((u32)x) << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
#endif
}

__device__ __forceinline__ float lo_half(u32 x) { return in_to_float((u16)(x & 0xffffu)); }
__device__ __forceinline__ float hi_half(u32 x) { return in_to_float((u16)(x >> 16)); }

__device__ __forceinline__ float half_to_float(u32 x) {  // float16 in the low 16 bits
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((u16)(x & 0xffffu)));
    return f;
}

// Pairs for mma operands: lo -> the element with the smaller index.
__device__ __forceinline__ u32 pack_half2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float bf16_lo(u32 x) { return __uint_as_float(x << 16); }
__device__ __forceinline__ float bf16_hi(u32 x) { return __uint_as_float(x & 0xffff0000u); }

__device__ __forceinline__ float tanh_approx(float x) {
    float r;
    asm("tanh.approx.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// H = f H + (1 - f) Z as fma(1 - f, Z, f H): f H does not wait for Z, so one dependent operation follows the tanh
// (h + (1 - f)(Z - h) had two). The forward and the backward's recomputations round alike through this.
__device__ __forceinline__ float gated_update(float h, float gate, float keep, float z) {
    return __fmaf_rn(keep, z, __fmul_rn(gate, h));
}

// d += a · b  (m16n8k16, float16 operands, float32 accumulation)
__device__ __forceinline__ void mma_f16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d += a · b  (m16n8k16, bfloat16 operands, float32 accumulation)
__device__ __forceinline__ void mma_bf16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Transpose of an 8 x 8 tile of 16-bit pairs held one pair per thread (row g, cols 2t..2t+1).
__device__ __forceinline__ u32 transpose_8x8(u32 x) {
    u32 r;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
    return r;
}

__device__ __forceinline__ u32 shared_address(const void* p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

// Asynchronous copies global -> shared of 4, 8 or 16 bytes; zero-filled when !valid (src is then never read).
template <int BYTES>
__device__ __forceinline__ void copy_async(void* dst, const void* src, bool valid) {
    if (BYTES == 16) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(shared_address(dst)), "l"(src),
                     "r"(valid ? 16 : 0));
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(shared_address(dst)), "l"(src),
                     "n"(BYTES), "r"(valid ? BYTES : 0));
    }
}

__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;"); }

template <int PENDING>
__device__ __forceinline__ void copy_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(PENDING));
}

// Sum over the lanes that differ in the bits of `mask` (a butterfly: every such lane gets the sum).
template <int MASK>
__device__ __forceinline__ float lane_sum(float x) {
    if (MASK & 1) x += __shfl_xor_sync(0xffffffffu, x, 1);
    if (MASK & 2) x += __shfl_xor_sync(0xffffffffu, x, 2);
    if (MASK & 4) x += __shfl_xor_sync(0xffffffffu, x, 4);
    if (MASK & 8) x += __shfl_xor_sync(0xffffffffu, x, 8);
    if (MASK & 16) x += __shfl_xor_sync(0xffffffffu, x, 16);
    return x;
}

// One level of a sum over lanes, across lane bit `mask`: with C even, the lane keeps the half of x[0, C) its lane
// bit selects (in x[0, C/2) after) and adds the partner's copy of that half (one shuffle per kept value); with C
// odd, a butterfly over all C values (partners end equal).
template <int C>
__device__ __forceinline__ void reduce_level(float* x, int mask, bool upper) {
    if constexpr (C % 2 == 0) {
#pragma unroll
        for (int m = 0; m < C / 2; ++m) {
            const float keep = upper ? x[m + C / 2] : x[m];
            const float send = upper ? x[m] : x[m + C / 2];
            x[m] = keep + __shfl_xor_sync(0xffffffffu, send, mask);
        }
    } else {
#pragma unroll
        for (int m = 0; m < C; ++m) x[m] += __shfl_xor_sync(0xffffffffu, x[m], mask);
    }
}

// One head's (K, V) float32 state <-> a warp's state tiles x[TILES][V / 8][4]: x[tau][j][2·half + e] is row
// my_rows + 2·tau + half, col 8j + 2t + e. The kernels store (final state, checkpoints, dh0) and load checkpoints
// through these, 8 bytes at a time: buffers of ours. The caller's h0 and dH_T are read element by element (a view
// of theirs need not be 8-byte aligned).
template <int NTILES>
__device__ __forceinline__ long long state_pair_offset(int tau, int j, int half, int my_rows, int t) {
    return (long long)(my_rows + 2 * tau + half) * (8 * NTILES) + 8 * j + 2 * t;
}

template <int TILES, int NTILES>
__device__ __forceinline__ void store_state_tiles(const float (&x)[TILES][NTILES][4], float* dst, int my_rows, int t) {
#pragma unroll
    for (int tau = 0; tau < TILES; ++tau)
#pragma unroll
        for (int j = 0; j < NTILES; ++j)
#pragma unroll
            for (int half = 0; half < 2; ++half)
                *reinterpret_cast<Float2*>(dst + state_pair_offset<NTILES>(tau, j, half, my_rows, t)) =
                    Float2{x[tau][j][2 * half], x[tau][j][2 * half + 1]};
}

template <int TILES, int NTILES>
__device__ __forceinline__ void load_state_tiles(float (&x)[TILES][NTILES][4], const float* src, int my_rows, int t) {
#pragma unroll
    for (int tau = 0; tau < TILES; ++tau)
#pragma unroll
        for (int j = 0; j < NTILES; ++j)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const Float2 pair = *reinterpret_cast<const Float2*>(src + state_pair_offset<NTILES>(tau, j, half, my_rows, t));
                x[tau][j][2 * half] = pair.x;
                x[tau][j][2 * half + 1] = pair.y;
            }
}

// W (V x V float32, V = 16·KSTEPS = 8·NTILES) as the float16 B fragments of H·W:
// wb[s][j] = (W[16s+2t][8j+g], W[16s+2t+1][8j+g]), (rows + 8).
template <int KSTEPS, int NTILES>
__device__ __forceinline__ void load_state_weight(u32 (&wb)[KSTEPS][NTILES][2], const float* wn, int g, int t) {
    constexpr int V = 8 * NTILES;
#pragma unroll
    for (int s = 0; s < KSTEPS; ++s)
#pragma unroll
        for (int j = 0; j < NTILES; ++j) {
            const int r = 16 * s + 2 * t, c = 8 * j + g;
            wb[s][j][0] = pack_half2(wn[r * V + c], wn[(r + 1) * V + c]);
            wb[s][j][1] = pack_half2(wn[(r + 8) * V + c], wn[(r + 9) * V + c]);
        }
}
