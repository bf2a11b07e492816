// y = x @ W.T with W in the lut3 format (harness/fused/lut3.py), decoded in registers and fed to tensor cores.
// Compiled at run time by NVRTC (harness/fused/lut3_cuda.py); no headers, so it builds wherever torch has NVRTC.
// (Past 300 lines: one kernel family (the GEMV, its exactness reference, its diagnostic twin, the decode) shares
// the decode device functions, and NVRTC compiles one source with no headers.)
//
// Grid: one block per 16-row tile; S = blockDim.x / 32 warps split the tile's K iterations (split-K inside the
// block, reduced through shared memory in warp order: deterministic). Per iteration (64 k) a lane loads 32
// sign+mantissa bytes (2 x 16 B) and 3 code words, decodes its 32 weights exactly into 16 bf16x2 A-fragment
// registers with byte permutes, and issues 4 mma.m16n8k16 (bf16 x bf16 -> fp32). Tokens are the n dimension (up
// to 8). The wide builds (lut3_gemv_m16/m24/m32, a short prompt's prefill) issue the 4 mma once per group of 8
// tokens on the same decoded fragments, so the weights are read and decoded once for up to 32 tokens.
//
// Escapes (code 7: an exponent outside the tensor's table of 7) are decoded in the same pass, with no branch and no
// extra arithmetic on x: a warp prefix count gives each lane the position of its first escape in the list, the lane
// loads an 8-byte window there, and per 4 weights one PRMT whose selector nibbles are each escape's rank (7, the
// window's zero byte, for the others) yields the escape exponents (rotated, as the table stores them), OR-ed into
// the table's byte (0 for code 7). A lane with more escapes in one iteration than the window holds (WINDOW) takes
// them byte by byte (rare: ~4e-7 of lanes on normal weights). So every weight reaches the tensor cores as the
// original bf16 value.
//
// Two ways to fetch the window (template CHUNK). Per lane (lut3_gemv, lut3_gemv72): three loads at the lane's own
// position, which is known only after the warp's prefix count, so the decode waits on a dependent load every
// iteration. Per warp (lut3_gemvc, lut3_gemvc72): the warp's escapes of an iteration start at a position known one
// iteration early (the previous one's offset plus its count), so each lane loads one word of the 128 bytes from
// there while the previous iteration decodes, and later takes its window's three words from the lanes holding them
// by shuffles. A lane whose window ends past those 128 bytes (more than ~120 escapes in the warp's 1024 weights:
// escape-dense tensors) loads it itself. Both give the same bytes, so the same results bit for bit.
//
// The exactness reference (lut3_ref_m*) is the same code fed the uncompressed weights: the A fragments loaded from
// W itself in the same register order, the same mma order, the same split-K. Compressed == reference bit for bit
// iff the in-register decode is exact; any difference from cuBLAS is the arithmetic of this kernel.
//
// Weight pointers arrive as two 32-bit halves: the launcher (torch's) passes Python ints as C ints, and passing
// addresses rather than tensors keeps the weights out of a compiled graph's inputs (lut3_cuda.py says why).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;

#define WINDOW 7                    // escapes per lane and iteration taken from the window (byte 7 is zero)
#define ESC_PAD 16                  // bytes after the escape list (lut3.ESC_PAD)
#define CHUNK_WORDS 32              // words of the escape list a warp loads per iteration: one per lane
#define L2_AHEAD 4                  // lut3_gemvcp*: iterations between a pair's L2 prefetch and its loads
#define SMEM_PER_WARP (16 * 8 * 4)  // split-K partial sums: 16 rows x 8 tokens of fp32 per warp (wide: x MT / 8)

struct Lut {  // the table of rotated exponents [e0 e7..e1] (lut3.py: rot), code c = byte c of t0:t1
  u32 t0, t1;
};

template <typename T>
__device__ __forceinline__ const T* ptr_of(u32 lo, u32 hi) {
  return reinterpret_cast<const T*>(((u64)hi << 32) | (u64)lo);
}

__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u16 f32_to_bf16(float f) {
  u16 r;
  asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(r) : "f"(f));
  return r;
}

// Escape flags of a lane's 32 weights: group g = j / 8, nibble i of n[g] is 1 where j = 8g + i has code 7.
struct Flags {
  u32 n[4];
  int count;
};

__device__ __forceinline__ Flags flags_of(u32 w0, u32 w1, u32 w2) {
  Flags f;
  const u32 t3 = w0 & w1 & w2;  // bit 4n+3: the three bits of the code of j = 24 + n
  f.n[0] = w0 & (w0 >> 1) & (w0 >> 2) & 0x11111111u;
  f.n[1] = w1 & (w1 >> 1) & (w1 >> 2) & 0x11111111u;
  f.n[2] = w2 & (w2 >> 1) & (w2 >> 2) & 0x11111111u;
  f.n[3] = (t3 >> 3) & 0x11111111u;
  f.count = __popc(f.n[0] | (f.n[1] << 1) | (f.n[2] << 2) | (f.n[3] << 3));
  return f;
}

// The 8 bytes of the escape list from `pos` (byte 7 forced to 0): three aligned words, two funnel shifts.
// esc_exp is 4-byte aligned and padded (lut3.ESC_PAD), so the reads stay inside it.
__device__ __forceinline__ void window_of(const u8* __restrict__ esc_exp, int pos, u32& lo, u32& hi) {
  const u32* ew = reinterpret_cast<const u32*>(esc_exp) + (pos >> 2);
  const u32 x0 = __ldg(ew), x1 = __ldg(ew + 1), x2 = __ldg(ew + 2);
  const u32 sh = (u32)(pos & 3) * 8u;
  lo = __funnelshift_r(x0, x1, sh);
  hi = __funnelshift_r(x1, x2, sh) & 0x00FFFFFFu;
}

// The word of the escape list that lane `lane` holds for the warp's iteration whose escapes start at byte `cb`: word
// (cb / 4) + lane, or 0 past the list's padded end (`words`), so that no read leaves the allocation.
__device__ __forceinline__ u32 chunk_word(const u8* __restrict__ esc_exp, int cb, int lane, int words) {
  const int w = (cb >> 2) + lane;
  return w < words ? __ldg(reinterpret_cast<const u32*>(esc_exp) + w) : 0u;
}

// window_of's 8 bytes from `pos`, taken by shuffles from the lanes holding the warp's chunk (loaded from byte `cb`;
// pos >= cb): word wi of the chunk is lane wi's. A window ending past the chunk (wi > 29) is loaded by the lane.
__device__ __forceinline__ void window_from_chunk(u32 chunk, int cb, int pos, const u8* __restrict__ esc_exp,
                                                  u32& lo, u32& hi) {
  const int wi = (pos >> 2) - (cb >> 2);
  const u32 x0 = __shfl_sync(0xffffffffu, chunk, wi), x1 = __shfl_sync(0xffffffffu, chunk, wi + 1),
            x2 = __shfl_sync(0xffffffffu, chunk, wi + 2);  // source lanes past 31 wrap: those values go unused
  if (wi <= CHUNK_WORDS - 3) {
    const u32 sh = (u32)(pos & 3) * 8u;
    lo = __funnelshift_r(x0, x1, sh);
    hi = __funnelshift_r(x1, x2, sh) & 0x00FFFFFFu;
  } else {
    window_of(esc_exp, pos, lo, hi);
  }
}

// Programmatic dependent launch (sm_90+; lut3_cuda.py launches with it when cache.pdl is on). The GEMV's weights,
// tables and escape offsets never change, so a launch may start, and load its first weights, while the kernel
// before it is still running: only x (that kernel's output) and the writes must wait for it, and `pdl_wait` sits
// before the first. `pdl_release` lets the next such launch be scheduled as soon as every block of this one runs.
// Without the launch attribute both return at once: the same code serves either launch.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// 32 weights of one lane and iteration -> 16 bf16x2 registers (A fragments of 4 k-steps), escapes included.
// RARE: the lane has more than WINDOW escapes; their exponents come from the list byte by byte.
template <bool RARE>
__device__ __forceinline__ void decode32(const uint4 s0, const uint4 s1, u32 w0, u32 w1, u32 w2, const Lut lut,
                                        const Flags& f, u32 wlo, u32 whi, const u8* __restrict__ esc_exp, int pos,
                                        u32* A) {
  const u32 sm[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
  const u32 S0 = w0 & 0x77777777u, S1 = w1 & 0x77777777u, S2 = w2 & 0x77777777u;
  const u32 S3 = ((w0 >> 3) & 0x11111111u) | ((w1 >> 2) & 0x22222222u) | ((w2 >> 1) & 0x44444444u);
  const u32 sel[8] = {S0, S0 >> 16, S1, S1 >> 16, S2, S2 >> 16, S3, S3 >> 16};
  u32 base = 0;  // escapes of this lane in the groups before g
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    const u32 nf = f.n[g];
    u32 E[2];
    if (!RARE) {
      // nibble i: the rank of j = 8g + i among the lane's escapes (no carries: every nibble stays <= 14)
      const u32 r = nf * 0x11111110u + base * 0x11111111u;
      const u32 es = 0x77777777u ^ ((r ^ 0x77777777u) & (nf * 7u));  // escapes: their rank; others: 7 (zero)
      E[0] = __byte_perm(wlo, whi, es);
      E[1] = __byte_perm(wlo, whi, es >> 16);
    } else {
      int rank = (int)base;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        E[h] = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if ((nf >> (4 * (4 * h + i))) & 1u) E[h] |= (u32)esc_exp[pos + rank++] << (8 * i);
        }
      }
    }
    base += __popc(nf);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int q = 2 * g + h;
      const u32 tb = __byte_perm(lut.t0, lut.t1, sel[q]) | E[h];  // rot(exponent): table's, or the escape's
      const u32 hi = (tb & 0x7F7F7F7Fu) | (sm[q] & 0x80808080u);  // [sign e7..e1]
      const u32 lo = (tb & 0x80808080u) | (sm[q] & 0x7F7F7F7Fu);  // [e0 m6..m0]
      A[2 * q] = __byte_perm(lo, hi, 0x5140);      // bf16x2: (j+1 | j)
      A[2 * q + 1] = __byte_perm(lo, hi, 0x7362);  // (j+3 | j+2)
    }
  }
}

// One iteration's operands: the fused fields or the reference's (the unused ones compile away).
struct Buf {
  uint4 s0, s1;    // fused: 32 sign+mantissa bytes
  u32 w0, w1, w2;  // fused: code words
  u32 wlo, whi;    // fused: the escape window
  int pos;         // fused: this lane's first escape in the list
  u32 chunk;       // fused, CHUNK: this lane's word of the warp's escapes, loaded from byte cb of the list
  int cb;
  uint4 r[4];      // reference: the 32 bf16 weights themselves
};

template <bool FUSED>
__device__ __forceinline__ void fetch(Buf& b, size_t li, long long lanes_total, const uint4* __restrict__ sm,
                                      const u32* __restrict__ codes, const uint4* __restrict__ raw) {
  if (FUSED) {
    b.s0 = __ldg(sm + 2 * li);
    b.s1 = __ldg(sm + 2 * li + 1);
    b.w0 = __ldg(codes + li);
    b.w1 = __ldg(codes + lanes_total + li);
    b.w2 = __ldg(codes + 2 * lanes_total + li);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) b.r[i] = __ldg(raw + 4 * li + i);
  }
}

// The warp's exclusive prefix sum of the lanes' escape counts (0-32), and its total, from bit planes: one vote per
// bit of the count, a lane's sum the popcounts of the lower lanes' votes times the bit. The votes are independent,
// where a shuffle scan is a chain of 5 dependent steps. Three planes cover counts up to WINDOW (7); bits 3-5 are
// voted only when some lane has more (a warp-uniform branch, rare: the RARE decode's lanes).
__device__ __forceinline__ void prefix_ballot(int cnt, int lane, int& excl, int& total) {
  const u32 lt = (1u << lane) - 1u;
  excl = total = 0;
#pragma unroll
  for (int bit = 0; bit < 3; ++bit) {
    const u32 v = __ballot_sync(0xffffffffu, (cnt >> bit) & 1);
    excl += __popc(v & lt) << bit;
    total += __popc(v) << bit;
  }
  if (__any_sync(0xffffffffu, cnt > WINDOW)) {
#pragma unroll
    for (int bit = 3; bit < 6; ++bit) {
      const u32 v = __ballot_sync(0xffffffffu, (cnt >> bit) & 1);
      excl += __popc(v & lt) << bit;
      total += __popc(v) << bit;
    }
  }
}

// The lane's first escape: the iteration's offset (carried in esc_pos) plus a warp prefix count over lanes (a
// shuffle scan, or BALLOT: prefix_ballot; the same positions); then the window. CHUNK: `nxt` (the next iteration,
// if `more`) gets its chunk loaded from the offset that follows, and the window comes from `b`'s chunk, loaded one
// iteration before. DIAG (bench only): escapes left undecoded, the time they cost by difference.
template <int DIAG, bool CHUNK = false, bool BALLOT = false>
__device__ __forceinline__ void locate(Buf& b, int lane, int& esc_pos, const u8* __restrict__ esc_exp,
                                       Buf& nxt, bool more, int words) {
  if (DIAG == 1) {
    b.wlo = b.whi = 0;
    b.pos = 0;
    return;
  }
  const int cnt = flags_of(b.w0, b.w1, b.w2).count;
  int excl, total;
  if (BALLOT) {
    prefix_ballot(cnt, lane, excl, total);
  } else {
    int incl = cnt;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += v;
    }
    excl = incl - cnt;
    total = __shfl_sync(0xffffffffu, incl, 31);
  }
  b.pos = esc_pos + excl;
  esc_pos += total;
  if (CHUNK) {
    if (more) {
      nxt.cb = esc_pos;
      nxt.chunk = chunk_word(esc_exp, esc_pos, lane, words);
    }
    window_from_chunk(b.chunk, b.cb, b.pos, esc_exp, b.wlo, b.whi);
  } else {
    window_of(esc_exp, b.pos, b.wlo, b.whi);
  }
}

template <bool FUSED, int DIAG>
__device__ __forceinline__ void operands(const Buf& b, const Lut lut, const u8* __restrict__ esc_exp, u32* A) {
  if (FUSED) {
    Flags f = flags_of(b.w0, b.w1, b.w2);
    if (DIAG == 1) {
#pragma unroll
      for (int g = 0; g < 4; ++g) f.n[g] = 0;
      f.count = 0;
    }
    if (f.count > WINDOW) {
      decode32<true>(b.s0, b.s1, b.w0, b.w1, b.w2, lut, f, b.wlo, b.whi, esc_exp, b.pos, A);
    } else {
      decode32<false>(b.s0, b.s1, b.w0, b.w1, b.w2, lut, f, b.wlo, b.whi, esc_exp, b.pos, A);
    }
  } else {
    const u32 v[16] = {b.r[0].x, b.r[0].y, b.r[0].z, b.r[0].w, b.r[1].x, b.r[1].y, b.r[1].z, b.r[1].w,
                       b.r[2].x, b.r[2].y, b.r[2].z, b.r[2].w, b.r[3].x, b.r[3].y, b.r[3].z, b.r[3].w};
#pragma unroll
    for (int i = 0; i < 16; ++i) A[i] = v[i];
  }
}

// PF > 0: the loads of the pair of iterations PF ahead (it + PF, it + PF + 1) requested into L2 now, one
// `prefetch.global.L2` per lane and cache line: lanes 0-15 the 16 lines of the pair's sign+mantissa bytes, lanes
// 16-27 the lines holding the first and last word of each iteration's three code words. The registers hold one
// iteration ahead (all a warp can afford); this keeps more bytes in flight without registers. Only lines of
// iterations this warp will read are requested.
template <int PF>
__device__ __forceinline__ void prefetch_l2(int lane, int it, int it1, int tile, int I, long long lanes_total,
                                            const uint4* __restrict__ sm, const u32* __restrict__ codes) {
  if (PF == 0 || lane >= 28) return;
  const int first = it + PF;
  const void* p;
  int iter;
  if (lane < 16) {
    iter = first + (lane >> 3);
    p = reinterpret_cast<const u8*>(sm + ((size_t)tile * I + iter) * 64) + (lane & 7) * 128;
  } else {
    const int c = (lane - 16) >> 2, q = (lane - 16) & 3;
    iter = first + (q >> 1);
    p = codes + c * lanes_total + ((size_t)tile * I + iter) * 32 + (q & 1) * 31;
  }
  if (iter < it1) asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

// 4 mma of one iteration; c and c2: two accumulator chains (even, odd k-steps), so mma latencies overlap.
__device__ __forceinline__ void mma_iter(const u32* A, const u32* __restrict__ xrow, int it, int t, bool has_tok,
                                         float* c, float* c2) {
  const u32* xp = xrow + ((it * 64 + 2 * t) >> 1);
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const u32 v0 = __ldg(xp + 8 * s), v1 = __ldg(xp + 8 * s + 4);
    mma16816((s & 1) ? c2 : c, A + 4 * s, has_tok ? v0 : 0u, has_tok ? v1 : 0u);
  }
}

// The wide builds' mma: per k-step, one mma per group j of 8 tokens (token 8j + g's x) on the same A fragments;
// one accumulator chain per group (the groups' mma are independent, so their latencies overlap).
template <int NT>
__device__ __forceinline__ void mma_wide(const u32* A, const u32* __restrict__ x, int M, int K, int it, int g, int t,
                                         float (*c)[4]) {
#pragma unroll
  for (int s = 0; s < 4; ++s) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int tok = 8 * j + g;
      const u32* xp = x + (((size_t)(tok < M ? tok : 0) * K + it * 64 + 2 * t) >> 1) + 8 * s;
      const u32 v0 = __ldg(xp), v1 = __ldg(xp + 4);
      mma16816(c[j], A + 4 * s, tok < M ? v0 : 0u, tok < M ? v1 : 0u);
    }
  }
}

template <int MT, bool FUSED, int DIAG = 0, bool CHUNK = false, int PF = 0, bool BALLOT = false>
__device__ __forceinline__ void gemv(const u16* __restrict__ x, int M, int K, const uint4* __restrict__ sm,
                                     const u32* __restrict__ codes, const u8* __restrict__ esc_exp,
                                     const int* __restrict__ esc_off, const uint4* __restrict__ raw, Lut lut,
                                     u16* __restrict__ y, int N, int I, u64* counter) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, S = blockDim.x >> 5;
  const int tile = blockIdx.x;
  const int g = lane >> 2, t = lane & 3;
  const int it0 = (I * warp) / S, it1 = (I * (warp + 1)) / S;
  const long long lanes_total = (long long)gridDim.x * I * 32;
  extern __shared__ float red[];  // [S][16 rows][8 tokens]
  // token g's row of x (row 0 when g >= M: loaded, then zeroed in the mma operand)
  const u32* xrow = reinterpret_cast<const u32*>(x + (size_t)(g < M ? g : 0) * K);
  const bool has_tok = g < M;
  float c[4] = {0.f, 0.f, 0.f, 0.f}, c2[4] = {0.f, 0.f, 0.f, 0.f};
  constexpr int NT = MT > 8 ? MT / 8 : 1;  // groups of 8 tokens (the wide builds: MT = 16, 24, 32)
  float cw[NT][4] = {};                    // the wide builds' accumulators (unused, and compiled away, at NT = 1)
  int esc_pos = (FUSED && it0 < it1) ? esc_off[tile * I + it0] : 0;
  // CHUNK: the readable words of the escape list (esc_off's last entry is the escape count)
  const int words = (CHUNK && it0 < it1) ? (esc_off[(size_t)gridDim.x * I] + ESC_PAD) >> 2 : 0;

  // Unrolled by two with named buffers: the next iteration's loads are in flight during this one's decode, with
  // no register copies between iterations; an iteration's escape window is located just before its decode.
  Buf a, b;
  const size_t l0 = ((size_t)tile * I + it0) * 32 + lane;
  pdl_release();
  if (it0 < it1) {
    fetch<FUSED>(a, l0, lanes_total, sm, codes, raw);
    if (CHUNK) {
      a.cb = esc_pos;
      a.chunk = chunk_word(esc_exp, esc_pos, lane, words);
    }
  }
  pdl_wait();  // everything above reads the weights alone; x, y and the counter come after the kernel before
  for (int it = it0; it < it1; it += 2) {
    const size_t la = l0 + (size_t)(it - it0) * 32;
    if (FUSED) prefetch_l2<PF>(lane, it, it1, tile, I, lanes_total, sm, codes);
    if (it + 1 < it1) fetch<FUSED>(b, la + 32, lanes_total, sm, codes, raw);
    u32 A[16];
    if (FUSED) locate<DIAG, CHUNK, BALLOT>(a, lane, esc_pos, esc_exp, b, it + 1 < it1, words);
    operands<FUSED, DIAG>(a, lut, esc_exp, A);
    if constexpr (NT == 1) {
      mma_iter(A, xrow, it, t, has_tok, c, c2);
    } else {
      mma_wide<NT>(A, reinterpret_cast<const u32*>(x), M, K, it, g, t, cw);
    }
    if (it + 1 < it1) {
      if (it + 2 < it1) fetch<FUSED>(a, la + 64, lanes_total, sm, codes, raw);
      if (FUSED) locate<DIAG, CHUNK, BALLOT>(b, lane, esc_pos, esc_exp, a, it + 2 < it1, words);
      operands<FUSED, DIAG>(b, lut, esc_exp, A);
      if constexpr (NT == 1) {
        mma_iter(A, xrow, it + 1, t, has_tok, c, c2);
      } else {
        mma_wide<NT>(A, reinterpret_cast<const u32*>(x), M, K, it + 1, g, t, cw);
      }
    }
  }
  const int row0 = tile * 16;
  if constexpr (NT > 1) {
    // cw[j][e]: row g + 8 (e / 2), token 8j + 2t + e % 2; partial sums [S][16 rows][MT tokens]
    if (S == 1) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = g + 8 * (e >> 1), col = 8 * j + 2 * t + (e & 1);
          if (col < M && row0 + r < N) y[(size_t)col * N + row0 + r] = f32_to_bf16(cw[j][e]);
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) red[(warp * 16 + g + 8 * (e >> 1)) * MT + 8 * j + 2 * t + (e & 1)] = cw[j][e];
      }
      __syncthreads();
      if (warp == 0) {
        for (int idx = lane; idx < 16 * MT; idx += 32) {
          const int r = idx / MT, col = idx % MT;
          float acc = red[r * MT + col];
          for (int w = 1; w < S; ++w) acc += red[(w * 16 + r) * MT + col];  // warp order: deterministic
          if (col < M && row0 + r < N) y[(size_t)col * N + row0 + r] = f32_to_bf16(acc);
        }
      }
    }
    if (counter != nullptr && blockIdx.x == 0 && threadIdx.x == 0) atomicAdd(counter, 1ull);
    return;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) c[e] += c2[e];
  // c[0]: (row g, token 2t), c[1]: (g, 2t+1), c[2]: (g+8, 2t), c[3]: (g+8, 2t+1)
  if (S == 1) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = g + 8 * (e >> 1), col = 2 * t + (e & 1);
      if (col < M && row0 + r < N) y[(size_t)col * N + row0 + r] = f32_to_bf16(c[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) red[(warp * 16 + g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)] = c[e];
    __syncthreads();
    if (warp == 0) {
      for (int idx = lane; idx < 16 * MT; idx += 32) {
        const int r = idx / MT, col = idx % MT;
        float acc = red[r * 8 + col];
        for (int w = 1; w < S; ++w) acc += red[(w * 16 + r) * 8 + col];  // warp order: deterministic
        if (col < M && row0 + r < N) y[(size_t)col * N + row0 + r] = f32_to_bf16(acc);
      }
    }
  }
  if (counter != nullptr && blockIdx.x == 0 && threadIdx.x == 0) atomicAdd(counter, 1ull);
}

// The fused kernel: per-lane windows with the shuffle scan (gemv) or the vote count (BALLOT: gemvb), per-warp
// windows (CHUNK: gemvc), the latter also with an L2 prefetch L2_AHEAD iterations ahead (gemvcp); each twice: as the
// compiler allocates it (64 registers and a 16-byte spill at 1-2 tokens, 77 at 4-8) and held to 72 registers (no
// spills, more warps per SM).
#define LUT3_FUSED(NAME, BOUNDS, MT, CHUNK, PF, BALLOT)                                                                \
  extern "C" __global__ void BOUNDS NAME##_m##MT(                                                                      \
      const u16* x, int M, int K, u32 sm_lo, u32 sm_hi, u32 codes_lo, u32 codes_hi, u32 esc_lo, u32 esc_hi,            \
      u32 off_lo, u32 off_hi, int t0, int t1, u16* y, int N, int I, u64* counter) {                                    \
    gemv<MT, true, 0, CHUNK, PF, BALLOT>(x, M, K, ptr_of<uint4>(sm_lo, sm_hi), ptr_of<u32>(codes_lo, codes_hi),        \
                   ptr_of<u8>(esc_lo, esc_hi), ptr_of<int>(off_lo, off_hi), nullptr,                                   \
                   Lut{(u32)t0, (u32)t1}, y, N, I, counter);                                                           \
  }

#define LUT3_REF(MT)                                                                                                   \
  extern "C" __global__ void __launch_bounds__(512) lut3_ref_m##MT(                                                    \
      const u16* x, int M, int K, u32 raw_lo, u32 raw_hi, u16* y, int N, int I, u64* counter) {                        \
    gemv<MT, false>(x, M, K, nullptr, nullptr, nullptr, nullptr, ptr_of<uint4>(raw_lo, raw_hi),                        \
                    Lut{0, 0}, y, N, I, counter);                                                                      \
  }

#define LUT3_GEMV(MT)                                                                                                  \
  LUT3_FUSED(lut3_gemv, __launch_bounds__(512), MT, false, 0, false)                                                   \
  LUT3_FUSED(lut3_gemv72, __maxnreg__(72), MT, false, 0, false)                                                        \
  LUT3_FUSED(lut3_gemvb, __launch_bounds__(512), MT, false, 0, true)                                                   \
  LUT3_FUSED(lut3_gemvb72, __maxnreg__(72), MT, false, 0, true)                                                        \
  LUT3_FUSED(lut3_gemvc, __launch_bounds__(512), MT, true, 0, false)                                                   \
  LUT3_FUSED(lut3_gemvc72, __maxnreg__(72), MT, true, 0, false)                                                        \
  LUT3_FUSED(lut3_gemvcp, __launch_bounds__(512), MT, true, L2_AHEAD, false)                                           \
  LUT3_FUSED(lut3_gemvcp72, __maxnreg__(72), MT, true, L2_AHEAD, false)                                                \
  LUT3_REF(MT)

// The wide builds (9-32 tokens: a short prompt's prefill in one launch): the lane and ballot families, and the
// reference.
#define LUT3_WIDE(MT)                                                                                                  \
  LUT3_FUSED(lut3_gemv, __launch_bounds__(512), MT, false, 0, false)                                                   \
  LUT3_FUSED(lut3_gemvb, __launch_bounds__(512), MT, false, 0, true)                                                   \
  LUT3_REF(MT)

LUT3_GEMV(1)
LUT3_GEMV(2)
LUT3_GEMV(4)
LUT3_GEMV(8)
LUT3_WIDE(16)
LUT3_WIDE(24)
LUT3_WIDE(32)

// bench/lut3_kernel.py only: the one-token kernel with the escapes left undecoded (wrong results on purpose).
extern "C" __global__ void __launch_bounds__(512) lut3_diag1_m1(
    const u16* x, int M, int K, u32 sm_lo, u32 sm_hi, u32 codes_lo, u32 codes_hi, u32 esc_lo, u32 esc_hi,
    u32 off_lo, u32 off_hi, int t0, int t1, u16* y, int N, int I, u64* counter) {
  gemv<1, true, 1>(x, M, K, ptr_of<uint4>(sm_lo, sm_hi), ptr_of<u32>(codes_lo, codes_hi),
                   ptr_of<u8>(esc_lo, esc_hi), ptr_of<int>(off_lo, off_hi), nullptr,
                   Lut{(u32)t0, (u32)t1}, y, N, I, counter);
}

// One iteration of one lane, decoded exactly into its 16 A-fragment registers, as the main loop decodes it.
__device__ __forceinline__ void decode_iteration(size_t li, int lane, long long lanes_total, const uint4* sm,
                                                 const u32* codes, const u8* esc_exp, const Lut lut, int& esc_pos,
                                                 u32* A) {
  Buf b;
  fetch<true>(b, li, lanes_total, sm, codes, nullptr);
  locate<0>(b, lane, esc_pos, esc_exp, b, false, 0);
  operands<true, 0>(b, lut, esc_exp, A);
}

// The main loop's decode written out as the dense row-major weight [N, K]: the GPU path of the codec's decode (a
// prefill with more tokens than the GEMV takes multiplies it with cuBLAS) and the proof, on the GPU, that the
// in-register decode is the inverse of encode (lut3_cuda.decode_gpu; the tests compare it with W). Laid out for
// bandwidth: each warp takes C consecutive iterations of one tile (the escape offsets are per iteration, so any
// warp can start anywhere), which gives a launch of tiles x I / C warps, and its 16 x 64 bf16 tile goes through
// shared memory (rows padded to 36 words: conflict-free both ways) so that the writes are whole 128-byte rows, 16
// bytes a lane. A lane's register A[2q] holds row g, A[2q + 1] row g + 8, at columns 16 (q / 2) + 8 (q % 2) + 2t.
// (One warp per tile writing 4-byte words ran at 140-1470 GB/s on the H200; this runs at 2000-3800 GB/s.)
#define DECODE_ROW_WORDS 36
extern "C" __global__ void lut3_decode(u32 sm_lo, u32 sm_hi, u32 codes_lo, u32 codes_hi, u32 esc_lo, u32 esc_hi,
                                       u32 off_lo, u32 off_hi, int t0, int t1, u32* out, int N, int K, int T, int I,
                                       int C) {
  extern __shared__ u32 stage[];  // [warps per block][16 rows][DECODE_ROW_WORDS]
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, wib = threadIdx.x >> 5;
  const int chunks = (I + C - 1) / C;
  const long long w = (long long)blockIdx.x * (blockDim.x >> 5) + wib;
  if (w >= (long long)T * chunks) return;  // warp-uniform
  const int tile = (int)(w / chunks), it0 = (int)(w % chunks) * C, it1 = min(I, it0 + C);
  u32* st = stage + wib * (16 * DECODE_ROW_WORDS);
  const uint4* sm = ptr_of<uint4>(sm_lo, sm_hi);
  const u32* codes = ptr_of<u32>(codes_lo, codes_hi);
  const u8* esc_exp = ptr_of<u8>(esc_lo, esc_hi);
  const long long lanes_total = (long long)T * I * 32;
  const Lut lut{(u32)t0, (u32)t1};
  int esc_pos = ptr_of<int>(off_lo, off_hi)[tile * I + it0];
  for (int it = it0; it < it1; ++it) {
    u32 A[16];
    decode_iteration(((size_t)tile * I + it) * 32 + lane, lane, lanes_total, sm, codes, esc_exp, lut, esc_pos, A);
#pragma unroll
    for (int q = 0; q < 8; ++q) {  // word (row, col / 2) of the tile; rows g and g + 8
      const int word = 8 * (q >> 1) + 4 * (q & 1) + t;
      st[g * DECODE_ROW_WORDS + word] = A[2 * q];
      st[(g + 8) * DECODE_ROW_WORDS + word] = A[2 * q + 1];
    }
    __syncwarp();
#pragma unroll
    for (int s = 0; s < 4; ++s) {  // 4 rows per store: 8 lanes x 16 bytes each
      const int r = 4 * s + (lane >> 3), row = tile * 16 + r;
      const uint4 v = *reinterpret_cast<const uint4*>(st + r * DECODE_ROW_WORDS + 4 * (lane & 7));
      if (row < N) *reinterpret_cast<uint4*>(out + (((size_t)row * K + (size_t)it * 64) >> 1) + 4 * (lane & 7)) = v;
    }
    __syncwarp();
  }
}
