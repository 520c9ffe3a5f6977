// Backward of the M2RNN recurrence on the tensor cores, register-resident (sm_80+, 16-bit inputs, V <= 32).
//
// Two parts. The walk (m2rnn_backward): one warp per row block of a head for the whole sequence (TILES 16-row tiles,
// as in cuda_forward.cu) walks the sub-chunks of SUB steps from the last:
//   A2  recompute the sub-chunk forward from the state before it, keeping the float16 state before each step in
//       shared memory (exactly the A operand the forward fed its mma, so Z is recomputed bit for bit);
//   B   walk it backwards. The carry dH goes through clip -> G = dH + q dyᵀ -> dX = (1-f) G (1-Z²) ->
//       dH = f G + dX Wᵀ, the last product on the tensor cores with bfloat16 hi/lo splits of dX and W (about 16
//       mantissa bits: the carry compounds its rounding over the sequence). dW += H_{t-1}ᵀ dX is a tensor-core
//       product too (movmatrix transposes the fragments; bfloat16, hi part of dX: a sum over every step and row);
//       dq, dk, dv, df are per-thread sums reduced with xor shuffles and written as per-head partials.
// A1: the state before every sub-chunk, recomputed from the forward's float32 checkpoint of its M2_CHUNK-step chunk
// into a float32 scratch (thread-private fragment layout), one item per (chunk, head, row block). A1 holds no
// carry, so it need not wait for the walk. Either it runs alone first (m2rnn_backward_states, one warp per item,
// all at once), or, with M2_A1_BESIDE, in the walk's launch: the blocks the GPU holds beside the walk's run A1's
// items from a queue, last chunk first, while the walk runs, and a walk warp that reaches a chunk whose item no
// one has taken runs it itself. The host picks the second only where that room lies on the multiprocessors holding
// fewer walk blocks than the busiest (cuda_kernels.a1_blocks_beside_walk). The inputs of the next sub-chunk are
// copied to shared memory with cp.async while the current one runs.
//
// Compile-time parameters (NVRTC -D options): M2_TILES, M2_V, M2_BF16, M2_VARLEN, M2_GATE_F32, M2_CHUNK (a
// multiple of SUB), M2_HAS_DHT, M2_STORE_DH0, M2_CLIP, M2_A1_BESIDE (A1 blocks in the walk's launch).
// Outputs (float32 partials, reduced by the caller as for the Triton backward): dq, dk (T, N, K) per state head;
// dv (KB, T, N, V), df (KB, T, N), dw (KB, B, N, V, V) per row block; dh0 (B, N, K, V).
// Scratch: (chunks, N, KB, SUB_PER_CHUNK, ROWS · V) float32, written by A1, read by the walk.
#include "cuda_common.cuh"

#define SUB 8
#define SUB_PER_CHUNK (M2_CHUNK / SUB)
#define NT (M2_V / 8)
#define KS (M2_V / 16)
#define ROWS (16 * M2_TILES)
#define WARPS 4
#define WINDOW 16  // steps per shared-memory window of A1
// dq and dk as tensor-core products with dy, v as B operands: exact for bfloat16 inputs (float16 ones would need
// a conversion), so float16 inputs sum them on the FMA units with shuffles.
#define ROW_SUMS_ON_TENSOR_CORES M2_BF16

struct alignas(16) StepInputs {  // one step's inputs: every load of a step addresses one base
    u16 k[ROWS];
    u16 q[ROWS];
    u16 v[M2_V];
    u16 dy[M2_V];
    float f;
};

struct alignas(16) Stage {  // one visit: inputs of SUB steps and the state it starts from (thread-private fragments)
    StepInputs in[SUB];
    float h[M2_TILES][NT][32][4];
};

struct WarpShared {
    Stage stage[2];
    U32x4 state16[SUB][M2_TILES][KS][32];  // float16 A fragments of the state before each step of a sub-chunk
};

struct alignas(16) Window {  // A1's inputs of WINDOW steps
    u16 k[WINDOW][ROWS];
    u16 v[WINDOW][M2_V];
    float f[WINDOW];
};

// Where a warp's work lies: sequence b and its token range, chunk index base, the heads its inputs come from.
struct Sequence {
    long long bos, eos, first_chunk;
};

__device__ __forceinline__ Sequence sequence_of(int b, int seqlen, int chunks_per_seq, const int* cu_seqlens,
                                                const int* chunk_offsets) {
#if M2_VARLEN
    return Sequence{cu_seqlens[b], cu_seqlens[b + 1], chunk_offsets[b]};
#else
    const long long bos = (long long)b * seqlen;
    return Sequence{bos, bos + seqlen, (long long)b * chunks_per_seq};
#endif
}

__device__ __forceinline__ float load_gate(const void* f, long long index) {
#if M2_GATE_F32
    return reinterpret_cast<const float*>(f)[index];
#else
    return in_to_float(reinterpret_cast<const u16*>(f)[index]);
#endif
}

// A step's row of V values (v or dy) at this lane's accumulator columns 8j + 2t (+1).
__device__ __forceinline__ void load_columns(const u16* row, int t, float (&x)[NT][2]) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const u32 pair = *reinterpret_cast<const u32*>(row + 8 * j + 2 * t);
        x[j][0] = lo_half(pair);
        x[j][1] = hi_half(pair);
    }
}

// One tile of the state as the float16 A fragments of H·W (what the forward feeds its mma).
__device__ __forceinline__ void pack_state(const float (&h)[NT][4], u32 (&a)[KS][4]) {
#pragma unroll
    for (int s = 0; s < KS; ++s) {
        a[s][0] = pack_half2(h[2 * s][0], h[2 * s][1]);
        a[s][1] = pack_half2(h[2 * s][2], h[2 * s][3]);
        a[s][2] = pack_half2(h[2 * s + 1][0], h[2 * s + 1][1]);
        a[s][3] = pack_half2(h[2 * s + 1][2], h[2 * s + 1][3]);
    }
}

// Z = tanh(H W + k vᵀ) of one tile from its packed float16 state a: the forward's arithmetic exactly.
__device__ __forceinline__ void candidate(const u32 (&w16)[KS][NT][2], const u32 (&a)[KS][4], u32 kk,
                                          const float (&v_col)[NT][2], float (&z)[NT][4]) {
    const float k0 = lo_half(kk), k1 = hi_half(kk);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        float acc[4] = {k0 * v_col[j][0], k0 * v_col[j][1], k1 * v_col[j][0], k1 * v_col[j][1]};
#pragma unroll
        for (int s = 0; s < KS; ++s) mma_f16(acc, a[s], w16[s][j][0], w16[s][j][1]);
#pragma unroll
        for (int e = 0; e < 4; ++e) z[j][e] = tanh_approx(acc[e]);
    }
}

// One recurrence step on a warp's tiles (k_row: this step's ROWS values of k, v_row: its V values of v); where
// `kept` is given, the float16 state before the step goes there. No branch inside: the tiles' chains interleave.
__device__ __forceinline__ void recompute_step(float (&h)[M2_TILES][NT][4], const u32 (&w16)[KS][NT][2],
                                               const u16* k_row, const u16* v_row, float gate, int lane,
                                               U32x4 (*kept)[KS][32]) {
    const int g = lane >> 2, t = lane & 3;
    const float keep = 1.0f - gate;
    float v_col[NT][2];
    load_columns(v_row, t, v_col);
#pragma unroll
    for (int tau = 0; tau < M2_TILES; ++tau) {
        u32 a[KS][4];
        pack_state(h[tau], a);
        if (kept != nullptr) {
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) kept[tau][ks][lane] = U32x4{a[ks][0], a[ks][1], a[ks][2], a[ks][3]};
        }
        float z[NT][4];
        candidate(w16, a, *reinterpret_cast<const u32*>(&k_row[g * 2 * M2_TILES + 2 * tau]), v_col, z);
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) h[tau][j][e] = gated_update(h[tau][j][e], gate, keep, z[j][e]);
    }
}

// A1's work: one item per (chunk, head, row block), work = (chunk · N + n) · KB + kb, which is also its scratch slot
// and its ready flag. What an item reads, gathered from the kernel's arguments.
struct StatesJob {
    const u16* k;
    const u16* v;
    const float* w;
    const void* f;
    const float* checkpoints;
    float* scratch;
    const int* cu_seqlens;
    const int* chunk_offsets;
    int batch, seqlen, chunks_per_seq, total_chunks, N, NK, NV, NF, NW, K;
};

// A1 of one item: from the chunk's checkpoint, the state before each of its sub-chunks into the scratch.
// `windows` is two Windows of this warp's shared memory.
__device__ __forceinline__ void chunk_states(const StatesJob& job, int work, Window* windows, int lane) {
    const int g = lane >> 2, t = lane & 3;
    const int kblocks = job.K / ROWS, N = job.N;
    const int kb = work % kblocks;
    const int n = (work / kblocks) % N;
    const int global_chunk = work / kblocks / N;
    int b;
#if M2_VARLEN
    {  // the last sequence whose first chunk is at or before this one (empty sequences share the next one's)
        int lo = 0, hi = job.batch - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (job.chunk_offsets[mid] <= global_chunk) lo = mid;
            else hi = mid - 1;
        }
        b = lo;
    }
#else
    b = global_chunk / job.chunks_per_seq;
#endif
    const Sequence seq = sequence_of(b, job.seqlen, job.chunks_per_seq, job.cu_seqlens, job.chunk_offsets);
    const long long tok0 = seq.bos + (global_chunk - seq.first_chunk) * M2_CHUNK;
    if (tok0 >= seq.eos) return;  // the chunk count is a bound for packed sequences (no host sync): none here
    const int steps = seq.eos - tok0 < M2_CHUNK ? (int)(seq.eos - tok0) : M2_CHUNK;
    const int kh = n / (N / job.NK), vh = n / (N / job.NV), fh = n / (N / job.NF), wh = n / (N / job.NW);
    const int row_base = kb * ROWS;
    const int my_rows = row_base + g * 2 * M2_TILES;

    u32 w16[KS][NT][2];
    load_state_weight(w16, job.w + (long long)wh * M2_V * M2_V, g, t);
    float h[M2_TILES][NT][4];
    load_state_tiles(h, job.checkpoints + ((long long)global_chunk * N + n) * job.K * M2_V, my_rows, t);

    auto issue = [&](int window, Window& s) {
        constexpr int ROW_CHUNKS = ROWS / 8, COL_CHUNKS = M2_V / 8;
        const long long first = tok0 + window * WINDOW;
        for (int c = lane; c < WINDOW * ROW_CHUNKS; c += 32) {
            const int i = c / ROW_CHUNKS, o = 8 * (c % ROW_CHUNKS);
            const bool valid = window * WINDOW + i < steps;
            const long long tok = valid ? first + i : tok0;
            copy_async<16>(&s.k[i][o], job.k + tok * job.NK * job.K + (long long)kh * job.K + row_base + o, valid);
        }
        for (int c = lane; c < WINDOW * COL_CHUNKS; c += 32) {
            const int i = c / COL_CHUNKS, o = 8 * (c % COL_CHUNKS);
            const bool valid = window * WINDOW + i < steps;
            const long long tok = valid ? first + i : tok0;
            copy_async<16>(&s.v[i][o], job.v + tok * job.NV * M2_V + (long long)vh * M2_V + o, valid);
        }
        if (lane < WINDOW)
            s.f[lane] = window * WINDOW + lane < steps ? load_gate(job.f, (first + lane) * job.NF + fh) : 0.0f;
    };

    float* const dst = job.scratch + (long long)work * SUB_PER_CHUNK * ROWS * M2_V;
    const int num_windows = (steps + WINDOW - 1) / WINDOW;
    issue(0, windows[0]);
    copy_async_commit();
    for (int window = 0; window < num_windows; ++window) {
        Window& s = windows[window & 1];
        if (window + 1 < num_windows) issue(window + 1, windows[(window + 1) & 1]);
        copy_async_commit();
        copy_async_wait<1>();
        __syncwarp();
        const int window_steps = steps - window * WINDOW < WINDOW ? steps - window * WINDOW : WINDOW;
        for (int i = 0; i < window_steps; ++i) {
            const int step_in_chunk = window * WINDOW + i;
            if (step_in_chunk % SUB == 0) {
                float* sub_state = dst + (long long)(step_in_chunk / SUB) * ROWS * M2_V;
#pragma unroll
                for (int tau = 0; tau < M2_TILES; ++tau)
#pragma unroll
                    for (int j = 0; j < NT; ++j)
                        *reinterpret_cast<U32x4*>(sub_state + ((tau * NT + j) * 32 + lane) * 4) =
                            U32x4{__float_as_uint(h[tau][j][0]), __float_as_uint(h[tau][j][1]),
                                  __float_as_uint(h[tau][j][2]), __float_as_uint(h[tau][j][3])};
            }
            recompute_step(h, w16, s.k[i], s.v[i], s.f[i], lane, nullptr);
        }
        __syncwarp();
    }
    copy_async_wait<0>();
}

// The queue of A1's items, one zeroed int32 buffer per backward: [0] block tickets, [1] claims, [2 + work] the item's
// state (FREE, TAKEN: a warp runs it, READY: its scratch is written). A1 blocks claim items last chunk first, the
// order the walk needs them: for equal-length sequences claim c is chunk (chunks_per_seq - 1 - c / (B·N·KB)) of
// each sequence in turn; for packed ones, whose chunk counts differ, the global chunk index counts down.
#define QUEUE_TICKETS 0
#define QUEUE_CLAIMS 1
#define QUEUE_ITEMS 2
#define ITEM_FREE 0
#define ITEM_TAKEN 1
#define ITEM_READY 2

__device__ __forceinline__ int claimed_work(const StatesJob& job, int claim) {
    const int per_chunk = job.N * (job.K / ROWS);
#if M2_VARLEN
    const int global_chunk = job.total_chunks - 1 - claim / per_chunk;
#else
    const int per_layer = job.batch * per_chunk;
    const int layer = claim / per_layer, b = claim % per_layer / per_chunk;
    const int global_chunk = b * job.chunks_per_seq + job.chunks_per_seq - 1 - layer;
#endif
    return global_chunk * per_chunk + claim % per_chunk;
}

__device__ __forceinline__ int load_acquire(const int* p) {
    int x;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(x) : "l"(p) : "memory");
    return x;
}

__device__ __forceinline__ void store_release(int* p, int x) {
    asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(p), "r"(x) : "memory");
}

// Takes item `work` for this warp if it is still FREE (lane 0 decides, every lane gets the answer).
__device__ __forceinline__ bool take_item(int* queue, int work, int lane) {
    int took = 0;
    if (lane == 0) took = atomicCAS(queue + QUEUE_ITEMS + work, ITEM_FREE, ITEM_TAKEN) == ITEM_FREE;
    return __shfl_sync(0xffffffffu, took, 0);
}

// Runs a taken item and marks it READY once every lane's scratch stores are visible device-wide.
__device__ __forceinline__ void run_item(const StatesJob& job, int* queue, int work, Window* windows, int lane) {
    chunk_states(job, work, windows, lane);
    __threadfence();
    __syncwarp();
    if (lane == 0) store_release(queue + QUEUE_ITEMS + work, ITEM_READY);
}

// An A1 block's warps: claim items in the queue's order and run those the walk has not taken itself.
__device__ __forceinline__ void run_queue(const StatesJob& job, int* queue, int num_work, Window* windows, int lane) {
    for (;;) {
        int claim = 0;
        if (lane == 0) claim = atomicAdd(queue + QUEUE_CLAIMS, 1);
        claim = __shfl_sync(0xffffffffu, claim, 0);
        if (claim >= num_work) return;
        const int work = claimed_work(job, claim);
        if (take_item(queue, work, lane)) run_item(job, queue, work, windows, lane);
    }
}

// A walk warp's wait for item `work`: it runs the item itself if no one has taken it, else waits for the warp that
// did, which is resident and waits on nothing. So the walk cannot deadlock however many blocks are resident.
__device__ __forceinline__ void await_item(const StatesJob& job, int* queue, int work, Window* windows, int lane) {
    for (;;) {
        const int state = load_acquire(queue + QUEUE_ITEMS + work);
        if (__all_sync(0xffffffffu, state == ITEM_READY)) return;
        if (__shfl_sync(0xffffffffu, state, 0) == ITEM_FREE && take_item(queue, work, lane)) {
            run_item(job, queue, work, windows, lane);
            return;
        }
        __nanosleep(128);
    }
}

// A1 alone, launched before the walk where A1 blocks beside it would share the busiest multiprocessors: one warp per
// item (work = blockIdx.x · WARPS + warp). The walk, next on the stream, then needs no queue.
extern "C" __global__ void __launch_bounds__(WARPS * 32) m2rnn_backward_states(
    const u16* __restrict__ k, const u16* __restrict__ v, const float* __restrict__ w, const void* __restrict__ f,
    const float* __restrict__ checkpoints, float* scratch,
    const int* __restrict__ cu_seqlens, const int* __restrict__ chunk_offsets,
    int num_work, int batch, int seqlen, int chunks_per_seq, int N, int NK, int NV, int NF, int NW, int K) {
    __shared__ Window windows[WARPS][2];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int work = blockIdx.x * WARPS + warp;
    if (work >= num_work) return;
    const StatesJob job{k, v, w, f, checkpoints, scratch, cu_seqlens, chunk_offsets,
                        batch, seqlen, chunks_per_seq, 0, N, NK, NV, NF, NW, K};  // total_chunks: read by claims only
    chunk_states(job, work, windows[warp], lane);
}

// The walk. With M2_A1_BESIDE, A1 blocks share its launch: the first `walk_blocks` blocks to start (by ticket) walk,
// the rest run A1's items until none is left, and a walk warp awaits each chunk's item before it reads the chunk's
// scratch. Without, A1 ran before it (queue unused).
extern "C" __global__ void __launch_bounds__(WARPS * 32) m2rnn_backward(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v, const float* __restrict__ w,
    const void* __restrict__ f, const u16* __restrict__ dy,
    const float* __restrict__ dht, float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv,
    float* __restrict__ df, float* __restrict__ dw, float* __restrict__ dh0,
    const float* __restrict__ checkpoints, float* scratch, int* queue,
    const int* __restrict__ cu_seqlens, const int* __restrict__ chunk_offsets,
    int num_items, int walk_blocks, int num_work, int batch, int seqlen, int chunks_per_seq, int total_chunks,
    long long total_tokens, float clip, int N, int NQ, int NK, int NV, int NF, int NW, int K) {
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#if M2_A1_BESIDE
    __shared__ int ticket;
    if (threadIdx.x == 0) ticket = atomicAdd(queue + QUEUE_TICKETS, 1);
    __syncthreads();  // the only block-wide barrier: warps go their own ways after it
    const int block = ticket;
    static_assert(2 * sizeof(Window) <= sizeof(WarpShared::state16), "A1's windows live in the kept states' place");
    Window* const windows = reinterpret_cast<Window*>(&reinterpret_cast<WarpShared*>(shared_bytes)[warp].state16);
    const StatesJob job{k, v, w, f, checkpoints, scratch, cu_seqlens, chunk_offsets,
                        batch, seqlen, chunks_per_seq, total_chunks, N, NK, NV, NF, NW, K};
    if (block >= walk_blocks) {
        run_queue(job, queue, num_work, windows, lane);
        return;
    }
#else
    const int block = blockIdx.x;
#endif
    const int item = block * WARPS + warp;
    if (item >= num_items) return;  // no block-wide barrier below
    u32 dynamic_bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dynamic_bytes));
    if (dynamic_bytes < WARPS * sizeof(WarpShared)) __trap();  // the launcher's size formula is out of date
    WarpShared& ws = reinterpret_cast<WarpShared*>(shared_bytes)[warp];
    const int g = lane >> 2, t = lane & 3;
    const int kblocks = K / ROWS;
    const int kb = item % kblocks;
    const int bn = item / kblocks;
    const int b = bn / N, n = bn % N;
    const int qh = n / (N / NQ), kh = n / (N / NK), vh = n / (N / NV), fh = n / (N / NF), wh = n / (N / NW);

    const Sequence seq = sequence_of(b, seqlen, chunks_per_seq, cu_seqlens, chunk_offsets);
    const long long bos = seq.bos, eos = seq.eos;
    const int length = (int)(eos - bos);
    const int row_base = kb * ROWS;
    const int my_rows = row_base + g * 2 * M2_TILES;  // + 2·tau + (0 | 1), as in the forward
    [[maybe_unused]] const long long head_state = ((long long)b * N + n) * K * M2_V;

    // W for the recomputation (float16, as the forward) and Wᵀ for the carry (bfloat16 hi and lo).
    const float* wn = w + (long long)wh * M2_V * M2_V;
    u32 w16[KS][NT][2], wt_hi[KS][NT][2], wt_lo[KS][NT][2];
    load_state_weight(w16, wn, g, t);
#pragma unroll
    for (int s = 0; s < KS; ++s)
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int r = 16 * s + 2 * t, c = 8 * j + g;
            // Wᵀ[r][c] = W[c][r]
            const float x[4] = {wn[c * M2_V + r], wn[c * M2_V + r + 1], wn[c * M2_V + r + 8], wn[c * M2_V + r + 9]};
#pragma unroll
            for (int p = 0; p < 2; ++p) {
                wt_hi[s][j][p] = pack_bf16x2(x[2 * p], x[2 * p + 1]);
                wt_lo[s][j][p] = pack_bf16x2(x[2 * p] - bf16_lo(wt_hi[s][j][p]), x[2 * p + 1] - bf16_hi(wt_hi[s][j][p]));
            }
        }

    float dh[M2_TILES][NT][4];
#pragma unroll
    for (int tau = 0; tau < M2_TILES; ++tau)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
#if M2_HAS_DHT
                const int row = my_rows + 2 * tau + (e >> 1), col = 8 * j + 2 * t + (e & 1);
                dh[tau][j][e] = dht[head_state + (long long)row * M2_V + col];
#else
                dh[tau][j][e] = 0.0f;
#endif
            }
    float dw_acc[KS][NT][4];
#pragma unroll
    for (int s = 0; s < KS; ++s)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) dw_acc[s][j][e] = 0.0f;

    float h[M2_TILES][NT][4];

    // Visits: the sub-chunks of the sequence, last first (sub-chunk sub of chunk `chunk`).
    const int num_chunks = (length + M2_CHUNK - 1) / M2_CHUNK;
    auto subs_of = [&](int chunk) {
        const int len = length - chunk * M2_CHUNK < M2_CHUNK ? length - chunk * M2_CHUNK : M2_CHUNK;
        return (len + SUB - 1) / SUB;
    };
    float gate_pending = 0.0f;
    auto issue = [&](int chunk, int sub, Stage& s) {
        const long long work = ((seq.first_chunk + chunk) * N + n) * kblocks + kb;
#if M2_A1_BESIDE
        if (sub == subs_of(chunk) - 1) await_item(job, queue, (int)work, windows, lane);  // a chunk's first visit
#endif
        // 16-byte copies: a step's rows of k and q are ROWS contiguous 16-bit values, its v and dy V of them.
        const long long tok0 = bos + (long long)chunk * M2_CHUNK + sub * SUB;
        constexpr int ROW_CHUNKS = ROWS / 8, COL_CHUNKS = M2_V / 8;
        for (int c = lane; c < SUB * ROW_CHUNKS; c += 32) {
            const int i = c / ROW_CHUNKS, o = 8 * (c % ROW_CHUNKS);
            const bool valid = tok0 + i < eos;
            const long long tok = valid ? tok0 + i : bos;
            copy_async<16>(&s.in[i].k[o], k + tok * NK * K + (long long)kh * K + row_base + o, valid);
            copy_async<16>(&s.in[i].q[o], q + tok * NQ * K + (long long)qh * K + row_base + o, valid);
        }
        for (int c = lane; c < SUB * COL_CHUNKS; c += 32) {
            const int i = c / COL_CHUNKS, o = 8 * (c % COL_CHUNKS);
            const bool valid = tok0 + i < eos;
            const long long tok = valid ? tok0 + i : bos;
            copy_async<16>(&s.in[i].v[o], v + tok * NV * M2_V + (long long)vh * M2_V + o, valid);
            copy_async<16>(&s.in[i].dy[o], dy + (tok * N + n) * M2_V + o, valid);
        }
        const float* src = scratch + (work * SUB_PER_CHUNK + sub) * (long long)(ROWS * M2_V);
#pragma unroll
        for (int tau = 0; tau < M2_TILES; ++tau)
#pragma unroll
            for (int j = 0; j < NT; ++j)
                copy_async<16>(&s.h[tau][j][lane][0], src + ((tau * NT + j) * 32 + lane) * 4, true);
        const long long tok = tok0 + lane;
        gate_pending = lane < SUB && tok < eos ? load_gate(f, tok * NF + fh) : 0.0f;
    };

    // Where this lane stores B's per-step outputs (token 0; plus token · step): dq or dk of TILES rows (lanes with
    // t & 2 keep dk), one dv column after the halving reduction (col_slot), df from lane 0.
#if NT == 4
    const int col_slot = ((lane >> 4) & 1) * 4 + ((lane >> 3) & 1) * 2 + ((lane >> 2) & 1);
    const bool stores_col = true;
#else
    const int col_slot = ((lane >> 4) & 1) * 2 + ((lane >> 3) & 1);
    const bool stores_col = (lane & 4) == 0;
#endif
    const long long row_step = (long long)N * K, dv_step = (long long)N * M2_V;
    float* const row_lane = ((t & 2) ? dk : dq) + (long long)n * K + my_rows + (t & 1) * M2_TILES;
    float* const dv_lane = dv + ((long long)kb * total_tokens * N + n) * M2_V + 2 * t + 8 * (col_slot >> 1) + (col_slot & 1);
    float* const df_lane = df + (long long)kb * total_tokens * N + n;

    int chunk = num_chunks - 1, sub = num_chunks > 0 ? subs_of(chunk) - 1 : 0, parity = 0;
    if (num_chunks > 0) issue(chunk, sub, ws.stage[0]);
    copy_async_commit();
    while (chunk >= 0) {
        Stage& s = ws.stage[parity];
        copy_async_wait<0>();
        if (lane < SUB) s.in[lane].f = gate_pending;
        __syncwarp();
        const long long tok0 = bos + (long long)chunk * M2_CHUNK + sub * SUB;
        const int steps = eos - tok0 < SUB ? (int)(eos - tok0) : SUB;
        // Next visit, issued now: its inputs arrive while this one runs.
        const int next_chunk = sub > 0 ? chunk : chunk - 1;
        const int next_sub = sub > 0 ? sub - 1 : (next_chunk >= 0 ? subs_of(next_chunk) - 1 : 0);
        if (next_chunk >= 0) issue(next_chunk, next_sub, ws.stage[parity ^ 1]);
        copy_async_commit();

        // A2: the float16 state before each step of the sub-chunk, into shared memory.
#pragma unroll
        for (int tau = 0; tau < M2_TILES; ++tau)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) h[tau][j][e] = s.h[tau][j][lane][e];
        for (int i = 0; i + 1 < steps; ++i) recompute_step(h, w16, s.in[i].k, s.in[i].v, s.in[i].f, lane, ws.state16[i]);
#pragma unroll
        for (int tau = 0; tau < M2_TILES; ++tau) {  // the state after the last step is not needed
            u32 a[KS][4];
            pack_state(h[tau], a);
#pragma unroll
            for (int ks = 0; ks < KS; ++ks)
                ws.state16[steps - 1][tau][ks][lane] = U32x4{a[ks][0], a[ks][1], a[ks][2], a[ks][3]};
        }
        // B: the sub-chunk backwards. Inputs, kept states and outputs addressed at the last step, stepped back.
        float* row_out = row_lane + (tok0 + steps - 1) * row_step;
        float* dv_out = dv_lane + (tok0 + steps - 1) * dv_step;
        float* df_out = df_lane + (tok0 + steps - 1) * N;
#if M2_TILES == 1  // one chain per warp: two steps' independent work in flight (two tiles already interleave)
#pragma unroll 2
#endif
        for (int i = steps - 1; i >= 0; --i, row_out -= row_step, dv_out -= dv_step, df_out -= N) {
            const StepInputs& in = s.in[i];
            const float gate = in.f, keep = 1.0f - gate;
            float dy_col[NT][2], v_col[NT][2];
            load_columns(in.dy, t, dy_col);
            load_columns(in.v, t, v_col);
            float dv_part[NT][2];
#pragma unroll
            for (int j = 0; j < NT; ++j) dv_part[j][0] = dv_part[j][1] = 0.0f;
            float df_part = 0.0f;
            float dq_rows[M2_TILES][2], dk_rows[M2_TILES][2];
#pragma unroll
            for (int tau = 0; tau < M2_TILES; ++tau) {
                const u32 kk = *reinterpret_cast<const u32*>(&in.k[g * 2 * M2_TILES + 2 * tau]);
                const u32 qq = *reinterpret_cast<const u32*>(&in.q[g * 2 * M2_TILES + 2 * tau]);
                const float k0 = lo_half(kk), k1 = hi_half(kk), q0 = lo_half(qq), q1 = hi_half(qq);
                u32 a[KS][4];
#pragma unroll
                for (int ks = 0; ks < KS; ++ks) {
                    const U32x4 x = ws.state16[i][tau][ks][lane];
                    a[ks][0] = x.x;
                    a[ks][1] = x.y;
                    a[ks][2] = x.z;
                    a[ks][3] = x.w;
                }
                float hp[NT][4];  // H_{t-1} (as float16 rounded it)
#pragma unroll
                for (int ks = 0; ks < KS; ++ks)
#pragma unroll
                    for (int p = 0; p < 4; ++p) {
                        const int j = 2 * ks + (p >> 1), e = 2 * (p & 1);
                        hp[j][e] = half_to_float(a[ks][p]);
                        hp[j][e + 1] = half_to_float(a[ks][p] >> 16);
                    }
                float z[NT][4];
                candidate(w16, a, kk, v_col, z);

                float dx[NT][4];
                dq_rows[tau][0] = dq_rows[tau][1] = dk_rows[tau][0] = dk_rows[tau][1] = 0.0f;
#pragma unroll
                for (int j = 0; j < NT; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const float d_y = dy_col[j][e & 1];
#if !ROW_SUMS_ON_TENSOR_CORES
                        dq_rows[tau][e >> 1] += (hp[j][e] + keep * (z[j][e] - hp[j][e])) * d_y;
#endif
                        float carry = dh[tau][j][e];
#if M2_CLIP
                        carry = fminf(fmaxf(carry, -clip), clip);
#endif
                        const float grad = carry + ((e >> 1) ? q1 : q0) * d_y;
                        df_part += grad * (hp[j][e] - z[j][e]);
                        dx[j][e] = keep * grad * (1.0f - z[j][e] * z[j][e]);
#if !ROW_SUMS_ON_TENSOR_CORES
                        dk_rows[tau][e >> 1] += dx[j][e] * v_col[j][e & 1];
#endif
                        dv_part[j][e & 1] += dx[j][e] * ((e >> 1) ? k1 : k0);
                        dh[tau][j][e] = gate * grad;  // + dX Wᵀ below
                    }
                // dH_{t-1} = f G + dX Wᵀ with dX = hi + lo (bfloat16 each), Wᵀ = hi + lo.
                u32 x_hi[KS][4], x_lo[KS][4];
#pragma unroll
                for (int ks = 0; ks < KS; ++ks)
#pragma unroll
                    for (int p = 0; p < 4; ++p) {
                        const int j = 2 * ks + (p >> 1), e = 2 * (p & 1);
                        x_hi[ks][p] = pack_bf16x2(dx[j][e], dx[j][e + 1]);
                        x_lo[ks][p] = pack_bf16x2(dx[j][e] - bf16_lo(x_hi[ks][p]), dx[j][e + 1] - bf16_hi(x_hi[ks][p]));
                    }
#pragma unroll
                for (int j = 0; j < NT; ++j)
#pragma unroll
                    for (int ks = 0; ks < KS; ++ks) {  // one accumulator: float32 sums, in order of readiness
                        mma_bf16(dh[tau][j], x_hi[ks], wt_hi[ks][j][0], wt_hi[ks][j][1]);
                        mma_bf16(dh[tau][j], x_hi[ks], wt_lo[ks][j][0], wt_lo[ks][j][1]);
                        mma_bf16(dh[tau][j], x_lo[ks], wt_hi[ks][j][0], wt_hi[ks][j][1]);
                    }
                u32 hp_bf16[KS][4];
#pragma unroll
                for (int ks = 0; ks < KS; ++ks)
#pragma unroll
                    for (int r = 0; r < 4; ++r) {
                        const int j = 2 * ks + (r >> 1), e = 2 * (r & 1);
                        hp_bf16[ks][r] = pack_bf16x2(hp[j][e], hp[j][e + 1]);
                    }
#if ROW_SUMS_ON_TENSOR_CORES
                // dq = H_t dy = (1-keep) H_{t-1} dy + keep Z dy and dk = dX v as products with a B operand whose
                // every column is dy (or v): each accumulator row holds its row's sum, no shuffles.
                {
                    float from_state[4] = {0.0f, 0.0f, 0.0f, 0.0f}, from_z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                    float dk_acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                    for (int ks = 0; ks < KS; ++ks) {
                        u32 z_bf16[4];
#pragma unroll
                        for (int r = 0; r < 4; ++r) {
                            const int j = 2 * ks + (r >> 1), e = 2 * (r & 1);
                            z_bf16[r] = pack_bf16x2(z[j][e], z[j][e + 1]);
                        }
                        const u32 dy0 = *reinterpret_cast<const u32*>(&in.dy[16 * ks + 2 * t]);
                        const u32 dy1 = *reinterpret_cast<const u32*>(&in.dy[16 * ks + 8 + 2 * t]);
                        const u32 v0 = *reinterpret_cast<const u32*>(&in.v[16 * ks + 2 * t]);
                        const u32 v1 = *reinterpret_cast<const u32*>(&in.v[16 * ks + 8 + 2 * t]);
                        mma_bf16(from_state, hp_bf16[ks], dy0, dy1);
                        mma_bf16(from_z, z_bf16, dy0, dy1);
                        mma_bf16(dk_acc, x_hi[ks], v0, v1);
                        mma_bf16(dk_acc, x_lo[ks], v0, v1);
                    }
                    dq_rows[tau][0] = gate * from_state[0] + keep * from_z[0];
                    dq_rows[tau][1] = gate * from_state[2] + keep * from_z[2];
                    dk_rows[tau][0] = dk_acc[0];
                    dk_rows[tau][1] = dk_acc[2];
                }
#endif
                // dW += H_{t-1}ᵀ dX: A = the transposed state (bfloat16), B = the transposed dX (hi).
#pragma unroll
                for (int mt = 0; mt < KS; ++mt) {
                    const u32 at[4] = {transpose_8x8(hp_bf16[mt][0]), transpose_8x8(hp_bf16[mt][2]),
                                       transpose_8x8(hp_bf16[mt][1]), transpose_8x8(hp_bf16[mt][3])};
#pragma unroll
                    for (int jn = 0; jn < NT; ++jn) {
                        const int ks = jn >> 1, half = jn & 1;
                        mma_bf16(dw_acc[mt][jn], at, transpose_8x8(x_hi[ks][2 * half]),
                                 transpose_8x8(x_hi[ks][2 * half + 1]));
                    }
                }
            }
            // Per-step gradients of the inputs, reduced over the lanes sharing a row (dq, dk: the 4 lanes t) or a
            // column (dv: the 8 lanes g) by halving: each level keeps half the values, so each lane ends with
            // whole sums for a slice of rows or columns and stores it.
            float rows[4 * M2_TILES];  // dq of row my_rows + v, then dk of the same rows
#pragma unroll
            for (int tau = 0; tau < M2_TILES; ++tau)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    rows[2 * tau + e] = dq_rows[tau][e];
                    rows[2 * M2_TILES + 2 * tau + e] = dk_rows[tau][e];
                }
#if ROW_SUMS_ON_TENSOR_CORES  // every lane t holds whole sums: lanes with t & 2 keep dk, the others dq
#pragma unroll
            for (int r = 0; r < 2 * M2_TILES; ++r) rows[r] = (t & 2) ? rows[2 * M2_TILES + r] : rows[r];
#pragma unroll
            for (int r = 0; r < M2_TILES; ++r) rows[r] = (t & 1) ? rows[M2_TILES + r] : rows[r];
#else
            reduce_level<4 * M2_TILES>(rows, 2, (lane >> 1) & 1);  // lanes with t & 2 keep dk, the others dq
            reduce_level<2 * M2_TILES>(rows, 1, lane & 1);  // then rows my_rows + (t & 1)·TILES, TILES of them
#endif
            float cols[2 * NT];  // dv of column 8j + 2t + e at 2j + e
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                cols[2 * j] = dv_part[j][0];
                cols[2 * j + 1] = dv_part[j][1];
            }
            reduce_level<2 * NT>(cols, 16, (lane >> 4) & 1);
            reduce_level<NT>(cols, 8, (lane >> 3) & 1);
#if NT == 4
            reduce_level<2>(cols, 4, (lane >> 2) & 1);
#else
            cols[0] = lane_sum<4>(cols[0]);
#endif
            df_part = lane_sum<31>(df_part);
#if M2_TILES == 2
            *reinterpret_cast<Float2*>(row_out) = Float2{rows[0], rows[1]};
#else
            row_out[0] = rows[0];
#endif
            if (stores_col) *dv_out = cols[0];
            if (lane == 0) *df_out = df_part;
        }
        __syncwarp();
        chunk = next_chunk;
        sub = next_sub;
        parity ^= 1;
    }
    copy_async_wait<0>();

    // dW partial of this row block: dw_acc[mt][jn] holds rows 16mt + g (+8), cols 8jn + 2t (+1).
    float* dw_block = dw + (((long long)kb * (num_items / kblocks) + bn) * M2_V * M2_V);
#pragma unroll
    for (int mt = 0; mt < KS; ++mt)
#pragma unroll
        for (int jn = 0; jn < NT; ++jn)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int row = 16 * mt + g + 8 * half, col = 8 * jn + 2 * t;
                *reinterpret_cast<Float2*>(dw_block + row * M2_V + col) =
                    Float2{dw_acc[mt][jn][2 * half], dw_acc[mt][jn][2 * half + 1]};
            }
#if M2_STORE_DH0
    store_state_tiles(dh, dh0 + head_state, my_rows, t);
#endif
}
