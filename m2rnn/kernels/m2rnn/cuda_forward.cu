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
// tiles are independent chains the scheduler interleaves. Inputs of the next 16 steps are copied to shared memory
// with cp.async while the current 16 steps run, so no global load latency sits on the chain either.
//
// Step i, in program order: pack H and issue the mmas of step i (its inputs already in registers); load step
// i+1's k, q, v, f from shared memory into registers; reduce over rows and store step i-1's readout; tanh and gate
// of step i; step i's per-thread readout partial sums, kept in registers for step i+1 (the last step's are stored
// after the loop). The reduction is a reduce-scatter over the lane bits of g: each level halves the values a lane
// holds (a butterfly where their count is odd), so a lane ends with whole sums of a few columns and stores them.
//
// Compile-time parameters (NVRTC -D options): M2_TILES, M2_V, M2_BF16 (else float16 inputs), M2_VARLEN, M2_HAS_H0,
// M2_GATE_F32 (float32 forget gates, else the inputs' dtype), M2_STORE_CKPT, M2_CHUNK (checkpoint interval, a
// multiple of 16), M2_PARTIAL_Y (K split over warps: y is a float32 partial per row block, summed by the caller).
// Rows: tile tau's accumulator row g (g = lane / 4) is state row base + g·2·TILES + 2·tau, row g + 8 is the next.

#include "cuda_common.cuh"

#define P 16                     // steps per shared-memory stage
#define NT (M2_V / 8)            // mma n-tiles across V
#define KS (M2_V / 16)           // mma k-steps across V
#define ROWS (16 * M2_TILES)     // state rows per warp
#define WARPS 4

// Readout values a lane holds before (YC, one per column 8j + 2t + e) and after each reduction level.
constexpr int YC = 2 * NT;
constexpr int YC1 = YC / 2;
constexpr int YC2 = YC1 % 2 ? YC1 : YC1 / 2;
constexpr int YC3 = YC2 % 2 ? YC2 : YC2 / 2;
// Index of column 8j + 2t + e among them: j-major where a lane ends with pairs (YC3 even: one 2-element store),
// else e-major, so the first level splits e and a lane ends with columns 8 apart.
__device__ constexpr int y_value(int j, int e) { return YC3 % 2 == 0 ? 2 * j + e : e * NT + j; }

__device__ __forceinline__ u16 float_to_out(float x) {
    u16 r;
#if M2_BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
#endif
    return r;
}

#if M2_PARTIAL_Y
typedef float YOut;  // float32 partial per row block
__device__ __forceinline__ void store_y1(float* p, float a) { *p = a; }
__device__ __forceinline__ void store_y2(float* p, float a, float b) { *reinterpret_cast<Float2*>(p) = Float2{a, b}; }
#else
typedef u16 YOut;
__device__ __forceinline__ void store_y1(u16* p, float a) { *p = float_to_out(a); }
__device__ __forceinline__ void store_y2(u16* p, float a, float b) {
    *reinterpret_cast<u32*>(p) = (u32)float_to_out(a) | ((u32)float_to_out(b) << 16);
}
#endif

struct Stage {
    u16 k[P][ROWS];
    u16 q[P][ROWS];
    u16 v[P][M2_V];
    float f[P];
};

// Min. 1 block per SM: without it ptxas holds some variants to 128 registers and spills.
extern "C" __global__ void __launch_bounds__(WARPS * 32, 1) m2rnn_forward(
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

    long long bos, eos;
    [[maybe_unused]] long long first_chunk;  // read only where checkpoints are
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
    [[maybe_unused]] const long long head_state = ((long long)b * N + n) * K * M2_V;

    u32 wb[KS][NT][2];
    load_state_weight(wb, w + (long long)wh * M2_V * M2_V, g, t);

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
            copy_async<4>(&s.k[i][o], k + tok * NK * K + (long long)kh * K + row_base + o, valid);
            copy_async<4>(&s.q[i][o], q + tok * NQ * K + (long long)qh * K + row_base + o, valid);
        }
        for (int word = lane; word < P * M2_V / 2; word += 32) {
            const int i = word / (M2_V / 2), o = 2 * (word % (M2_V / 2));
            const bool valid = tok0 + i < eos;
            const long long tok = valid ? tok0 + i : bos;
            copy_async<4>(&s.v[i][o], v + tok * NV * M2_V + (long long)vh * M2_V + o, valid);
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

    // After the reduction the lane holds the row sums of values [y_first, y_first + YC3); a butterfly level leaves
    // partners equal, and only the one with that lane bit clear stores.
    const int y_first = (g & 1) * YC1 + (YC1 % 2 ? 0 : ((g >> 1) & 1) * YC2) + (YC2 % 2 ? 0 : (g >> 2) * YC3);
    const bool y_lane = (YC1 % 2 == 0 || ((g >> 1) & 1) == 0) && (YC2 % 2 == 0 || (g >> 2) == 0);
    const int y_col = YC3 % 2 == 0 ? 8 * (y_first >> 1) + 2 * t + (y_first & 1)
                                   : 8 * (y_first % NT) + 2 * t + y_first / NT;
#if M2_PARTIAL_Y
    YOut* y_dst = reinterpret_cast<float*>(y) + ((kb * total_tokens + bos) * N + n) * M2_V + y_col;
#else
    YOut* y_dst = reinterpret_cast<u16*>(y) + (bos * N + n) * M2_V + y_col;
#endif
    const int y_stride = N * M2_V;
    // The pending readout (the previous step's per-thread partial sums); y_dst is its token's row where y_store.
    float y_part[YC];
#pragma unroll
    for (int m = 0; m < YC; ++m) y_part[m] = 0.0f;
    bool y_store = false;
    auto readout = [&]() {
        reduce_level<YC>(y_part, 4, g & 1);
        reduce_level<YC1>(y_part, 8, (g >> 1) & 1);
        reduce_level<YC2>(y_part, 16, g >> 2);
        if (y_store) {
            if constexpr (YC3 % 2 == 0) {
#pragma unroll
                for (int m = 0; m < YC3; m += 2) store_y2(y_dst + 4 * m, y_part[m], y_part[m + 1]);
            } else {
#pragma unroll
                for (int m = 0; m < YC3; ++m) store_y1(y_dst + 8 * m, y_part[m]);
            }
            y_dst += y_stride;
        }
    };

    // Inputs of the next step, in registers (16-bit pairs as loaded).
    u32 k_next[M2_TILES], q_next[M2_TILES], v_next[NT];
    float f_next;
    auto load_step = [&](const Stage& s, int i) {
#pragma unroll
        for (int tau = 0; tau < M2_TILES; ++tau) {
            k_next[tau] = *reinterpret_cast<const u32*>(&s.k[i][g * 2 * M2_TILES + 2 * tau]);
            q_next[tau] = *reinterpret_cast<const u32*>(&s.q[i][g * 2 * M2_TILES + 2 * tau]);
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) v_next[j] = *reinterpret_cast<const u32*>(&s.v[i][8 * j + 2 * t]);
        f_next = s.f[i];
    };

    if (num_chunks > 0) issue(0, st[0]);
    copy_async_commit();
    float gate_next = num_chunks > 0 ? load_gate(0) : 0.0f;

    for (int chunk = 0; chunk < num_chunks; ++chunk) {
        Stage& s = st[chunk & 1];
        if (lane < P) s.f[lane] = gate_next;
        if (chunk + 1 < num_chunks) {
            issue(chunk + 1, st[(chunk + 1) & 1]);
            gate_next = load_gate(chunk + 1);
        }
        copy_async_commit();
        copy_async_wait<1>();
        __syncwarp();
        load_step(s, 0);
#if M2_STORE_CKPT
        if ((chunk * P) % M2_CHUNK == 0)
            store_state_tiles(h, checkpoints + ((first_chunk + chunk * P / M2_CHUNK) * N + n) * (long long)K * M2_V,
                              my_rows, t);
#endif
        const int steps = length - chunk * P < P ? length - chunk * P : P;
#pragma unroll 2
        for (int next = 1; next <= steps; ++next) {  // step next - 1 (with i + 1 indices NVVM unrolls fully)
            u32 kk[M2_TILES], qq[M2_TILES], vv[NT];
#pragma unroll
            for (int tau = 0; tau < M2_TILES; ++tau) {
                kk[tau] = k_next[tau];
                qq[tau] = q_next[tau];
            }
#pragma unroll
            for (int j = 0; j < NT; ++j) vv[j] = v_next[j];
            const float f_step = f_next, keep = 1.0f - f_step;  // (1 - f): the weight of the new candidate
            float z[M2_TILES][NT][4];
#pragma unroll
            for (int tau = 0; tau < M2_TILES; ++tau) {
                const float k0 = lo_half(kk[tau]), k1 = hi_half(kk[tau]);
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
                    const float v0 = lo_half(vv[j]), v1 = hi_half(vv[j]);
                    z[tau][j][0] = k0 * v0, z[tau][j][1] = k0 * v1, z[tau][j][2] = k1 * v0, z[tau][j][3] = k1 * v1;
#pragma unroll
                    for (int ks = 0; ks < KS; ++ks) mma_f16(z[tau][j], a[ks], wb[ks][j][0], wb[ks][j][1]);
                }
            }
            // At the stage's last step: a row of this stage never used (the next stage loads its step 0 itself).
            load_step(s, next & (P - 1));
            readout();
            y_store = y_lane;
#pragma unroll
            for (int tau = 0; tau < M2_TILES; ++tau) {
                const float q0 = lo_half(qq[tau]), q1 = hi_half(qq[tau]);
#pragma unroll
                for (int j = 0; j < NT; ++j) {
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        h[tau][j][e] = gated_update(h[tau][j][e], f_step, keep, tanh_approx(z[tau][j][e]));
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float part = q0 * h[tau][j][e] + q1 * h[tau][j][2 + e];
                        y_part[y_value(j, e)] = tau == 0 ? part : y_part[y_value(j, e)] + part;
                    }
                }
            }
        }
        __syncwarp();
    }
    readout();
    copy_async_wait<0>();
    store_state_tiles(h, ht + head_state, my_rows, t);
}
