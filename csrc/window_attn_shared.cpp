// Shared-keys phase of the CPU window_attn forward (fp32); see window_attn_shared.h.
//
// Why: a tree verification step over a long video has N tree queries (x the GQA group) that
// all see the same tens of thousands of visual keys. The per-query path reads every key once
// per query; here a work item = (row b, KV head, key chunk) loads each key block once, scores
// it against all of the head's query rows (the queries, transposed once, sit in the vector
// lanes: register-blocked outer products with the keys read in place), and keeps a
// flash-style online softmax per row, 8 rows per vector. Chunks along the keys give the
// threads work even at batch 1 with one or two KV heads; their partial states are merged by
// log-sum-exp. The hot loop is compiled three times (x86-64 baseline, AVX2 + FMA, and
// AVX2 + FMA + AVX-512VL) and picked at run time, so a wheel built for any x86-64 CPU
// still runs vectorised where it can.
#include "window_attn_shared.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors in the baseline build: all inlined
#endif

namespace sparrow {
namespace {

constexpr int64_t kBlock = 64;    // keys per block: its [kBlock, rows] scores stay in L1
constexpr int64_t kDTile = 32;    // output features per accumulator tile in the P @ V update
constexpr int64_t kMinChunk = 512;  // fewest keys per work item

#define SPARROW_INLINE inline __attribute__((always_inline))

// 8-float vectors (GCC/Clang vector extensions): one AVX register in the AVX2 + FMA build,
// two SSE registers in the baseline one; no intrinsics, so one source serves both.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

SPARROW_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
SPARROW_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
SPARROW_INLINE v8f splat(float x) { return v8f{} + x; }
SPARROW_INLINE float hmax(v8f v) {
  float m = v[0];
  for (int u = 1; u < 8; ++u) m = std::max(m, v[u]);
  return m;
}
SPARROW_INLINE float hsum(v8f v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

// 2^x for x <= 0 (base-2 scores minus their running max), 8 lanes: x = n + f with n an
// integer and |f| <= 1/2, 2^f by its degree-6 Taylor polynomial in f (relative error
// < 2e-7), 2^n by the exponent bits. Inputs below -126 give 2^-126 instead of a denormal
// or 0 (relative effect on a softmax sum: < 1e-37).
SPARROW_INLINE v8f exp2_nonpositive(v8f x) {
  x = x < splat(-126.0f) ? splat(-126.0f) : x;
  const v8f t = x + 0.5f;
  v8i n = __builtin_convertvector(t, v8i);                  // truncation ...
  v8f nf = __builtin_convertvector(n, v8f);
  const v8i above = nf > t;                                  // ... corrected to floor(t)
  n = n + above;
  nf = nf + __builtin_convertvector(above, v8f);
  const v8f f = x - nf;
  v8f p = splat(1.5403530393381606e-4f);
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const v8i bits = (n + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

struct Chunk {
  const float* qt;    // [D, Rp] query rows of one (b, KV head), transposed, scale * log2(e) folded in
                      // (scores in base 2), rows >= R zero
  const float* k;     // key slot 0 of this (b, KV head); row stride k_stride
  const float* v;
  int64_t k_stride, v_stride;
  int64_t begin, end;  // key slots of this chunk
  int64_t R, Rp, D;    // query rows, rows padded to a multiple of 8, head dim
  float* state;        // [R, D + 2]: acc, m, l
  float* scores;       // scratch [kBlock, Rp]: scores, then weights, of one key block
  float* m;            // scratch [Rp]: running max per row (base 2)
  float* l;            // scratch [Rp]: running sum per row
  float* corr;         // scratch [Rp]: this block's rescale per row
};

// The last 1-3 row vectors of score_block (or all of them when the rows are few, e.g. a
// plain decode step): 4 keys per pass so that 4 * WIDTH FMA chains are in flight.
template <int WIDTH>
SPARROW_INLINE void score_narrow_fixed(const Chunk& c, int64_t j0, int64_t n, int64_t r0) {
  const int64_t D = c.D, Rp = c.Rp;
  for (int64_t j = 0; j < n; j += 4) {
    const float* kr[4];
    for (int u = 0; u < 4; ++u) kr[u] = c.k + (j0 + std::min(j + u, n - 1)) * c.k_stride;  // past n: a repeat
    v8f acc[WIDTH][4];
    for (int t = 0; t < WIDTH; ++t)
      for (int u = 0; u < 4; ++u) acc[t][u] = v8f{};
    for (int64_t d = 0; d < D; ++d) {
      const v8f x0 = splat(kr[0][d]), x1 = splat(kr[1][d]), x2 = splat(kr[2][d]), x3 = splat(kr[3][d]);
      for (int t = 0; t < WIDTH; ++t) {
        const v8f qv = load8(c.qt + d * Rp + r0 + 8 * t);
        acc[t][0] += x0 * qv; acc[t][1] += x1 * qv; acc[t][2] += x2 * qv; acc[t][3] += x3 * qv;
      }
    }
    for (int u = 0; u < 4 && j + u < n; ++u)
      for (int t = 0; t < WIDTH; ++t) store8(c.scores + (j + u) * Rp + r0 + 8 * t, acc[t][u]);
  }
}

SPARROW_INLINE void score_narrow(const Chunk& c, int64_t j0, int64_t n, int64_t r0, int64_t width) {
  if (width == 1) score_narrow_fixed<1>(c, j0, n, r0);
  else if (width == 2) score_narrow_fixed<2>(c, j0, n, r0);
  else score_narrow_fixed<3>(c, j0, n, r0);
}

// scores[j, r] = k_j . q_r for the n keys of the block at j0 and the 32 rows from r0
// (query rows in the vector lanes: per feature, 4 query vectors loaded once and 2 keys
// broadcast, 8 FMAs into registers; the keys are read in place, no transpose).
SPARROW_INLINE void score_block(const Chunk& c, int64_t j0, int64_t n, int64_t r0, int64_t width) {
  if (width < 4) return score_narrow(c, j0, n, r0, width);
  const int64_t D = c.D, Rp = c.Rp;
  for (int64_t j = 0; j < n; j += 2) {
    const float* k0 = c.k + (j0 + j) * c.k_stride;
    const float* k1 = j + 1 < n ? k0 + c.k_stride : k0;  // an odd last key is scored twice
    {
      v8f a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
      for (int64_t d = 0; d < D; ++d) {
        const float* qd = c.qt + d * Rp + r0;
        const v8f q0 = load8(qd), q1 = load8(qd + 8), q2 = load8(qd + 16), q3 = load8(qd + 24);
        const v8f x = splat(k0[d]), y = splat(k1[d]);
        a0 += x * q0; a1 += x * q1; a2 += x * q2; a3 += x * q3;
        b0 += y * q0; b1 += y * q1; b2 += y * q2; b3 += y * q3;
      }
      float* s0 = c.scores + j * Rp + r0;
      store8(s0, a0); store8(s0 + 8, a1); store8(s0 + 16, a2); store8(s0 + 24, a3);
      if (j + 1 < n) {
        float* s1 = s0 + Rp;
        store8(s1, b0); store8(s1 + 8, b1); store8(s1 + 16, b2); store8(s1 + 24, b3);
      }
    }
  }
}

// Online softmax over the block, 8 rows per vector: new running max, the rescale of each
// row's accumulator (corr), the weights 2^(s - m) (= e^ of the natural-unit difference) in place
// of the scores, the running sums.
SPARROW_INLINE void softmax_block(const Chunk& c, int64_t n) {
  const int64_t Rp = c.Rp;
  for (int64_t r = 0; r < Rp; r += 8) {
    v8f block_max = load8(c.scores + r);
    for (int64_t j = 1; j < n; ++j) {
      const v8f x = load8(c.scores + j * Rp + r);
      block_max = x > block_max ? x : block_max;
    }
    const v8f m_old = load8(c.m + r);
    const v8f m_new = block_max > m_old ? block_max : m_old;
    store8(c.corr + r, exp2_nonpositive(m_old - m_new));  // ~0 on the first block (m_old = -inf, acc = 0)
    v8f sum = {};
    for (int64_t j = 0; j < n; ++j) {
      const v8f p = exp2_nonpositive(load8(c.scores + j * Rp + r) - m_new);
      store8(c.scores + j * Rp + r, p);
      sum += p;
    }
    store8(c.l + r, load8(c.l + r) * load8(c.corr + r) + sum);
    store8(c.m + r, m_new);
  }
}

// acc_r = acc_r * corr_r + sum_j w[j, r] v_j for the NR rows in `rows` (a row may repeat:
// then its copies compute and store the same values), over the n keys of the block at j0.
// Each V row is loaded once for all NR rows: NR = 2 keeps 8 accumulators + 4 V vectors +
// 2 broadcasts in AVX2's 16 registers, NR = 4 needs the 32 of AVX-512.
template <int NR>
SPARROW_INLINE void accumulate_rows(const Chunk& c, int64_t j0, int64_t n, const int64_t* rows) {
  const int64_t D = c.D, W = D + 2, Rp = c.Rp;
  float* acc[NR];
  float cr[NR];
  for (int i = 0; i < NR; ++i) {
    acc[i] = c.state + rows[i] * W;
    cr[i] = c.corr[rows[i]];
  }
  const float* w = c.scores;
  const float* v = c.v + j0 * c.v_stride;
  int64_t d0 = 0;
  for (; d0 + kDTile <= D; d0 += kDTile) {
    v8f a[NR][4];
    for (int i = 0; i < NR; ++i)
      for (int t = 0; t < 4; ++t) a[i][t] = load8(acc[i] + d0 + 8 * t) * cr[i];
    for (int64_t j = 0; j < n; ++j) {
      const float* vr = v + j * c.v_stride + d0;
      const v8f v0 = load8(vr), v1 = load8(vr + 8), v2 = load8(vr + 16), v3 = load8(vr + 24);
      for (int i = 0; i < NR; ++i) {
        const v8f x = splat(w[j * Rp + rows[i]]);
        a[i][0] += x * v0; a[i][1] += x * v1; a[i][2] += x * v2; a[i][3] += x * v3;
      }
    }
    for (int i = 0; i < NR; ++i)
      for (int t = 0; t < 4; ++t) store8(acc[i] + d0 + 8 * t, a[i][t]);
  }
  for (; d0 + 8 <= D; d0 += 8) {
    v8f a[NR];
    for (int i = 0; i < NR; ++i) a[i] = load8(acc[i] + d0) * cr[i];
    for (int64_t j = 0; j < n; ++j) {
      const v8f v0 = load8(v + j * c.v_stride + d0);
      for (int i = 0; i < NR; ++i) a[i] += splat(w[j * Rp + rows[i]]) * v0;
    }
    for (int i = 0; i < NR; ++i) store8(acc[i] + d0, a[i]);
  }
  for (int64_t d = d0; d < D; ++d) {  // head dims that are not a multiple of 8
    float a[NR];
    for (int i = 0; i < NR; ++i) a[i] = acc[i][d] * cr[i];
    for (int64_t j = 0; j < n; ++j) {
      const float vd = v[j * c.v_stride + d];
      for (int i = 0; i < NR; ++i) a[i] += w[j * Rp + rows[i]] * vd;
    }
    for (int i = 0; i < NR; ++i) acc[i][d] = a[i];
  }
}

template <int NR>
SPARROW_INLINE void chunk_body(const Chunk& c) {
  const int64_t R = c.R, Rp = c.Rp, D = c.D, W = D + 2;
  std::fill(c.state, c.state + R * W, 0.0f);
  std::fill(c.m, c.m + Rp, -std::numeric_limits<float>::infinity());
  std::fill(c.l, c.l + Rp, 0.0f);
  for (int64_t j0 = c.begin; j0 < c.end; j0 += kBlock) {
    const int64_t n = std::min(kBlock, c.end - j0);
    for (int64_t r0 = 0; r0 < Rp; r0 += 32) score_block(c, j0, n, r0, std::min<int64_t>(4, (Rp - r0) / 8));
    softmax_block(c, n);
    for (int64_t r = 0; r < R; r += NR) {
      int64_t rows[NR];
      for (int i = 0; i < NR; ++i) rows[i] = std::min<int64_t>(r + i, R - 1);
      accumulate_rows<NR>(c, j0, n, rows);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    c.state[r * W + D] = c.m[r] * 0.693147180559945309f;  // back to natural log units
    c.state[r * W + D + 1] = c.l[r];
  }
}

void chunk_generic(const Chunk& c) { chunk_body<2>(c); }

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target("avx2,fma"))) void chunk_haswell(const Chunk& c) { chunk_body<2>(c); }

bool has_haswell() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// AVX-512 CPUs (Skylake-X and later, Zen 4/5): the same 8-lane code, compiled with 32
// vector registers and broadcasts folded into the FMAs, and 4 rows per V load in the P @ V
// update (measured gains: benchmarks/RESULTS.md, Kernels).
__attribute__((target("avx2,fma,avx512f,avx512vl"))) void chunk_avx512(const Chunk& c) { chunk_body<4>(c); }

// SPARROW_CPU_ISA=avx2 keeps an AVX-512 CPU on the AVX2 build (A/B timing, debugging).
bool has_avx512() {
  static const bool ok = [] {
    const char* isa = std::getenv("SPARROW_CPU_ISA");
    const bool held_to_avx2 = isa != nullptr && std::strcmp(isa, "avx2") == 0;
    return !held_to_avx2 && has_haswell() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return ok;
}
#endif

void run_chunk(const Chunk& c) {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  if (has_avx512()) return chunk_avx512(c);
  if (has_haswell()) return chunk_haswell(c);
#endif
  chunk_generic(c);
}

}  // namespace

at::Tensor window_attn_shared_keys(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const std::vector<int64_t>& shared_begin, const std::vector<int64_t>& shared_end,
                                   double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1);
  const int64_t group = Hq / Hkv, R = group * Tq, W = D + 2, Rp = (R + 7) / 8 * 8;
  // query rows of one (b, KV head), (g, i) -> row g * Tq + i (the order of q[b, hkv * group + g, i]),
  // transposed to [D, Rp] with the softmax scale folded in and zero rows as padding
  const at::Tensor q32 = q.to(at::kFloat).contiguous();                     // [B, Hq, Tq, D]
  std::vector<float> qt(static_cast<size_t>(B * Hkv * D * Rp), 0.0f);
  {
    const float* src = q32.data_ptr<float>();
    const float s = static_cast<float>(scale * 1.44269504088896341);  // base-2 scores
    for (int64_t bh = 0; bh < B * Hkv; ++bh) {
      for (int64_t r = 0; r < R; ++r) {
        const float* row = src + (bh * R + r) * D;                          // heads of a group are adjacent
        for (int64_t d = 0; d < D; ++d) qt[(bh * D + d) * Rp + r] = row[d] * s;
      }
    }
  }
  at::Tensor state = at::empty({B, Hq, Tq, W}, q.options().dtype(at::kFloat));
  float* state_data = state.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    if (shared_end[b] > shared_begin[b]) continue;
    for (int64_t row = 0; row < Hq * Tq; ++row) {
      float* st = state_data + (b * Hq * Tq + row) * W;
      std::fill(st, st + D, 0.0f);
      st[D] = -std::numeric_limits<float>::infinity();
      st[D + 1] = 0.0f;
    }
  }

  // work items: (b, KV head, chunk); enough chunks to give every thread work
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> chunks(B), first_item(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t keys = std::max<int64_t>(0, shared_end[b] - shared_begin[b]);
    const int64_t want = (2 * threads + B * Hkv - 1) / (B * Hkv);
    chunks[b] = keys == 0 ? 0 : std::max<int64_t>(1, std::min(want, keys / kMinChunk));
    first_item[b + 1] = first_item[b] + chunks[b] * Hkv;
  }
  const int64_t items = first_item[B];
  if (items == 0) return state;
  // partial states of every chunk: [items, R, W]
  std::vector<float> partial(static_cast<size_t>(items * R * W));
  const float* k_data = k.data_ptr<float>();
  const float* v_data = v.data_ptr<float>();
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(kBlock * Rp + 3 * Rp));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = std::upper_bound(first_item.begin(), first_item.end(), item) - first_item.begin() - 1;
      const int64_t local = item - first_item[b];
      const int64_t hkv = local / chunks[b], chunk = local % chunks[b];
      const int64_t keys = shared_end[b] - shared_begin[b];
      const int64_t per = (keys + chunks[b] - 1) / chunks[b];
      Chunk c;
      c.qt = qt.data() + (b * Hkv + hkv) * D * Rp;
      c.k = k_data + b * k.stride(0) + hkv * k.stride(1);
      c.v = v_data + b * v.stride(0) + hkv * v.stride(1);
      c.k_stride = k.stride(2);
      c.v_stride = v.stride(2);
      c.begin = shared_begin[b] + chunk * per;
      c.end = std::min(shared_end[b], c.begin + per);
      c.R = R;
      c.Rp = Rp;
      c.D = D;
      c.state = partial.data() + item * R * W;
      c.scores = scratch.data();
      c.m = c.scores + kBlock * Rp;
      c.l = c.m + Rp;
      c.corr = c.l + Rp;
      run_chunk(c);
    }
  });

  // merge the chunks of each (b, KV head) by log-sum-exp into state[b, hkv * group + g, i]
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, hkv = bh % Hkv;
      if (chunks[b] == 0) continue;
      const float* parts = partial.data() + (first_item[b] + hkv * chunks[b]) * R * W;
      for (int64_t r = 0; r < R; ++r) {
        float* out = state_data + ((b * Hq + hkv * group) * Tq + r) * W;  // rows of a head group are adjacent
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < chunks[b]; ++c) m = std::max(m, parts[(c * R + r) * W + D]);
        std::fill(out, out + D, 0.0f);
        float l = 0.0f;
        for (int64_t c = 0; c < chunks[b]; ++c) {
          const float* p = parts + (c * R + r) * W;
          const float w = std::isinf(p[D]) ? 0.0f : std::exp(p[D] - m);
          l += w * p[D + 1];
          for (int64_t d = 0; d < D; ++d) out[d] += w * p[d];
        }
        out[D] = m;
        out[D + 1] = l;
      }
    }
  });
  return state;
}

}  // namespace sparrow
