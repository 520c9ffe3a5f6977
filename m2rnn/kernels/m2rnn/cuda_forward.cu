// Forward of the M2RNN recurrence on the tensor cores, register-resident (sm_80+, 16-bit inputs).
//
// Per head n and step t:  Z = tanh(H W + k vᵀ),  H = f H + (1 - f) Z,  y = qᵀ H.
//
// One warp owns TILES 16-row tiles of one head's (K × V) state for the whole sequence. The state lives in
// float32 registers in the accumulator layout of mma.m16n8k16; that layout, packed to float16 pairs, is exactly
// the A-operand layout of the next step's mma, so the dependency chain of a step is
//     pack (cvt) -> mma (H W, accumulated onto C = k vᵀ) -> tanh.approx -> gate
// with no shared-memory round trip, no barrier and no shuffle on it. Rows of the state never interact, so a
// thread's rows are chosen to be contiguous in memory (one vector load of k and q per step) and the warp's TILES
// tiles are independent chains the scheduler interleaves. The readout's reduction over rows (three xor shuffles)
// is off the chain. Inputs of the next 16 steps are copied to shared memory with cp.async while the current 16
// steps run, so no global load latency sits on the chain either.
//
// Compile-time parameters (NVRTC -D options): M2_TILES, M2_V, M2_BF16 (else float16 inputs), M2_VARLEN, M2_HAS_H0,
// M2_GATE_F32 (float32 forget gates, else the inputs' dtype), M2_STORE_CKPT, M2_CHUNK (checkpoint interval, a
// multiple of 16), M2_PARTIAL_Y (K split over warps: y is a float32 partial per row block, summed by the caller).
// Rows: tile tau's accumulator row g (g = lane / 4) is state row base + g·2·TILES + 2·tau, row g + 8 is the next.

#define P 16                     // steps per shared-memory stage
#define NT (M2_V / 8)            // mma n-tiles across V
#define KS (M2_V / 16)           // mma k-steps across V
#define ROWS (16 * M2_TILES)     // state rows per warp
#define WARPS 4

typedef unsigned short u16;
typedef unsigned int u32;
struct alignas(8) Float2 {
    float x, y;
};

__device__ __forceinline__ float in_to_float(u16 x) {
#if M2_BF16
    return __uint_as_float(((u32)x) << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
#endif
}

__device__ __forceinline__ u16 float_to_out(float x) {
    u16 r;
#if M2_BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
#endif
    return r;
}

__device__ __forceinline__ float lo_half(u32 x) { return in_to_float((u16)(x & 0xffffu)); }
__device__ __forceinline__ float hi_half(u32 x) { return in_to_float((u16)(x >> 16)); }

// float16 pair for an mma operand: lo -> the element with the smaller index.
__device__ __forceinline__ u32 pack_half2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float tanh_approx(float x) {
    float r;
    asm("tanh.approx.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// d += a · b  (m16n8k16, float16 operands, float32 accumulation)
__device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 shared_address(const void* p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

// 4-byte asynchronous copy global -> shared; zero-filled when !valid (src is then never read).
__device__ __forceinline__ void copy_async4(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(shared_address(dst)), "l"(src),
                 "r"(valid ? 4 : 0));
}

struct Stage {
    u16 k[P][ROWS];
    u16 q[P][ROWS];
    u16 v[P][M2_V];
    float f[P];
};

extern "C" __global__ void __launch_bounds__(WARPS * 32) m2rnn_forward(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v, const float* __restrict__ w,
    const void* __restrict__ f, const float* __restrict__ h0, void* __restrict__ y, float* __restrict__ ht,
    float* __restrict__ checkpoints, const int* __restrict__ cu_seqlens, const int* __restrict__ chunk_offsets,
    int num_items, int seqlen, int chunks_per_seq, long long total_tokens,
    int N, int NQ, int NK, int NV, int NF, int NW, int K) {
    __shared__ Stage stages[WARPS][2];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int item = blockIdx.x * WARPS + warp;
    if (item >= num_items) return;  // no block-wide barrier below: a warp may leave
    const int g = lane >> 2, t = lane & 3;
    const int kblocks = K / ROWS;
    const int kb = item % kblocks;
    const int bn = item / kblocks;
    const int b = bn / N, n = bn % N;
    const int qh = n / (N / NQ), kh = n / (N / NK), vh = n / (N / NV), fh = n / (N / NF), wh = n / (N / NW);

    long long bos, eos, first_chunk;
#if M2_VARLEN
    bos = cu_seqlens[b];
    eos = cu_seqlens[b + 1];
    first_chunk = chunk_offsets[b];
#else
    bos = (long long)b * seqlen;
    eos = bos + seqlen;
    first_chunk = (long long)b * chunks_per_seq;
#endif
    const int length = (int)(eos - bos);
    const int row_base = kb * ROWS;
    const int my_rows = row_base + g * 2 * M2_TILES;  // + 2·tau + (0 | 1)
    const long long head_state = ((long long)b * N + n) * K * M2_V;

    // W as B fragments: b0 = (W[16s+2t][8j+g], W[16s+2t+1][8j+g]), b1 = rows + 8.
    u32 wb[KS][NT][2];
    const float* wn = w + (long long)wh * M2_V * M2_V;
#pragma unroll
    for (int s = 0; s < KS; ++s)
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int r = 16 * s + 2 * t, c = 8 * j + g;
            wb[s][j][0] = pack_half2(wn[r * M2_V + c], wn[(r + 1) * M2_V + c]);
            wb[s][j][1] = pack_half2(wn[(r + 8) * M2_V + c], wn[(r + 9) * M2_V + c]);
        }

    // State: h[tau][j] = rows (my_rows + 2tau, my_rows + 2tau + 1) x cols (8j + 2t, 8j + 2t + 1).
    float h[M2_TILES][NT][4];
#pragma unroll
    for (int tau = 0; tau < M2_TILES; ++tau)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
#if M2_HAS_H0
                const int row = my_rows + 2 * tau + (e >> 1), col = 8 * j + 2 * t + (e & 1);
                h[tau][j][e] = h0[head_state + (long long)row * M2_V + col];
#else
                h[tau][j][e] = 0.0f;
#endif
            }

    Stage* st = stages[warp];
    const int num_chunks = (length + P - 1) / P;

    auto issue = [&](int chunk, Stage& s) {
        const long long tok0 = bos + (long long)chunk * P;
        for (int word = lane; word < P * ROWS / 2; word += 32) {
            const int i = word / (ROWS / 2), o = 2 * (word % (ROWS / 2));
            const bool valid = tok0 + i < eos;
            const long long tok = valid ? tok0 + i : bos;
            copy_async4(&s.k[i][o], k + tok * NK * K + (long long)kh * K + row_base + o, valid);
            copy_async4(&s.q[i][o], q + tok * NQ * K + (long long)qh * K + row_base + o, valid);
        }
        for (int word = lane; word < P * M2_V / 2; word += 32) {
            const int i = word / (M2_V / 2), o = 2 * (word % (M2_V / 2));
            const bool valid = tok0 + i < eos;
            const long long tok = valid ? tok0 + i : bos;
            copy_async4(&s.v[i][o], v + tok * NV * M2_V + (long long)vh * M2_V + o, valid);
        }
    };
    auto load_gate = [&](int chunk) -> float {
        const long long tok = bos + (long long)chunk * P + lane;
        if (lane >= P || tok >= eos) return 0.0f;
#if M2_GATE_F32
        return reinterpret_cast<const float*>(f)[tok * NF + fh];
#else
        return in_to_float(reinterpret_cast<const u16*>(f)[tok * NF + fh]);
#endif
    };
    auto store_state = [&](float* dst) {
#pragma unroll
        for (int tau = 0; tau < M2_TILES; ++tau)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int row = my_rows + 2 * tau + half, col = 8 * j + 2 * t;
                    *reinterpret_cast<Float2*>(dst + (long long)row * M2_V + col) =
                        Float2{h[tau][j][2 * half], h[tau][j][2 * half + 1]};
                }
    };

    if (num_chunks > 0) issue(0, st[0]);
    asm volatile("cp.async.commit_group;");
    float gate_next = num_chunks > 0 ? load_gate(0) : 0.0f;

    for (int chunk = 0; chunk < num_chunks; ++chunk) {
        Stage& s = st[chunk & 1];
        if (lane < P) s.f[lane] = gate_next;
        if (chunk + 1 < num_chunks) {
            issue(chunk + 1, st[(chunk + 1) & 1]);
            gate_next = load_gate(chunk + 1);
        }
        asm volatile("cp.async.commit_group;");
        asm volatile("cp.async.wait_group 1;");
        __syncwarp();
#if M2_STORE_CKPT
        if ((chunk * P) % M2_CHUNK == 0)
            store_state(checkpoints + ((first_chunk + chunk * P / M2_CHUNK) * N + n) * (long long)K * M2_V);
#endif
        const long long tok0 = bos + (long long)chunk * P;
        const int steps = length - chunk * P < P ? length - chunk * P : P;
#pragma unroll 2
        for (int i = 0; i < steps; ++i) {
            const float keep = 1.0f - s.f[i];  // (1 - f): the weight of the new candidate
            float y_part[NT][2];
#pragma unroll
            for (int j = 0; j < NT; ++j) y_part[j][0] = y_part[j][1] = 0.0f;
#pragma unroll
            for (int tau = 0; tau < M2_TILES; ++tau) {
                const u32 kk = *reinterpret_cast<const u32*>(&s.k[i][g * 2 * M2_TILES + 2 * tau]);
                const u32 qq = *reinterpret_cast<const u32*>(&s.q[i][g * 2 * M2_TILES + 2 * tau]);
                const float k0 = lo_half(kk), k1 = hi_half(kk), q0 = lo_half(qq), q1 = hi_half(qq);
                u32 a[KS][4];
#pragma unroll
                for (int ks = 0; ks < KS; ++ks) {
                    a[ks][0] = pack_half2(h[tau][2 * ks][0], h[tau][2 * ks][1]);
                    a[ks][1] = pack_half2(h[tau][2 * ks][2], h[tau][2 * ks][3]);
                    a[ks][2] = pack_half2(h[tau][2 * ks + 1][0], h[tau][2 * ks + 1][1]);
                    a[ks][3] = pack_half2(h[tau][2 * ks + 1][2], h[tau][2 * ks + 1][3]);
                }
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    const u32 vv = *reinterpret_cast<const u32*>(&s.v[i][8 * j + 2 * t]);
                    const float v0 = lo_half(vv), v1 = hi_half(vv);
                    float z[4] = {k0 * v0, k0 * v1, k1 * v0, k1 * v1};
#pragma unroll
                    for (int ks = 0; ks < KS; ++ks) mma_16816(z, a[ks], wb[ks][j][0], wb[ks][j][1]);
#pragma unroll
                    for (int e = 0; e < 4; ++e) h[tau][j][e] += keep * (tanh_approx(z[e]) - h[tau][j][e]);
                    y_part[j][0] += q0 * h[tau][j][0] + q1 * h[tau][j][2];
                    y_part[j][1] += q0 * h[tau][j][1] + q1 * h[tau][j][3];
                }
            }
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float x = y_part[j][e];
                    x += __shfl_xor_sync(0xffffffffu, x, 4);
                    x += __shfl_xor_sync(0xffffffffu, x, 8);
                    x += __shfl_xor_sync(0xffffffffu, x, 16);
                    y_part[j][e] = x;
                }
            // Lanes of group g < NT store columns 8g + 2t, 8g + 2t + 1.
            float y0 = 0.0f, y1 = 0.0f;
#pragma unroll
            for (int j = 0; j < NT; ++j)
                if (g == j) { y0 = y_part[j][0]; y1 = y_part[j][1]; }
            if (g < NT) {
                const long long tok = tok0 + i;
                const int col = 8 * g + 2 * t;
#if M2_PARTIAL_Y
                float* yp = reinterpret_cast<float*>(y) + ((kb * total_tokens + tok) * N + n) * M2_V + col;
                *reinterpret_cast<Float2*>(yp) = Float2{y0, y1};
#else
                u16* yo = reinterpret_cast<u16*>(y) + (tok * N + n) * M2_V + col;
                *reinterpret_cast<u32*>(yo) = (u32)float_to_out(y0) | ((u32)float_to_out(y1) << 16);
#endif
            }
        }
        __syncwarp();
    }
    asm volatile("cp.async.wait_group 0;");
    store_state(ht + head_state);
}
