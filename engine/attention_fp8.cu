/* Decode attention over a float8 cache (engine/attention_fp8.py compiles this with
   NVRTC, each configuration's constants #defined before it: D, GROUP, NSPLIT, BASED,
   BF16, KEYS, MIN_BLOCKS, SLOT_T, LEN_T, FIRST_T). NSPLIT 0: the balanced kernel
   (fp8_decode); else the split kernel (fp8_decode_split). */
typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;
#define NEG_INF __int_as_float(0xff800000)

#define ROWS (D / 4)   /* key bytes a thread reads per key: a quarter of the row */
#define COLS (D / 8)   /* value bytes a thread reads per key: an eighth */
#define STEPS (D / 16) /* 16-wide steps of the score product */
#define TILES (D / 16) /* 16-dimension tiles of the value product */

/* PDL (engine/pdl.py): let the next kernel on the stream start; wait until the kernel
   before has finished and its writes are visible. No-ops in a launch without PDL. */
__device__ __forceinline__ void pdl_start() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/* Keys from .. from + 63 (below end) of KV head kvh in `slot` into L2, a key a lane per
   32 (its key and value rows, its factors): what may be read before pdl_wait(). No
   kernel of the step writes a key before the newest, and a prefetch of the newest, as
   the kernel before writes it, only puts in L2 what is there (L2 is where writes land;
   nothing comes into L1). */
__device__ __noinline__ void prefetch_keys(
    const unsigned char *K, const unsigned char *V, const float *KS, const float *VS, i64 slot,
    int kvh, int stride_ks, int stride_kt, int stride_kh, int stride_vs, int stride_vt,
    int stride_vh, int stride_ss, int stride_st, i64 from, i64 end, int lane)
{
#if __CUDA_ARCH__ >= 900
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const i64 key = from + 32 * i + lane;
        if (key < end) {
            const unsigned char *k = K + slot * stride_ks + key * stride_kt + (i64)kvh * stride_kh;
            const unsigned char *v = V + slot * stride_vs + key * stride_vt + (i64)kvh * stride_vh;
            const i64 at = slot * stride_ss + key * stride_st + kvh;
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(k), "r"(D));
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(v), "r"(D));
            asm volatile("prefetch.global.L2 [%0];" :: "l"(KS + at));
            asm volatile("prefetch.global.L2 [%0];" :: "l"(VS + at));
        }
    }
#endif
}

__device__ __forceinline__ void e4m3x4_to_f16x2(u32 w, u32 &lo, u32 &hi) {
    asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %2;\n"
        " cvt.rn.f16x2.e4m3x2 %0, l;\n cvt.rn.f16x2.e4m3x2 %1, h;\n}"
        : "=r"(lo), "=r"(hi) : "r"(w));
}

__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.satfinite.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

__device__ __forceinline__ float exp2_approx(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ void mma(float *c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float half_to_float(u16 x) {
#if BF16
    return __int_as_float(((u32)x) << 16);
#else
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(x));
    return r;
#endif
}

template <int N>
__device__ __forceinline__ void load_words(u32 *dst, const unsigned char *src) {
    if (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N; i += 4) {
            uint4 v = *reinterpret_cast<const uint4 *>(src + 4 * i);
            dst[i] = v.x; dst[i + 1] = v.y; dst[i + 2] = v.z; dst[i + 3] = v.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; i += 2) {
            uint2 v = *reinterpret_cast<const uint2 *>(src + 4 * i);
            dst[i] = v.x; dst[i + 1] = v.y;
        }
    }
}

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}

struct Block {
    u32 kw[KEYS / 8][ROWS / 4];  /* [block*2 + tile][word] */
    u32 vw[KEYS / 4][COLS / 4];  /* [block*4 + e][word] */
    float ks[KEYS / 4], vs[KEYS / 4];
};

/* This thread's share of keys base .. base + KEYS - 1 (rows past the end re-read the
   last key: finite bytes, masked later). In a block of 16, the scores' columns 2t, 2t+1
   of the two 8-key tiles are keys 4t .. 4t+3; the key tiles' column g (loaded by group
   g) is key0 = 4(g/2) + g%2 (+2 in the second tile). */
__device__ __forceinline__ void load_block(
    Block &blk, i64 base, i64 end, const unsigned char *kbase, const unsigned char *vbase,
    const float *KS, const float *VS, i64 sbase, int stride_kt, int stride_vt, int stride_st,
    int key0, int g, int t)
{
#pragma unroll
    for (int kb = 0; kb < KEYS / 16; kb++) {
#pragma unroll
        for (int tile = 0; tile < 2; tile++) {
            i64 key = min(base + 16 * kb + key0 + 2 * tile, end - 1);
            load_words<ROWS / 4>(blk.kw[kb * 2 + tile], kbase + key * stride_kt + ROWS * t);
        }
#pragma unroll
        for (int e = 0; e < 4; e++) {
            i64 key = min(base + 16 * kb + 4 * t + e, end - 1);
            load_words<COLS / 4>(blk.vw[kb * 4 + e], vbase + key * stride_vt + COLS * g);
            blk.ks[kb * 4 + e] = KS[sbase + key * stride_st];
            blk.vs[kb * 4 + e] = VS[sbase + key * stride_st];
        }
    }
}

/* The online softmax over one block: scores, weights, and the weighted values into acc. */
__device__ __forceinline__ void attend_block(
    Block &blk, i64 base, i64 end, float scale, const u32 *qa, const u32 *qb,
    float (*acc)[4], float &m, float &l, float &ref, int t)
{
    /* scores: s[kb*4 + e] is key base + 16kb + 4t + e, for head g */
    float s[KEYS / 4];
#pragma unroll
    for (int kb = 0; kb < KEYS / 16; kb++) {
#pragma unroll
        for (int tile = 0; tile < 2; tile++) {
            float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int j = 0; j < STEPS; j++) {
                u32 b0, b1;
                e4m3x4_to_f16x2(blk.kw[kb * 2 + tile][j], b0, b1);
                mma(c, qa[j], 0u, qb[j], 0u, b0, b1);
            }
            s[kb * 4 + 2 * tile] = c[0];
            s[kb * 4 + 2 * tile + 1] = c[1];
        }
    }
    float block_max = NEG_INF, vmax = 0.0f;
#pragma unroll
    for (int i = 0; i < KEYS / 4; i++) {
        const bool ok = base + 16 * (i / 4) + 4 * t + (i % 4) < end;
        s[i] = ok ? s[i] * blk.ks[i] * scale : NEG_INF;
        blk.vs[i] = ok ? blk.vs[i] : 0.0f;
        block_max = fmaxf(block_max, s[i]);
        vmax = fmaxf(vmax, blk.vs[i]);
    }
    block_max = quad_max(block_max);
    vmax = quad_max(vmax);
    const float m_new = fmaxf(m, block_max);
    const float corr = exp2_approx(m - m_new);
    const float ref_new = fmaxf(ref, vmax);
    const float inv = ref_new > 0.0f ? 1.0f / ref_new : 0.0f;
    const float rescale = ref_new > 0.0f ? ref / ref_new : 0.0f;
    u32 pb0[KEYS / 16], pb1[KEYS / 16];
    float sum = 0.0f;
#pragma unroll
    for (int kb = 0; kb < KEYS / 16; kb++) {
        float p[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            p[e] = exp2_approx(s[kb * 4 + e] - m_new);
            sum += p[e];
            p[e] *= blk.vs[kb * 4 + e] * inv;
        }
        pb0[kb] = pack_f16x2(p[0], p[1]);
        pb1[kb] = pack_f16x2(p[2], p[3]);
    }
    l = l * corr + sum;
    m = m_new;
    ref = ref_new;
    /* The accumulators' columns are heads 2t and 2t+1: their corrections live in
       groups 2t and 2t+1. */
    const float f0 = __shfl_sync(0xffffffff, corr, 8 * t) * rescale;
    const float f1 = __shfl_sync(0xffffffff, corr, 8 * t + 4) * rescale;
#pragma unroll
    for (int i = 0; i < TILES; i++) {
        acc[i][0] *= f0; acc[i][1] *= f1; acc[i][2] *= f0; acc[i][3] *= f1;
    }
    /* O^T += V^T P^T: A = V^T (rows: dimensions, columns: keys 4t..4t+3 of the
       block), B = P^T (this thread's own weights, as computed). */
#pragma unroll
    for (int kb = 0; kb < KEYS / 16; kb++) {
#pragma unroll
        for (int w = 0; w < COLS / 4; w++) {
            const u32 x01 = prmt(blk.vw[kb * 4][w], blk.vw[kb * 4 + 1][w], 0x5140);
            const u32 y01 = prmt(blk.vw[kb * 4][w], blk.vw[kb * 4 + 1][w], 0x7362);
            const u32 x23 = prmt(blk.vw[kb * 4 + 2][w], blk.vw[kb * 4 + 3][w], 0x5140);
            const u32 y23 = prmt(blk.vw[kb * 4 + 2][w], blk.vw[kb * 4 + 3][w], 0x7362);
            u32 a0, a1, a2, a3;
            e4m3x4_to_f16x2(x01, a0, a1);
            e4m3x4_to_f16x2(x23, a2, a3);
            mma(acc[2 * w], a0, a1, a2, a3, pb0[kb], pb1[kb]);
            e4m3x4_to_f16x2(y01, a0, a1);
            e4m3x4_to_f16x2(y23, a2, a3);
            mma(acc[2 * w + 1], a0, a1, a2, a3, pb0[kb], pb1[kb]);
        }
    }
}


__device__ __forceinline__ u32 pack_out(float lo, float hi) {
    u32 r;
#if BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

/* Row b's queries of KV head kvh's group: A fragments of the score product, rows = the
   group's heads. Step j's 16-wide slice is, for this thread, dimensions ROWS*t + 4j .. +3. */
__device__ __forceinline__ void load_queries(
    const u16 *Q, i64 b, int kvh, int stride_qb, int stride_qh, int g, int t, u32 *qa, u32 *qb)
{
    float q[ROWS];
    if (g < GROUP) {
        const u16 *row = Q + b * stride_qb + (i64)(kvh * GROUP + g) * stride_qh + ROWS * t;
#pragma unroll
        for (int i = 0; i < ROWS; i++) q[i] = half_to_float(row[i]);
    } else {
#pragma unroll
        for (int i = 0; i < ROWS; i++) q[i] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < STEPS; j++) {
        qa[j] = pack_f16x2(q[4 * j], q[4 * j + 1]);
        qb[j] = pack_f16x2(q[4 * j + 2], q[4 * j + 3]);
    }
}

/* Keys start .. end - 1 of KV head kvh in `slot`: the online softmax into acc (O^T
   accumulators: tile i, row g = dimension COLS*g + 2i, row g+8 = +1; columns 2t, 2t+1 =
   query heads), m, l (this thread's share) and ref, which the caller starts at zero (m
   at -inf). */
__device__ __forceinline__ void attend_keys(
    const unsigned char *K, const unsigned char *V, const float *KS, const float *VS,
    i64 slot, int kvh, int stride_ks, int stride_kt, int stride_kh, int stride_vs,
    int stride_vt, int stride_vh, int stride_ss, int stride_st, i64 start, i64 end,
    float scale, const u32 *qa, const u32 *qb, float (*acc)[4], float &m, float &l,
    float &ref, int g, int t)
{
    const unsigned char *kbase = K + slot * stride_ks + (i64)kvh * stride_kh;
    const unsigned char *vbase = V + slot * stride_vs + (i64)kvh * stride_vh;
    const i64 sbase = slot * stride_ss + kvh;
    const int key0 = 4 * (g >> 1) + (g & 1);
    for (i64 base = start; base < end; base += KEYS) {
        Block cur;
        load_block(cur, base, end, kbase, vbase, KS, VS, sbase, stride_kt, stride_vt, stride_st,
                   key0, g, t);
        attend_block(cur, base, end, scale, qa, qb, acc, m, l, ref, t);
    }
}

/* Row b's normalised output for KV head kvh's group, in the model's dtype; l is the full
   sum (quad-reduced). */
__device__ __forceinline__ void write_output(
    u16 *Out, i64 b, int kvh, int stride_ob, int stride_oh, float (*acc)[4], float l, float ref,
    int g, int t)
{
    const float l0 = __shfl_sync(0xffffffff, l, 8 * t), l1 = __shfl_sync(0xffffffff, l, 8 * t + 4);
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int head = 2 * t + h;
        if (head < GROUP) {
            const float norm = ref / (h ? l1 : l0);
            u16 *out = Out + b * stride_ob + (i64)(kvh * GROUP + head) * stride_oh + COLS * g;
            u32 words[COLS / 2];
#pragma unroll
            for (int i = 0; i < TILES; i++) words[i] = pack_out(acc[i][h] * norm, acc[i][2 + h] * norm);
#pragma unroll
            for (int i = 0; i < COLS / 2; i += 4) {
                uint4 v; v.x = words[i]; v.y = words[i + 1]; v.z = words[i + 2]; v.w = words[i + 3];
                *reinterpret_cast<uint4 *>(out + 2 * i) = v;
            }
        }
    }
}

/* A partial for a merge: head h's row is row0 + h * step of Stats (max, sum) and Acc
   (the weighted values, times ref). */
__device__ __forceinline__ void write_partial(
    float *Acc, float *Stats, i64 row0, int step, float m, float l, float (*acc)[4],
    float ref, int g, int t)
{
    if (t == 0 && g < GROUP) {
        Stats[(row0 + g * step) * 2] = m;
        Stats[(row0 + g * step) * 2 + 1] = l;
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int head = 2 * t + h;
        if (head < GROUP) {
            float *out = Acc + (row0 + head * step) * D + COLS * g;
#pragma unroll
            for (int i = 0; i < TILES; i += 2) {
                float4 v;
                v.x = acc[i][h] * ref; v.y = acc[i][2 + h] * ref;
                v.z = acc[i + 1][h] * ref; v.w = acc[i + 1][2 + h] * ref;
                *reinterpret_cast<float4 *>(out + 2 * i) = v;
            }
        }
    }
}

#if NSPLIT == 0
__device__ __forceinline__ void fence_acq_rel() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

__device__ __forceinline__ int blocks_of(i64 length) { return (int)((length + KEYS - 1) / KEYS); }

/* The warp that holds block x of the step's blocks, warps p taking
   [p * total / warps, (p + 1) * total / warps). */
__device__ __forceinline__ int warp_of(i64 x, int total, int warps) {
    return (int)(((x + 1) * warps - 1) / total);
}

__device__ __forceinline__ i64 first_block(int p, int total, int warps) {
    return (i64)p * total / warps;
}

/* Decode attention, every KV head's keys shared evenly among its warps: the step's
   sequences laid end to end in blocks of KEYS keys, warp p of a head takes
   [p * total / warps, (p + 1) * total / warps). A sequence inside one warp's range is
   written out by it; one cut between warps leaves a partial (max, sum, weighted values)
   from each, and the last of them to finish (a ticket) merges them and writes it. */
extern "C" __global__ void __launch_bounds__(32, MIN_BLOCKS) fp8_decode(
    const u16 *Q, const unsigned char *K, const unsigned char *V,
    const float *KS, const float *VS, const SLOT_T *Slots, const LEN_T *Lens,
    const FIRST_T *First, int rows, int batch, int min_blocks,
    float *Acc, float *Stats, int *Tickets,
    int stride_qb, int stride_qh,
    int stride_ks, int stride_kt, int stride_kh,
    int stride_vs, int stride_vt, int stride_vh,
    int stride_ss, int stride_st, double scale_arg, u16 *Out, int stride_ob, int stride_oh)
{
    pdl_start();
    const int kvh = blockIdx.x, p = blockIdx.y, grid_warps = gridDim.y;
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    const unsigned FULL = 0xffffffffu;
    /* Batch row pb's index in q, slots, lengths and out, and its number of keys. */
#if BASED
#define ROW(pb) ((i64)First[0] + (pb))
#define ROW_LENGTH(pb) (ROW(pb) < rows ? (i64)Lens[ROW(pb)] + 1 : (i64)0)
#else
#define ROW(pb) ((i64)(pb))
#define ROW_LENGTH(pb) ((i64)Lens[pb])
#endif
    /* The segment loop's state, in shared memory (the block is this one warp): held in
       registers across the key loop it would push the accumulators to local memory. */
    __shared__ int state[7];
    volatile int *st = state;
    enum { POS, SEQ_START, PB, FIRST_SEGMENT, HI, TOTAL, WARPS };
    {
        /* Blocks per row, scanned 64 rows at a time (two a lane): the step's total, then
           the row holding block lo. One pass (one load of the lengths) up to 64 rows. */
        int total = 0;
        for (int base = 0; base < batch; base += 64) {
            const int r0 = base + lane, r1 = r0 + 32;
            total += __reduce_add_sync(FULL, (r0 < batch ? blocks_of(ROW_LENGTH(r0)) : 0) +
                                             (r1 < batch ? blocks_of(ROW_LENGTH(r1)) : 0));
        }
        /* at most as many warps as leave min_blocks to each (fewer keys: fewer warps,
           less merging) */
        const int warps = min(grid_warps, max(1, total / min_blocks));
        const i64 lo = first_block(p, total, warps), hi = first_block(p + 1, total, warps);
        if (p >= warps || lo >= hi) {
            /* No keys for this warp; it still waits, so this kernel ends after the one
               before it, whatever its warps have (a step of no keys: none). */
            pdl_wait();
            return;
        }
        int cum = 0;
        for (int base = 0; base < batch; base += 32) {
            const int row = base + lane;
            const int n = row < batch ? blocks_of(ROW_LENGTH(row)) : 0;
            int incl = n;
#pragma unroll
            for (int d = 1; d < 32; d <<= 1) {
                const int y = __shfl_up_sync(FULL, incl, d);
                if (lane >= d) incl += y;
            }
            const int chunk = __shfl_sync(FULL, incl, 31);
            if (cum + chunk > lo) {
                const int j = __ffs(__ballot_sync(FULL, cum + incl > lo)) - 1;
                const int seq_start = cum + __shfl_sync(FULL, incl - n, j);
                if (lane == 0) {
                    st[POS] = (int)lo; st[SEQ_START] = seq_start; st[PB] = base + j;
                    st[FIRST_SEGMENT] = 1; st[HI] = (int)hi; st[TOTAL] = total; st[WARPS] = warps;
                }
                break;
            }
            cum += chunk;
        }
        __syncwarp();
    }
    {
        /* Up to here only the step's lengths (and slots, first row), which the step's
           inputs hold; the first segment's keys go to L2 before the wait. */
        const int pb = st[PB];
        const i64 b = ROW(pb), length = ROW_LENGTH(pb);
        const i64 from = (i64)(st[POS] - st[SEQ_START]) * KEYS;
        if (from < length)
            prefetch_keys(K, V, KS, VS, Slots[b], kvh, stride_ks, stride_kt, stride_kh,
                          stride_vs, stride_vt, stride_vh, stride_ss, stride_st, from, length,
                          lane);
    }
    pdl_wait();
    const float scale = (float)scale_arg * 1.4426950408889634f;  /* scores in log2 units */
    while (st[POS] < st[HI]) {
        {
            const int pb = st[PB];
            const i64 length = ROW_LENGTH(pb);
            const int nb = blocks_of(length);
            if (nb == 0) {
                __syncwarp();
                if (lane == 0) st[PB] = pb + 1;
                __syncwarp();
                continue;
            }
        }
        float acc[TILES][4];
        float m = NEG_INF, l = 0.0f, ref = 0.0f;
        {
            const int pb = st[PB], seq_start = st[SEQ_START];
            const i64 b = ROW(pb), length = ROW_LENGTH(pb);
            const i64 seq_end = (i64)seq_start + blocks_of(length);
            const i64 start = (i64)(st[POS] - seq_start) * KEYS;
            const i64 end = min((min((i64)st[HI], seq_end) - seq_start) * KEYS, length);
            u32 qa[STEPS], qb[STEPS];
            load_queries(Q, b, kvh, stride_qb, stride_qh, g, t, qa, qb);
#pragma unroll
            for (int i = 0; i < TILES; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
            attend_keys(K, V, KS, VS, Slots[b], kvh, stride_ks, stride_kt, stride_kh, stride_vs,
                        stride_vt, stride_vh, stride_ss, stride_st, start, end, scale, qa, qb,
                        acc, m, l, ref, g, t);
        }
        l += __shfl_xor_sync(FULL, l, 1);
        l += __shfl_xor_sync(FULL, l, 2);
        /* the segment again, from shared memory */
        const int pb = st[PB], seq_start = st[SEQ_START], total = st[TOTAL], warps = st[WARPS];
        const i64 b = ROW(pb);
        const int nb = blocks_of(ROW_LENGTH(pb));
        const int seg_lo = st[POS] - seq_start;
        const int seg_hi = min(st[HI], seq_start + nb) - seq_start;
        if (seg_lo == 0 && seg_hi == nb) {
            write_output(Out, b, kvh, stride_ob, stride_oh, acc, l, ref, g, t);
        } else {
            /* a piece: partial (max in log2 units, sum, weighted values) at (this warp,
               0 for its first segment else 1), then a ticket on the sequence's first warp */
            const i64 piece = ((i64)kvh * grid_warps + p) * 2 + (st[FIRST_SEGMENT] ? 0 : 1);
            write_partial(Acc, Stats, piece * GROUP, 1, m, l, acc, ref, g, t);
            /* The ticket: __syncwarp orders the lanes' partials before lane 0's release
               (fence, atomic); lane 0's acquire (fence after it) and __syncwarp order the
               other pieces' partials before any lane's reads. */
            const int p0 = warp_of(seq_start, total, warps);
            const int p1 = warp_of(seq_start + nb - 1, total, warps);
            int *ticket = Tickets + (i64)kvh * grid_warps + p0;
            __syncwarp();
            int taken = 0;
            if (lane == 0) {
                fence_acq_rel();
                taken = atomicAdd(ticket, 1);
                fence_acq_rel();
            }
            taken = __shfl_sync(FULL, taken, 0);
            if (taken == p1 - p0) {
                /* the last piece: merge p0 .. p1 (p0's is its first segment only if the
                   sequence starts its range) */
                __syncwarp();
                const int which0 = seq_start == first_block(p0, total, warps) ? 0 : 1;
                for (int head = 0; head < GROUP; head++) {
                    float big = NEG_INF;
                    for (int w = p0; w <= p1; w++) {
                        const i64 at = ((i64)kvh * grid_warps + w) * 2 + (w == p0 ? which0 : 0);
                        big = fmaxf(big, __ldcg(Stats + (at * GROUP + head) * 2));
                    }
                    float sum = 0.0f, o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                    for (int w = p0; w <= p1; w++) {
                        const i64 at = ((i64)kvh * grid_warps + w) * 2 + (w == p0 ? which0 : 0);
                        const float f = exp2_approx(__ldcg(Stats + (at * GROUP + head) * 2) - big);
                        sum += f * __ldcg(Stats + (at * GROUP + head) * 2 + 1);
                        if (4 * lane < D) {
                            const float4 a = __ldcg(reinterpret_cast<const float4 *>(
                                Acc + (at * GROUP + head) * D + 4 * lane));
                            o[0] += f * a.x; o[1] += f * a.y; o[2] += f * a.z; o[3] += f * a.w;
                        }
                    }
                    if (4 * lane < D) {
                        const float inv = 1.0f / sum;
                        uint2 v;
                        v.x = pack_out(o[0] * inv, o[1] * inv);
                        v.y = pack_out(o[2] * inv, o[3] * inv);
                        *reinterpret_cast<uint2 *>(
                            Out + b * stride_ob + (i64)(kvh * GROUP + head) * stride_oh + 4 * lane) = v;
                    }
                }
                if (lane == 0) *ticket = 0;  /* ready for the next launch */
            }
        }
        __syncwarp();
        if (lane == 0) {
            st[POS] = seq_start + seg_hi; st[SEQ_START] = seq_start + nb; st[PB] = pb + 1;
            st[FIRST_SEGMENT] = 0;
        }
        __syncwarp();
    }
#undef ROW_LENGTH
#undef ROW
}
#else
/* One warp a (KV head, sequence, split): with NSPLIT == 1 it writes the output, with
   more, partials (max, sum, weighted values) for attention_triton's merge kernel. */
extern "C" __global__ void __launch_bounds__(32, MIN_BLOCKS) fp8_decode_split(
    const u16 *Q, const unsigned char *K, const unsigned char *V,
    const float *KS, const float *VS, const SLOT_T *Slots, const LEN_T *Lens,
    float *Acc, float *Stats, const FIRST_T *First, int rows,
    int stride_qb, int stride_qh,
    int stride_ks, int stride_kt, int stride_kh,
    int stride_vs, int stride_vt, int stride_vh,
    int stride_ss, int stride_st, double scale_arg, u16 *Out, int stride_ob, int stride_oh)
{
    pdl_start();
    const int kvh = blockIdx.x, pb = blockIdx.y, split = blockIdx.z;
    const int kv_heads = gridDim.x;
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
#if BASED
    i64 b = pb + First[0];
    const bool real = b < rows;
    if (!real) b = 0;
    const i64 length = real ? Lens[b] + 1 : 0;
#else
    const i64 b = pb;
    const i64 length = Lens[b];
#endif
    const i64 slot = Slots[b];
    const i64 span = ((length + NSPLIT - 1) / NSPLIT + KEYS - 1) / KEYS * KEYS;
    const i64 start = split * span;
    const i64 first_row = ((i64)pb * kv_heads * GROUP + (i64)kvh * GROUP) * NSPLIT + split;
    /* Before the wait, only the step's inputs (lengths, slots, first row) and older keys
       into L2. */
    prefetch_keys(K, V, KS, VS, slot, kvh, stride_ks, stride_kt, stride_kh, stride_vs, stride_vt,
                  stride_vh, stride_ss, stride_st, start, min(start + span, length), lane);
    pdl_wait();
    if (start >= length) {
        if (NSPLIT > 1 && t == 0 && g < GROUP) {
            Stats[(first_row + g * NSPLIT) * 2] = NEG_INF;
            Stats[(first_row + g * NSPLIT) * 2 + 1] = 0.0f;
        }
        return;
    }
    const i64 end = min(start + span, length);
    const float scale = (float)scale_arg * 1.4426950408889634f;  /* scores in log2 units */

    u32 qa[STEPS], qb[STEPS];
    load_queries(Q, b, kvh, stride_qb, stride_qh, g, t, qa, qb);
    float acc[TILES][4];
#pragma unroll
    for (int i = 0; i < TILES; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    float m = NEG_INF, l = 0.0f, ref = 0.0f;
    attend_keys(K, V, KS, VS, slot, kvh, stride_ks, stride_kt, stride_kh, stride_vs, stride_vt,
                stride_vh, stride_ss, stride_st, start, end, scale, qa, qb, acc, m, l, ref, g, t);
    l += __shfl_xor_sync(0xffffffff, l, 1);
    l += __shfl_xor_sync(0xffffffff, l, 2);
#if NSPLIT == 1
    /* One split: the normalised output (no merge kernel). */
    write_output(Out, b, kvh, stride_ob, stride_oh, acc, l, ref, g, t);
#else
    /* the max as a natural log, as attention_triton's merge kernel takes it */
    write_partial(Acc, Stats, first_row, NSPLIT, m * 0.6931471805599453f, l, acc, ref, g, t);
#endif
}
#endif
