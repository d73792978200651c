// Shared-prefix phase of the CPU window_attn forward (fp32); see window_attn_shared.h.
//
// Why: a tree verification step over a long video has N tree queries (x the GQA group) that
// all see the same tens of thousands of visual keys. The per-query path reads every key once
// per query; here a work item = (row b, KV head, key chunk) loads each key block once, scores
// it against all of the head's query rows (register-blocked outer products over a transposed
// key block), and keeps a flash-style online softmax per row. Chunks along the keys give the
// threads work even at batch 1 with one or two KV heads; their partial states are merged by
// log-sum-exp. The hot loop is compiled twice (x86-64 baseline, and AVX2 + FMA) and
// picked at run time, so a wheel built for any x86-64 CPU still runs vectorised where it can.
#include "window_attn_shared.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors in the baseline build: all inlined
#endif

namespace sparrow {
namespace {

constexpr int64_t kBlock = 64;    // keys per block: the scores of a row pair stay in registers / L1
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

// exp(x) for x <= 0 (scores minus their running max), 8 lanes: Cody-Waite range reduction
// and a degree-6 polynomial, ~2 ulp. Inputs below -87 give ~1e-38 instead of a denormal or
// 0 (relative effect on a softmax sum: < 1e-37).
SPARROW_INLINE v8f exp_nonpositive(v8f x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  const v8f t = x * 1.44269504088896341f + 0.5f;
  v8i n = __builtin_convertvector(t, v8i);                  // truncation ...
  v8f nf = __builtin_convertvector(n, v8f);
  const v8i above = nf > t;                                  // ... corrected to floor(t)
  n = n + above;
  nf = nf + __builtin_convertvector(above, v8f);
  v8f f = x - nf * 0.693359375f;
  f = f + nf * 2.12194440e-4f;
  v8f p = splat(1.0f / 720.0f);
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const v8i bits = (n + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

struct Chunk {
  const float* q;     // [R, D] query rows of one (b, KV head), contiguous, softmax scale folded in
  const float* k;     // key slot 0 of this (b, KV head); row stride k_stride
  const float* v;
  int64_t k_stride, v_stride;
  int64_t begin, end;  // key slots of this chunk
  int64_t R, D;
  float* state;        // [R, D + 2]: acc, m, l
  float* kt;           // scratch [D, kBlock], 32-byte aligned
};

// Scores of rows q0, q1 against the transposed key block kt [D, kBlock]: s0, s1 [kBlock].
// Per feature d: 4 key vectors loaded once, 8 FMAs (two rows x 32 keys) into registers.
SPARROW_INLINE void score_pair(const float* q0, const float* q1, const float* kt, int64_t D, float* s0, float* s1) {
  for (int64_t jb = 0; jb < kBlock; jb += 32) {
    v8f a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
    for (int64_t d = 0; d < D; ++d) {
      const float* kk = kt + d * kBlock + jb;
      const v8f k0 = load8(kk), k1 = load8(kk + 8), k2 = load8(kk + 16), k3 = load8(kk + 24);
      const v8f x = splat(q0[d]), y = splat(q1[d]);
      a0 += x * k0; a1 += x * k1; a2 += x * k2; a3 += x * k3;
      b0 += y * k0; b1 += y * k1; b2 += y * k2; b3 += y * k3;
    }
    store8(s0 + jb, a0); store8(s0 + jb + 8, a1); store8(s0 + jb + 16, a2); store8(s0 + jb + 24, a3);
    store8(s1 + jb, b0); store8(s1 + jb + 8, b1); store8(s1 + jb + 16, b2); store8(s1 + jb + 24, b3);
  }
}

// Online-softmax update of one row with its block scores s [kBlock] (n valid); s becomes the
// weights exp(s - m_new) (0 past n). Returns the rescale factor of the row's accumulator.
SPARROW_INLINE float softmax_update(float* s, int64_t n, float* m, float* l) {
  for (int64_t j = n; j < kBlock; ++j) s[j] = -std::numeric_limits<float>::infinity();
  v8f vmax = load8(s);
  for (int64_t j = 8; j < kBlock; j += 8) {
    const v8f x = load8(s + j);
    vmax = x > vmax ? x : vmax;
  }
  const float m_new = std::max(*m, hmax(vmax));
  const float correction = std::exp(*m - m_new);  // 0 on the row's first block (m = -inf)
  v8f vsum = {};
  for (int64_t j = 0; j < kBlock; j += 8) {
    v8f p = exp_nonpositive(load8(s + j) - m_new);
    if (j + 8 > n) {  // the block's tail past n: weight 0
      for (int u = 0; u < 8; ++u) p[u] = j + u < n ? p[u] : 0.0f;
    }
    store8(s + j, p);
    vsum += p;
  }
  *l = *l * correction + hsum(vsum);
  *m = m_new;
  return correction;
}

// acc0 = acc0 * c0 + P0 @ V, acc1 likewise, over the n keys of the block starting at slot j0.
SPARROW_INLINE void accumulate_pair(const float* p0, const float* p1, float c0, float c1, const float* v,
                                    int64_t v_stride, int64_t j0, int64_t n, int64_t D, float* acc0, float* acc1) {
  int64_t d0 = 0;
  for (; d0 + kDTile <= D; d0 += kDTile) {  // 8 independent FMA chains; each V row loaded once for both rows
    v8f a0 = load8(acc0 + d0) * c0, a1 = load8(acc0 + d0 + 8) * c0;
    v8f a2 = load8(acc0 + d0 + 16) * c0, a3 = load8(acc0 + d0 + 24) * c0;
    v8f b0 = load8(acc1 + d0) * c1, b1 = load8(acc1 + d0 + 8) * c1;
    v8f b2 = load8(acc1 + d0 + 16) * c1, b3 = load8(acc1 + d0 + 24) * c1;
    for (int64_t j = 0; j < n; ++j) {
      const float* vr = v + (j0 + j) * v_stride + d0;
      const v8f v0 = load8(vr), v1 = load8(vr + 8), v2 = load8(vr + 16), v3 = load8(vr + 24);
      const v8f x = splat(p0[j]), y = splat(p1[j]);
      a0 += x * v0; a1 += x * v1; a2 += x * v2; a3 += x * v3;
      b0 += y * v0; b1 += y * v1; b2 += y * v2; b3 += y * v3;
    }
    store8(acc0 + d0, a0); store8(acc0 + d0 + 8, a1); store8(acc0 + d0 + 16, a2); store8(acc0 + d0 + 24, a3);
    store8(acc1 + d0, b0); store8(acc1 + d0 + 8, b1); store8(acc1 + d0 + 16, b2); store8(acc1 + d0 + 24, b3);
  }
  for (; d0 + 8 <= D; d0 += 8) {
    v8f a0 = load8(acc0 + d0) * c0, b0 = load8(acc1 + d0) * c1;
    for (int64_t j = 0; j < n; ++j) {
      const v8f v0 = load8(v + (j0 + j) * v_stride + d0);
      a0 += splat(p0[j]) * v0;
      b0 += splat(p1[j]) * v0;
    }
    store8(acc0 + d0, a0);
    store8(acc1 + d0, b0);
  }
  for (int64_t d = d0; d < D; ++d) {  // head dims that are not a multiple of 8
    float a = acc0[d] * c0, b = acc1[d] * c1;
    for (int64_t j = 0; j < n; ++j) {
      const float vd = v[(j0 + j) * v_stride + d];
      a += p0[j] * vd;
      b += p1[j] * vd;
    }
    acc0[d] = a;
    acc1[d] = b;
  }
}

SPARROW_INLINE void chunk_body(const Chunk& c) {
  const int64_t R = c.R, D = c.D, W = D + 2;
  for (int64_t r = 0; r < R; ++r) {
    float* st = c.state + r * W;
    std::fill(st, st + D, 0.0f);
    st[D] = -std::numeric_limits<float>::infinity();
    st[D + 1] = 0.0f;
  }
  alignas(64) float s0[kBlock];
  alignas(64) float s1[kBlock];
  for (int64_t j0 = c.begin; j0 < c.end; j0 += kBlock) {
    const int64_t n = std::min(kBlock, c.end - j0);
    for (int64_t j = 0; j < n; ++j) {  // transpose the key block: kt[d, j]
      const float* kr = c.k + (j0 + j) * c.k_stride;
      for (int64_t d = 0; d < D; ++d) c.kt[d * kBlock + j] = kr[d];
    }
    for (int64_t j = n; j < kBlock; ++j) {
      for (int64_t d = 0; d < D; ++d) c.kt[d * kBlock + j] = 0.0f;
    }
    for (int64_t r = 0; r < R; r += 2) {
      const int64_t r1 = std::min(r + 1, R - 1);  // an odd last row is paired with itself
      float* st0 = c.state + r * W;
      float* st1 = c.state + r1 * W;
      score_pair(c.q + r * D, c.q + r1 * D, c.kt, D, s0, s1);
      const float c0 = softmax_update(s0, n, st0 + D, st0 + D + 1);
      if (r1 == r) {  // odd last row: both halves of the pair compute (and store) the same values
        accumulate_pair(s0, s0, c0, c0, c.v, c.v_stride, j0, n, D, st0, st0);
        continue;
      }
      const float c1 = softmax_update(s1, n, st1 + D, st1 + D + 1);
      accumulate_pair(s0, s1, c0, c1, c.v, c.v_stride, j0, n, D, st0, st1);
    }
  }
}

void chunk_generic(const Chunk& c) { chunk_body(c); }

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target("avx2,fma"))) void chunk_haswell(const Chunk& c) { chunk_body(c); }

bool has_haswell() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

void run_chunk(const Chunk& c) {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  if (has_haswell()) return chunk_haswell(c);
#endif
  chunk_generic(c);
}

}  // namespace

at::Tensor window_attn_shared_prefix(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const std::vector<int64_t>& shared_end, double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1);
  const int64_t group = Hq / Hkv, R = group * Tq, W = D + 2;
  // query rows of one (b, KV head) as one contiguous [R, D] tile: (g, i) -> g * Tq + i, the
  // same order as q[b, hkv * group + g, i], scaled once here
  const at::Tensor q_tiles = (q.to(at::kFloat) * scale).contiguous();  // [B, Hq, Tq, D]
  at::Tensor state = at::empty({B, Hq, Tq, W}, q.options().dtype(at::kFloat));
  float* state_data = state.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    if (shared_end[b] > 0) continue;
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
    const int64_t keys = shared_end[b];
    const int64_t want = (2 * threads + B * Hkv - 1) / (B * Hkv);
    chunks[b] = keys == 0 ? 0 : std::max<int64_t>(1, std::min(want, keys / kMinChunk));
    first_item[b + 1] = first_item[b] + chunks[b] * Hkv;
  }
  const int64_t items = first_item[B];
  if (items == 0) return state;
  // partial states of every chunk: [items, R, W]
  std::vector<float> partial(static_cast<size_t>(items * R * W));
  const float* q_data = q_tiles.data_ptr<float>();
  const float* k_data = k.data_ptr<float>();
  const float* v_data = v.data_ptr<float>();
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(static_cast<size_t>(D * kBlock));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = std::upper_bound(first_item.begin(), first_item.end(), item) - first_item.begin() - 1;
      const int64_t local = item - first_item[b];
      const int64_t hkv = local / chunks[b], chunk = local % chunks[b];
      const int64_t keys = shared_end[b];
      const int64_t per = (keys + chunks[b] - 1) / chunks[b];
      Chunk c;
      c.q = q_data + (b * Hq + hkv * group) * Tq * D;
      c.k = k_data + b * k.stride(0) + hkv * k.stride(1);
      c.v = v_data + b * v.stride(0) + hkv * v.stride(1);
      c.k_stride = k.stride(2);
      c.v_stride = v.stride(2);
      c.begin = chunk * per;
      c.end = std::min(keys, c.begin + per);
      c.R = R;
      c.D = D;
      c.state = partial.data() + item * R * W;
      c.kt = kt.data();
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
