// y = x @ W.T with W in the lut3 format (harness/fused/lut3.py), decoded in registers and fed to tensor cores.
// Compiled at run time by NVRTC (harness/fused/lut3_cuda.py); no headers, so it builds wherever torch has NVRTC.
//
// Grid: one block per 16-row tile; S = blockDim.x / 32 warps split the tile's K iterations (split-K inside the
// block, reduced through shared memory in warp order: deterministic). Per iteration (64 k) a lane loads 32
// sign+mantissa bytes (2 x 16 B) and 3 code words, decodes 32 weights into 16 bf16x2 A-fragment registers with
// byte permutes (2 table lookups + 2 logic ops + 2 pair assemblies per 4 weights), and issues 4 mma.m16n8k16
// (bf16 x bf16 -> fp32). Tokens are the n dimension (up to 8). Escapes (code 7) go through the mma as the
// subnormal (sign, 0, mantissa); each lane then adds x * w for its escapes in fp32, found from its code bits, their
// exponents read in order from the escape list at an offset from a warp prefix sum.
//
// FUSED=false is the exactness reference: the same code fed the uncompressed weights (the main-pass weights, the
// escape mask and the true values, all computed from W by torch), so compressed == reference bit for bit iff the
// in-register decode is exact; any difference from cuBLAS is the arithmetic of this kernel, not the compression.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;

// Escape descriptors per row per pair of iterations (128 weights of a row): ~2.7 expected on normal weights;
// a pair with more in any row takes the fallback path. Shared memory per warp: 16 rows x BUCKET x 4 bytes, plus
// 16 x 8 floats for the block's split-K reduction (the launcher passes SMEM_PER_WARP x warps).
#define BUCKET 32
#define SMEM_PER_WARP (16 * BUCKET * 4 + 16 * 8 * 4)

struct Lut {
  u32 hi0, hi1, lo0, lo1;
};

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

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// 32 weights of one lane and iteration -> 16 bf16x2 registers (A fragments of 4 k-steps) + escape mask.
__device__ __forceinline__ void decode32(const uint4 s0, const uint4 s1, u32 w0, u32 w1, u32 w2, const Lut lut,
                                        u32* A, u32& mask) {
  const u32 sm[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
  const u32 S0 = w0 & 0x77777777u, S1 = w1 & 0x77777777u, S2 = w2 & 0x77777777u;
  const u32 S3 = ((w0 >> 3) & 0x11111111u) | ((w1 >> 2) & 0x22222222u) | ((w2 >> 1) & 0x44444444u);
  const u32 sel[8] = {S0, S0 >> 16, S1, S1 >> 16, S2, S2 >> 16, S3, S3 >> 16};
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    const u32 ehi = __byte_perm(lut.hi0, lut.hi1, sel[q]);  // exponent >> 1 per byte (bit 7 clear)
    const u32 elo = __byte_perm(lut.lo0, lut.lo1, sel[q]);  // (exponent & 1) << 7 per byte
    const u32 hi = ehi | (sm[q] & 0x80808080u);             // [sign e7..e1]
    const u32 lo = elo | (sm[q] & 0x7F7F7F7Fu);             // [e0 m6..m0]
    A[2 * q] = __byte_perm(lo, hi, 0x5140);                 // bf16x2: (j+1 | j)
    A[2 * q + 1] = __byte_perm(lo, hi, 0x7362);             // (j+3 | j+2)
  }
  const u32 t0 = w0 & (w0 >> 1) & (w0 >> 2), t1 = w1 & (w1 >> 1) & (w1 >> 2), t2 = w2 & (w2 >> 1) & (w2 >> 2);
  const u32 t3 = w0 & w1 & w2;  // bit 4n+3: the three bits of j = 24 + n
  mask = (t0 & 0x11111111u) | ((t1 & 0x11111111u) << 1) | ((t2 & 0x11111111u) << 2) | (t3 & 0x88888888u);
}

// Bit b of an escape mask is j = 8 * (b & 3) + (b >> 2).
__device__ __forceinline__ int escape_j(int b) { return 8 * (b & 3) + (b >> 2); }

// One iteration's loads (the fused or the reference fields; the unused ones compile away).
struct Buf {
  uint4 s0, s1;      // fused: 32 sign+mantissa bytes
  u32 w0, w1, w2;    // fused: code words
  uint4 r[4];        // reference: 16 bf16x2 main-pass registers
  u32 rmask;         // reference: escape mask
};

template <bool FUSED>
__device__ __forceinline__ void load_iter(Buf& b, size_t li, long long lanes_total, const uint4* __restrict__ sm,
                                          const u32* __restrict__ codes, const uint4* __restrict__ ref_main,
                                          const u32* __restrict__ ref_mask) {
  if (FUSED) {
    b.s0 = __ldg(sm + 2 * li);
    b.s1 = __ldg(sm + 2 * li + 1);
    b.w0 = __ldg(codes + li);
    b.w1 = __ldg(codes + lanes_total + li);
    b.w2 = __ldg(codes + 2 * lanes_total + li);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) b.r[i] = __ldg(ref_main + 4 * li + i);
    b.rmask = __ldg(ref_mask + li);
  }
}

// DIAG (bench/lut3_kernel.py only, results wrong on purpose): 1 = escapes skipped, 2 = decode skipped too (the
// sign+mantissa words go to the mma as they are), 3 = escape masks, prefix sums and exponent reads kept but the
// per-escape loop left out: the time each stage costs, by difference.
template <int MT, bool FUSED, int DIAG = 0>
struct Gemv {
  const u16* __restrict__ x;
  int M, K;
  const uint4* __restrict__ sm;
  const u32* __restrict__ codes;
  const u8* __restrict__ esc_exp;
  const uint4* __restrict__ ref_main;
  const u32* __restrict__ ref_mask;
  const u16* __restrict__ ref_raw;
  Lut lut;
  int lane, t;
  bool has_tok;
  const u32* __restrict__ xrow;  // token g's row of x (row 0 when g >= M: loaded, then zeroed)
  float c[4], c2[4];  // two accumulator chains (even, odd k-steps): mma latency overlaps; summed at the end
  float corr[2][MT];   // fallback path: this lane's own escapes, rows g and g + 8
  float rowc[MT];      // bucket path: escapes of row (lane & 15), every other one (half lane >> 4)
  u32* bucket;         // this warp's [16 rows][BUCKET] escape descriptors (shared memory)
  int g;
  int esc_pos;

  // Decode one iteration and issue its 4 mma; returns its escape mask.
  __device__ __forceinline__ u32 step(const Buf& b, int it) {
    u32 A[16], mask;
    if (FUSED && DIAG == 2) {
      const u32 v[8] = {b.s0.x, b.s0.y, b.s0.z, b.s0.w, b.s1.x, b.s1.y, b.s1.z, b.s1.w};
#pragma unroll
      for (int i = 0; i < 16; ++i) A[i] = v[i & 7] ^ b.w0;
      mask = 0;
    } else if (FUSED) {
      decode32(b.s0, b.s1, b.w0, b.w1, b.w2, lut, A, mask);
      if (DIAG == 1) mask = 0;
    } else {
      const u32 v[16] = {b.r[0].x, b.r[0].y, b.r[0].z, b.r[0].w, b.r[1].x, b.r[1].y, b.r[1].z, b.r[1].w,
                         b.r[2].x, b.r[2].y, b.r[2].z, b.r[2].w, b.r[3].x, b.r[3].y, b.r[3].z, b.r[3].w};
#pragma unroll
      for (int i = 0; i < 16; ++i) A[i] = v[i];
      mask = b.rmask;
    }
    const u32* xp = xrow + ((it * 64 + 2 * t) >> 1);
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const u32 v0 = __ldg(xp + 8 * s), v1 = __ldg(xp + 8 * s + 4);
      mma16816((s & 1) ? c2 : c, A + 4 * s, has_tok ? v0 : 0u, has_tok ? v1 : 0u);
    }
    return mask;
  }

  // Escapes of two consecutive iterations (it, it + 1; mb = 0 when there is no second). A lane finds its escapes
  // in its own code bits, but lanes have different numbers of them, and a loop over them costs the warp its
  // busiest lane's count. So each lane only writes a descriptor per escape into a per-row bucket in shared memory
  // (a few instructions each), and the lanes then share the buckets evenly: lane (row r = lane & 15, half h =
  // lane >> 4) adds x * w for every other escape of row r, into its own accumulator. Positions come from prefix
  // sums, never from atomics, so the order of every fp32 addition is fixed: the result is deterministic.
  // One warp scan over lanes (counts packed in 16-bit halves) gives each escape's index in the exponent list.
  __device__ __forceinline__ void escapes(u32 ma, u32 mb, int it, size_t la, const uint4 (&wa)[2],
                                          const uint4 (&wb)[2]) {
    const int na = __popc(ma), nb = __popc(mb);
    int excl = 0, tot = 0;
    if (FUSED) {  // each escape's index in the exponent list: a warp prefix sum over lanes
      const int cnt = na | (nb << 16);
      int incl = cnt;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, d);
        if (lane >= d) incl += v;
      }
      tot = __shfl_sync(0xffffffffu, incl, 31);
      excl = incl - cnt;
    }
    // One token: each lane walks its own escapes (measured faster there than the buckets' shared-memory round
    // trip); more tokens: the buckets below, unless a row overflows one.
    if (MT == 1) {
      escapes_own(ma, mb, it, la, excl, tot, wa, wb);
      if (FUSED) esc_pos += (tot & 0xFFFF) + (tot >> 16);
      return;
    }
    // per-row bucket positions: escapes of rows g (lower) and g + 8 (upper) come from the 4 lanes of group g only
    const u32 UP = 0xFF00FF00u;  // mask bits b with (b >> 3) & 1: the upper row
    const int nup = __popc(ma & UP) + __popc(mb & UP);
    const int cnt2 = (na + nb - nup) | (nup << 16);
    int gin = cnt2;
    {
      const int v1 = __shfl_up_sync(0xffffffffu, gin, 1);
      if (t >= 1) gin += v1;
      const int v2 = __shfl_up_sync(0xffffffffu, gin, 2);
      if (t >= 2) gin += v2;
    }
    const int gtot = __shfl_sync(0xffffffffu, gin, (lane | 3));
    const bool overflow = __any_sync(0xffffffffu, (gtot & 0xFFFF) > BUCKET || (gtot >> 16) > BUCKET);
    if (overflow) {  // rare (escape-dense weights): every lane walks its own escapes
      escapes_own(ma, mb, it, la, excl, tot, wa, wb);
    } else {
      int plo = (gin - cnt2) & 0xFFFF, phi = (gin - cnt2) >> 16;
      const int qa = excl & 0xFFFF, qb = (tot & 0xFFFF) + (excl >> 16);
      int ia = 0, ib = 0;
      u32 ra = ma, rb = mb;
      while (ra | rb) {
        const bool second = ra == 0;
        const int b = __ffs(second ? rb : ra) - 1;
        ra = second ? ra : (ra & (ra - 1));
        rb = second ? (rb & (rb - 1)) : rb;
        const int q = second ? qb + ib++ : qa + ia++;  // index in this pair's part of the exponent list
        const int kofs = (second ? 64 : 0) + 2 * t + 16 * (b & 3) + ((b >> 2) & 1) + 8 * (b >> 4);
        const int off = (second ? 1024 : 0) + lane * 32 + 8 * (b & 3) + (b >> 2);  // stream byte in the pair
        const bool upper = (b >> 3) & 1;
        const int row = g + (upper ? 8 : 0);
        const int slot = upper ? phi++ : plo++;
        bucket[row * BUCKET + slot] = (u32)q | ((u32)kofs << 11) | ((u32)off << 18);
      }
      __syncwarp();
      const int r = lane & 15, h = lane >> 4;
      const int rt = __shfl_sync(0xffffffffu, gtot, 4 * (r & 7));
      const int size = (r >> 3) ? (rt >> 16) : (rt & 0xFFFF);
      const u8* smb_p = reinterpret_cast<const u8*>(sm) + (la - lane) * 32;  // the pair's stream region
      const u16* raw_p = ref_raw + (la - lane) * 32;
      const u16* xk = x + it * 64;
      for (int i = h; i < size; i += 2) {
        const u32 d = bucket[r * BUCKET + i];
        const int kofs = (d >> 11) & 0x7F, off = d >> 18;
        u32 wbits;
        if (FUSED) {
          const u32 e = esc_exp[esc_pos + (d & 0x7FF)];
          const u32 smb = smb_p[off];
          wbits = ((smb & 0x80u) << 24) | (e << 23) | ((smb & 0x7Fu) << 16);
        } else {
          wbits = ((u32)raw_p[off]) << 16;
        }
        const float w = __uint_as_float(wbits);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (MT == 1 || m < M) rowc[m] = fmaf(bf16_to_f32(xk[(size_t)m * K + kofs]), w, rowc[m]);
        }
      }
      __syncwarp();  // the buckets are rewritten by the next pair
    }
    if (FUSED) esc_pos += (tot & 0xFFFF) + (tot >> 16);
  }

  // Each lane adds its own escapes (rows g, g + 8) in mask-bit order: the path at one token, and the fallback.
  // Nothing in the loop waits on memory but x (an L1 hit): the exponents are read before it, 8 bytes per
  // iteration of the pair (more escapes than that in one lane take a load), and the sign+mantissa byte comes from
  // the words already in registers (byte selects instead of a load).
  __device__ __forceinline__ void escapes_own(u32 ma, u32 mb, int it, size_t la, int excl, int tot,
                                              const uint4 (&wa)[2], const uint4 (&wb)[2]) {
    int pa = esc_pos + (excl & 0xFFFF), pb = esc_pos + (tot & 0xFFFF) + (excl >> 16);
    const int a0 = pa & ~3, b0 = pb & ~3;  // esc_exp is padded by 8 bytes: these reads stay inside it
    u64 ea = 0, eb = 0;
    if (FUSED) {
      const u32* ew = reinterpret_cast<const u32*>(esc_exp);
      if (ma) ea = ((u64)__ldg(ew + (a0 >> 2) + 1) << 32) | __ldg(ew + (a0 >> 2));
      if (mb) eb = ((u64)__ldg(ew + (b0 >> 2) + 1) << 32) | __ldg(ew + (b0 >> 2));
    }
    const u16* raw_p = ref_raw + la * 32;
    const u16* xk = x + it * 64 + 2 * t;
    u32 ra = ma, rb = mb;
    if (DIAG == 3) {  // masks, prefix sum and exponent reads kept (folded into a result), the loop left out
      corr[0][0] += __uint_as_float((u32)pa ^ (u32)pb ^ ra ^ rb ^ (u32)ea ^ (u32)eb) * 0.f;
      ra = rb = 0;
    }
    while (ra | rb) {
      const bool second = ra == 0;
      const int b = __ffs(second ? rb : ra) - 1;
      ra = second ? ra : (ra & (ra - 1));
      rb = second ? (rb & (rb - 1)) : rb;
      const int j = 8 * (b & 3) + (b >> 2);
      u32 wbits;
      if (FUSED) {
        const int p = second ? pb++ : pa++;
        const int rel = p - (second ? b0 : a0);
        const u32 e = rel < 8 ? (u32)((second ? eb : ea) >> (8 * rel)) & 0xFFu : (u32)esc_exp[p];
        const uint4 lo = second ? wb[0] : wa[0], hi = second ? wb[1] : wa[1];  // bytes 0-15, 16-31
        const uint4 h = (j & 16) ? hi : lo;
        const u32 w01 = (j & 4) ? h.y : h.x, w23 = (j & 4) ? h.w : h.z;
        const u32 smb = __byte_perm((j & 8) ? w23 : w01, 0u, (u32)(j & 3));
        wbits = ((smb & 0x80u) << 24) | (e << 23) | ((smb & 0x7Fu) << 16);
      } else {
        wbits = ((u32)raw_p[(second ? 1024 : 0) + j]) << 16;
      }
      const float w = __uint_as_float(wbits);
      const int kofs = (second ? 64 : 0) + 16 * (b & 3) + ((b >> 2) & 1) + 8 * (b >> 4);
      const bool upper = (b >> 3) & 1;
      const float w0 = upper ? 0.f : w, w1 = upper ? w : 0.f;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (MT == 1 || m < M) {
          const float xv = bf16_to_f32(xk[(size_t)m * K + kofs]);
          corr[0][m] = fmaf(xv, w0, corr[0][m]);
          corr[1][m] = fmaf(xv, w1, corr[1][m]);
        }
      }
    }
  }
};

template <int MT, bool FUSED, int DIAG = 0>
__device__ __forceinline__ void gemv(const u16* __restrict__ x, int M, int K, const uint4* __restrict__ sm_stream,
                                     const u32* __restrict__ codes, const u8* __restrict__ esc_exp,
                                     const int* __restrict__ esc_off, const uint4* __restrict__ ref_main,
                                     const u32* __restrict__ ref_mask, const u16* __restrict__ ref_raw, Lut lut,
                                     u16* __restrict__ y, int N, int I, u64* counter) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, S = blockDim.x >> 5;
  const int tile = blockIdx.x;
  const int g = lane >> 2, t = lane & 3;
  const int it0 = (I * warp) / S, it1 = (I * (warp + 1)) / S;
  const long long lanes_total = (long long)gridDim.x * I * 32;

  Gemv<MT, FUSED, DIAG> G;
  G.x = x; G.M = M; G.K = K; G.sm = sm_stream; G.codes = codes; G.esc_exp = esc_exp;
  G.ref_main = ref_main; G.ref_mask = ref_mask; G.ref_raw = ref_raw; G.lut = lut;
  G.lane = lane; G.t = t; G.g = g; G.has_tok = g < M;
  extern __shared__ u32 smem[];
  G.bucket = smem + warp * (16 * BUCKET);
  float* red = reinterpret_cast<float*>(smem + S * 16 * BUCKET);  // [S][16 rows][8 cols]
  G.xrow = reinterpret_cast<const u32*>(x + (size_t)(g < M ? g : 0) * K);
#pragma unroll
  for (int e = 0; e < 4; ++e) G.c[e] = G.c2[e] = 0.f;
#pragma unroll
  for (int m = 0; m < MT; ++m) G.corr[0][m] = G.corr[1][m] = G.rowc[m] = 0.f;
  G.esc_pos = (FUSED && it0 < it1) ? esc_off[tile * I + it0] : 0;

  // unrolled by two with named buffers: the next iteration's loads are in flight during this one's decode,
  // with no register copies between iterations
  Buf a, b;
  const size_t l0 = ((size_t)tile * I + it0) * 32 + lane;
  if (it0 < it1) load_iter<FUSED>(a, l0, lanes_total, sm_stream, codes, ref_main, ref_mask);
  for (int it = it0; it < it1; it += 2) {
    const size_t la = l0 + (size_t)(it - it0) * 32, lb = la + 32;
    if (it + 1 < it1) load_iter<FUSED>(b, lb, lanes_total, sm_stream, codes, ref_main, ref_mask);
    const uint4 wa[2] = {a.s0, a.s1};
    const u32 ma = G.step(a, it);
    u32 mb = 0;
    if (it + 1 < it1) {
      if (it + 2 < it1) load_iter<FUSED>(a, lb + 32, lanes_total, sm_stream, codes, ref_main, ref_mask);
      mb = G.step(b, it + 1);
    }
    const uint4 wb[2] = {b.s0, b.s1};
    G.escapes(ma, mb, it, la, wa, wb);
  }
  float* c = G.c;
#pragma unroll
  for (int e = 0; e < 4; ++e) c[e] += G.c2[e];
  auto& corr = G.corr;
  // corrections: sum over the 4 lanes of a row group (fixed pairing), then into the mma layout
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float v = corr[h][m];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      corr[h][m] = v;
    }
    // bucket path: row r's two halves (lanes r, r + 16), then rows g and g + 8 fetched from lanes g, g + 8
    float v = G.rowc[m];
    v += __shfl_xor_sync(0xffffffffu, v, 16);
    const float lo = __shfl_sync(0xffffffffu, v, g), hi = __shfl_sync(0xffffffffu, v, g + 8);
    if (m == 2 * t) { c[0] += corr[0][m] + lo; c[2] += corr[1][m] + hi; }
    if (m == 2 * t + 1) { c[1] += corr[0][m] + lo; c[3] += corr[1][m] + hi; }
  }
  // c[0]: (row g, col 2t), c[1]: (g, 2t+1), c[2]: (g+8, 2t), c[3]: (g+8, 2t+1)
  const int row0 = tile * 16;
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

#define LUT3_GEMV(MT)                                                                                          \
  extern "C" __global__ void __launch_bounds__(512) lut3_gemv_m##MT(                                          \
      const u16* x, int M, int K, const uint4* sm, const u32* codes, const u8* esc_exp, const int* esc_off,    \
      int hi0, int hi1, int lo0, int lo1, u16* y, int N, int I, u64* counter) {                                \
    gemv<MT, true>(x, M, K, sm, codes, esc_exp, esc_off, nullptr, nullptr, nullptr,                            \
                   Lut{(u32)hi0, (u32)hi1, (u32)lo0, (u32)lo1}, y, N, I, counter);                             \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(512) lut3_ref_m##MT(                                           \
      const u16* x, int M, int K, const uint4* ref_main, const u32* ref_mask, const u16* ref_raw, u16* y,      \
      int N, int I, u64* counter) {                                                                            \
    gemv<MT, false>(x, M, K, nullptr, nullptr, nullptr, nullptr, ref_main, ref_mask, ref_raw,                 \
                    Lut{0, 0, 0, 0}, y, N, I, counter);                                                        \
  }

LUT3_GEMV(1)
LUT3_GEMV(2)

#define LUT3_DIAG(D)                                                                                           \
  extern "C" __global__ void __launch_bounds__(512) lut3_diag##D##_m1(                                        \
      const u16* x, int M, int K, const uint4* sm, const u32* codes, const u8* esc_exp, const int* esc_off,    \
      int hi0, int hi1, int lo0, int lo1, u16* y, int N, int I, u64* counter) {                                \
    gemv<1, true, D>(x, M, K, sm, codes, esc_exp, esc_off, nullptr, nullptr, nullptr,                          \
                     Lut{(u32)hi0, (u32)hi1, (u32)lo0, (u32)lo1}, y, N, I, counter);                           \
  }
LUT3_DIAG(1)
LUT3_DIAG(2)
LUT3_DIAG(3)

// The one-token kernel with its registers capped at 64 (two 512-thread blocks per SM): does occupancy pay for
// what the cap costs? (bench/lut3_kernel.py times it beside lut3_gemv_m1; same arithmetic, so same results.)
extern "C" __global__ void __launch_bounds__(512, 2) lut3_gemvlb_m1(
    const u16* x, int M, int K, const uint4* sm, const u32* codes, const u8* esc_exp, const int* esc_off, int hi0,
    int hi1, int lo0, int lo1, u16* y, int N, int I, u64* counter) {
  gemv<1, true>(x, M, K, sm, codes, esc_exp, esc_off, nullptr, nullptr, nullptr,
                Lut{(u32)hi0, (u32)hi1, (u32)lo0, (u32)lo1}, y, N, I, counter);
}
LUT3_GEMV(4)
LUT3_GEMV(8)

// The main loop's decode, written out in stream order with the escapes patched: proves on the GPU that the
// in-register decode is the inverse of encode (lut3_cuda.decode_gpu un-permutes and compares).
extern "C" __global__ void lut3_decode(const uint4* sm_stream, const u32* codes, const u8* esc_exp,
                                       const int* esc_off, int hi0, int hi1, int lo0, int lo1, u32* out, int T,
                                       int I) {
  const int lane = threadIdx.x & 31;
  const int tile = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (tile >= T) return;
  const long long lanes_total = (long long)T * I * 32;
  const Lut lut{(u32)hi0, (u32)hi1, (u32)lo0, (u32)lo1};
  int esc_pos = esc_off[tile * I];
  for (int it = 0; it < I; ++it) {
    const size_t li = ((size_t)tile * I + it) * 32 + lane;
    u32 A[16], mask;
    decode32(__ldg(sm_stream + 2 * li), __ldg(sm_stream + 2 * li + 1), __ldg(codes + li),
             __ldg(codes + lanes_total + li), __ldg(codes + 2 * lanes_total + li), lut, A, mask);
#pragma unroll
    for (int i = 0; i < 16; ++i) out[li * 16 + i] = A[i];
    const int cnt = __popc(mask);
    int incl = cnt;
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += v;
    }
    int pos = esc_pos + incl - cnt;
    esc_pos += __shfl_sync(0xffffffffu, incl, 31);
    u16* out16 = reinterpret_cast<u16*>(out);
    while (mask) {
      const int b = __ffs(mask) - 1;
      mask &= mask - 1;
      const int j = escape_j(b);
      const u32 e = esc_exp[pos++];
      const u32 smb = reinterpret_cast<const u8*>(sm_stream)[li * 32 + j];
      out16[li * 32 + j] = (u16)(((smb & 0x80u) << 8) | (e << 7) | (smb & 0x7Fu));
    }
  }
}
