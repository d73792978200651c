// CPU fast path of the draft phase: sparrow_cpu::draft_tree (sparrow_kernels/speculative/tree.py build_tree
// with top-k children, over the SparrowDraft layer) and sparrow_cpu::draft_extend
// (SparrowDraft.extend for a few entries). On a CPU a draft step is ~100 tiny tensor ops, each
// costing more in dispatch than in arithmetic; here the same math runs as fused loops per row,
// with at::mm only for the projections. The Python code is the spec (tests compare the two);
// this file must not change what is drafted beyond float rounding, and it does not exist for
// CUDA (a GPU amortises the same launches with CUDA graphs). fp32 only. cpu_draft.py alone
// calls it, but the ops are public: each checks every argument (shapes against each other,
// dtypes, devices, index ranges compared without adding) before it reads or writes anything.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include "checks.h"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

namespace sparrow {
namespace {

// The draft layer's weights, input-major ([in, out]) as SparrowDraft.inference_weights() holds
// them, plus the target's final norm and LM head; passed by name (cpu_draft.py builds the dict).
// With a draft vocabulary (optional entry "vocab": K sorted target ids, EAGLE-3's draft-to-target
// map) lm_head holds only those K rows and drafted tokens are mapped back through it.
struct Layer {
  at::Tensor table;        // [V, H]   fc applied to every normed token embedding
  at::Tensor feature_fc;   // [H, H]   fc's feature half, feature_norm weight folded in
  at::Tensor fuse;         // [F, H]   feature_fuse (EAGLE-3 multi-layer features) or empty
  at::Tensor input_norm;   // [H]
  at::Tensor qkv;          // [H, (Hq + 2 Hkv) D]
  at::Tensor o;            // [Hq D, H]
  at::Tensor post_norm;    // [H]
  at::Tensor gate_up;      // [H, 2 I]
  at::Tensor down;         // [I, H]
  at::Tensor final_norm;   // [H]
  at::Tensor lm_head;      // [K, H]  (nn.Linear layout; K = V without a draft vocabulary)
  at::Tensor vocab;        // [K] int64 strictly increasing target ids, or undefined (identity)
  double eps_feature, eps_input, eps_post, eps_final;
  int64_t Hq, Hkv, D, H, V, K;
  int64_t window, n_anchor;
  float scale;
  std::vector<float> inv_freq;  // [D / 2]
};

constexpr const char* kWeightNames[] = {"table", "feature_fc", "fuse", "input_norm", "qkv", "o",
                                         "post_norm", "gate_up", "down", "final_norm", "lm_head"};

const at::Device kCpu(at::kCPU);

at::Tensor weight(const char* op, const c10::Dict<std::string, at::Tensor>& w, const char* name,
                  const std::vector<DimSpec>& spec) {
  TORCH_CHECK(w.contains(name), op, ": weights has no entry '", name, "'");
  const at::Tensor t = w.at(name);
  const std::string arg = std::string("weights['") + name + "']";
  check_tensor(op, arg, t, spec, {at::kFloat}, kCpu);
  TORCH_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous");
  return t;
}

void check_eps(const char* op, const char* name, double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": ", name, " must be finite and >= 0, got ", eps);
}

// The layer's weights and hyper-parameters, every shape checked against the others: table
// [V, H] fixes V and H, the cache's last dim fixes D (head_dim).
Layer make_layer(const char* op, const c10::Dict<std::string, at::Tensor>& w, double eps_feature, double eps_input,
                 double eps_post, double eps_final, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                 double rope_theta, int64_t window, int64_t n_anchor) {
  const bool has_vocab = w.contains("vocab");
  TORCH_CHECK(w.size() == std::size(kWeightNames) + (has_vocab ? 1 : 0), op, ": weights must hold exactly the "
              "entries table, feature_fc, fuse, input_norm, qkv, o, post_norm, gate_up, down, final_norm, lm_head "
              "and optionally vocab; got ", w.size());
  check_eps(op, "eps_feature", eps_feature);
  check_eps(op, "eps_input", eps_input);
  check_eps(op, "eps_post", eps_post);
  check_eps(op, "eps_final", eps_final);
  TORCH_CHECK(std::isfinite(rope_theta) && rope_theta > 0, op, ": rope_theta must be finite and > 0, got ",
              rope_theta);
  TORCH_CHECK(n_anchor >= 0, op, ": n_anchor must be >= 0, got ", n_anchor);
  TORCH_CHECK(num_heads >= 1 && num_kv_heads >= 1 && num_heads % num_kv_heads == 0, op,
              ": num_heads must be a positive multiple of num_kv_heads >= 1, got num_heads=", num_heads,
              ", num_kv_heads=", num_kv_heads);
  TORCH_CHECK(head_dim >= 2 && head_dim % 2 == 0, op, ": the cache's head dim (cache_k.size(3)) must be even "
              "and >= 2, got ", head_dim);
  int64_t heads_total = 0, qkv_width = 0, q_width = 0;
  TORCH_CHECK(!c10::mul_overflows(num_kv_heads, int64_t{2}, &heads_total) &&
                  !c10::add_overflows(heads_total, num_heads, &heads_total) &&
                  !c10::mul_overflows(heads_total, head_dim, &qkv_width) &&
                  !c10::mul_overflows(num_heads, head_dim, &q_width),
              op, ": (num_heads + 2 num_kv_heads) * head_dim overflows int64 (num_heads=", num_heads,
              ", num_kv_heads=", num_kv_heads, ", head_dim=", head_dim, ")");
  const at::Tensor table = weight(op, w, "table", {{"V", kAnySize}, {"H", kAnySize}});
  const int64_t V = table.size(0), H = table.size(1);
  TORCH_CHECK(V >= 1 && H >= 1, op, ": weights['table'] must be [V, H] with V, H >= 1, got ",
              format_sizes(table.sizes()));
  const at::Tensor fuse_t = w.contains("fuse") ? w.at("fuse") : at::Tensor();
  const bool fused = fuse_t.defined() && fuse_t.numel() != 0;
  const at::Tensor gate_up = weight(op, w, "gate_up", {{"H", H}, {"2I", kAnySize}});
  TORCH_CHECK(gate_up.size(1) % 2 == 0, op, ": weights['gate_up'] must be [H, 2 I] (even width), got ",
              format_sizes(gate_up.sizes()));
  const int64_t I = gate_up.size(1) / 2;
  at::Tensor vocab;
  int64_t K = V;
  if (has_vocab) {
    vocab = w.at("vocab");
    check_tensor(op, "weights['vocab']", vocab, {{"K", kAnySize}}, {at::kLong}, kCpu);
    TORCH_CHECK(vocab.is_contiguous(), op, ": weights['vocab'] must be contiguous");
    K = vocab.size(0);
    TORCH_CHECK(K >= 1 && K <= V, op, ": weights['vocab'] must hold 1 to V=", V, " ids, got ", K);
    const int64_t* ids = vocab.data_ptr<int64_t>();
    for (int64_t i = 0; i < K; ++i) {
      TORCH_CHECK(ids[i] >= 0 && ids[i] < V, op, ": weights['vocab'][", i, "]=", ids[i], " is outside [0, V=", V,
                  ")");
      TORCH_CHECK(i == 0 || ids[i] > ids[i - 1], op, ": weights['vocab'] must be strictly increasing, but entry ", i,
                  " (", ids[i], ") follows ", ids[i - 1]);
    }
  }
  Layer L{table,
          weight(op, w, "feature_fc", {{"H", H}, {"H", H}}),
          fused ? weight(op, w, "fuse", {{"F", kAnySize}, {"H", H}}) : weight(op, w, "fuse", {{"empty", 0}}),
          weight(op, w, "input_norm", {{"H", H}}),
          weight(op, w, "qkv", {{"H", H}, {"(num_heads + 2 num_kv_heads) head_dim", qkv_width}}),
          weight(op, w, "o", {{"num_heads head_dim", q_width}, {"H", H}}),
          weight(op, w, "post_norm", {{"H", H}}),
          gate_up,
          weight(op, w, "down", {{"I", I}, {"H", H}}),
          weight(op, w, "final_norm", {{"H", H}}),
          weight(op, w, "lm_head", {{has_vocab ? "K (the vocab's size)" : "V", K}, {"H", H}}),
          vocab,
          eps_feature, eps_input, eps_post, eps_final, num_heads, num_kv_heads, head_dim, H, V, K, window, n_anchor,
          static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim))), {}};
  L.inv_freq.resize(head_dim / 2);
  for (int64_t i = 0; i < head_dim / 2; ++i) {
    // as torch computes theta ** (-arange(0, D, 2) / D) in float32
    const float exponent = -static_cast<float>(2 * i) / static_cast<float>(head_dim);
    L.inv_freq[i] = std::pow(static_cast<float>(rope_theta), exponent);
  }
  return L;
}

// cache_k / cache_v: contiguous float32 CPU [B, num_kv_heads, capacity, D] of the same shape.
void check_cache(const char* op, const at::Tensor& cache_k, const at::Tensor& cache_v, int64_t B,
                 int64_t num_kv_heads) {
  check_tensor(op, "cache_k", cache_k, {{"B", B}, {"num_kv_heads", num_kv_heads}, {"capacity", kAnySize},
                                        {"D", kAnySize}}, {at::kFloat}, kCpu);
  check_tensor(op, "cache_v", cache_v, {{"B", B}, {"num_kv_heads", num_kv_heads}, {"capacity", cache_k.size(2)},
                                        {"D", cache_k.size(3)}}, {at::kFloat}, kCpu);
  TORCH_CHECK(cache_k.is_contiguous() && cache_v.is_contiguous(), op, ": cache_k and cache_v must be contiguous");
}

// 0 <= lengths[b] <= capacity and `extra` more slots fit: extra <= capacity - lengths[b] (no addition).
void check_room(const char* op, int64_t b, int64_t prefix, int64_t extra, int64_t capacity, const char* what) {
  TORCH_CHECK(prefix >= 0 && prefix <= capacity, op, ": lengths[", b, "] must be in [0, capacity=", capacity,
              "], got ", prefix);
  TORCH_CHECK(extra <= capacity - prefix, op, ": row ", b, " has lengths[", b, "]=", prefix, " committed slots and ",
              "needs ", extra, " more ", what, ", but the draft cache capacity is ", capacity);
}

// y[t] = x[t] / rms(x[t]) * weight (weight may be undefined = 1), rows of width H.
void rms_rows(const float* x, float* y, int64_t T, int64_t H, double eps, const float* weight) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * H;
    float* yr = y + t * H;
    float sum = 0.f;
    for (int64_t d = 0; d < H; ++d) sum += xr[d] * xr[d];
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(H) + static_cast<float>(eps));
    if (weight) {
      for (int64_t d = 0; d < H; ++d) yr[d] = xr[d] * inv * weight[d];
    } else {
      for (int64_t d = 0; d < H; ++d) yr[d] = xr[d] * inv;
    }
  }
}

inline float* fptr(const at::Tensor& t) { return t.data_ptr<float>(); }

// Rotate-half RoPE of `n_heads` heads of width D in place, row layout [n_heads, D].
void rope(float* heads, int64_t n_heads, int64_t D, int64_t position, const std::vector<float>& inv_freq) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float angle = static_cast<float>(position) * inv_freq[i];
    const float c = std::cos(angle), s = std::sin(angle);
    for (int64_t h = 0; h < n_heads; ++h) {
      float* x = heads + h * D;
      const float x1 = x[i], x2 = x[i + half];
      x[i] = x1 * c - x2 * s;
      x[i + half] = x2 * c + x1 * s;
    }
  }
}

// The keys one query sees: prefix slots [0, prefix_len) under the window rule at `pos`
// (slot j <= pos and (window <= 0 or j > pos - window or j < n_anchor)), then `extra` slots.
struct QueryKeys {
  int64_t pos;
  int64_t prefix_len;
  std::vector<int64_t> extra;
};

// Attention of T queries (q [T, Hq, D]) over the row's cache k, v ([Hkv, capacity, D] each,
// row pointers) -> out [T, Hq * D]. Online softmax in float.
void attend(const Layer& L, const float* q, const float* k, const float* v, int64_t capacity,
            const std::vector<QueryKeys>& keys, float* out) {
  const int64_t T = static_cast<int64_t>(keys.size()), Hq = L.Hq, D = L.D, group = L.Hq / L.Hkv;
  int64_t total_keys = 0;
  for (const auto& qk : keys) total_keys += qk.prefix_len + static_cast<int64_t>(qk.extra.size());
  const int64_t grain = total_keys * Hq > 65536 ? 1 : T * Hq;  // parallel only when it pays
  at::parallel_for(0, T * Hq, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / Hq, h = item % Hq, kvh = h / group;
      const QueryKeys& qk = keys[t];
      const float* qv = q + (t * Hq + h) * D;
      const float* kb = k + kvh * capacity * D;
      const float* vb = v + kvh * capacity * D;
      float running_max = -std::numeric_limits<float>::infinity(), denom = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      auto visit = [&](int64_t slot) {
        const float* kr = kb + slot * D;
        float s = 0.f;
        for (int64_t d = 0; d < D; ++d) s += qv[d] * kr[d];
        s *= L.scale;
        if (s > running_max) {
          const float correction = std::exp(running_max - s);
          denom *= correction;
          for (int64_t d = 0; d < D; ++d) acc[d] *= correction;
          running_max = s;
        }
        const float p = std::exp(s - running_max);
        denom += p;
        const float* vr = vb + slot * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += p * vr[d];
      };
      // slots [0, min(prefix_len, pos + 1)), written without pos + 1 (pos may be any int64)
      const int64_t prefix_end = qk.pos < 0 ? 0 : (qk.pos >= qk.prefix_len ? qk.prefix_len : qk.pos + 1);
      const int64_t anchor_end = std::min(L.n_anchor, prefix_end);
      const int64_t window_begin = (L.window > 0 && qk.pos >= L.window) ? qk.pos - L.window + 1 : 0;
      for (int64_t j = 0; j < anchor_end; ++j) visit(j);
      for (int64_t j = std::max(window_begin, anchor_end); j < prefix_end; ++j) visit(j);
      for (int64_t slot : qk.extra) visit(slot);
      float* o = out + t * Hq * D + h * D;
      const float inv = denom > 0.f ? 1.f / denom : 0.f;
      for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv;
    }
  });
}

// One draft-layer forward for T entries of one row: layer input x [T, H] at `positions`,
// k/v written to `slots` of the row cache, attention by `keys` -> hidden [T, H].
at::Tensor layer_forward(const Layer& L, const at::Tensor& x, const std::vector<int64_t>& positions,
                         const std::vector<int64_t>& slots, float* k_row, float* v_row, int64_t capacity,
                         const std::vector<QueryKeys>& keys) {
  const int64_t T = x.size(0), H = L.H, D = L.D, Hq = L.Hq, Hkv = L.Hkv;
  at::Tensor h = at::empty({T, H}, x.options());
  rms_rows(fptr(x), fptr(h), T, H, L.eps_input, fptr(L.input_norm));
  at::Tensor heads = at::mm(h, L.qkv);                                 // [T, (Hq + 2 Hkv) D]
  const int64_t width = (Hq + 2 * Hkv) * D;
  float* hp = fptr(heads);
  for (int64_t t = 0; t < T; ++t) {
    float* row = hp + t * width;
    rope(row, Hq + Hkv, D, positions[t], L.inv_freq);                  // q and k heads
    for (int64_t g = 0; g < Hkv; ++g) {
      std::copy_n(row + (Hq + g) * D, D, k_row + (g * capacity + slots[t]) * D);
      std::copy_n(row + (Hq + Hkv + g) * D, D, v_row + (g * capacity + slots[t]) * D);
    }
  }
  at::Tensor q = at::empty({T, Hq * D}, x.options());
  for (int64_t t = 0; t < T; ++t) std::copy_n(hp + t * width, Hq * D, fptr(q) + t * Hq * D);
  at::Tensor attn = at::empty({T, Hq * D}, x.options());
  attend(L, fptr(q), k_row, v_row, capacity, keys, fptr(attn));
  at::Tensor resid = x + at::mm(attn, L.o);                           // [T, H]
  rms_rows(fptr(resid), fptr(h), T, H, L.eps_post, fptr(L.post_norm));
  at::Tensor gu = at::mm(h, L.gate_up);                                // [T, 2 I]
  const int64_t I = gu.size(1) / 2;
  at::Tensor act = at::empty({T, I}, x.options());
  for (int64_t t = 0; t < T; ++t) {
    const float* g = fptr(gu) + t * 2 * I;
    const float* u = g + I;
    float* a = fptr(act) + t * I;
    for (int64_t i = 0; i < I; ++i) a[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  }
  return resid + at::mm(act, L.down);                                  // [T, H]
}

// Layer input: table[token] + (fused / rms(fused)) @ feature_fc, fused [T, H].
at::Tensor input_states(const Layer& L, const std::vector<int64_t>& tokens, const at::Tensor& fused) {
  const int64_t T = fused.size(0), H = L.H;
  at::Tensor f = at::empty({T, H}, fused.options());
  rms_rows(fptr(fused), fptr(f), T, H, L.eps_feature, nullptr);
  at::Tensor x = at::mm(f, L.feature_fc);
  float* xp = fptr(x);
  const float* table = fptr(L.table);
  for (int64_t t = 0; t < T; ++t) {
    const float* row = table + tokens[t] * H;
    for (int64_t d = 0; d < H; ++d) xp[t * H + d] = row[d] + xp[t * H + d];
  }
  return x;
}

// Log-probabilities [T, K] of draft hidden [T, H] through the target's final norm + LM head (rows
// of the draft vocabulary; column i is target id vocab_id(L, i)).
at::Tensor log_probs(const Layer& L, const at::Tensor& hidden) {
  const int64_t T = hidden.size(0), H = L.H;
  at::Tensor h = at::empty({T, H}, hidden.options());
  rms_rows(fptr(hidden), fptr(h), T, H, L.eps_final, fptr(L.final_norm));
  at::Tensor logits = at::mm(h, L.lm_head.t());                        // [T, K]
  float* lp = fptr(logits);
  const int64_t V = logits.size(1);                                    // K columns
  for (int64_t t = 0; t < T; ++t) {
    float* row = lp + t * V;
    const float m = *std::max_element(row, row + V);
    float sum = 0.f;
    for (int64_t i = 0; i < V; ++i) sum += std::exp(row[i] - m);
    const float lse = m + std::log(sum);
    for (int64_t i = 0; i < V; ++i) row[i] -= lse;
  }
  return logits;
}

inline int64_t vocab_id(const Layer& L, int64_t column) {
  return L.vocab.defined() ? L.vocab.data_ptr<int64_t>()[column] : column;
}

// Indices of the `count` largest of values[0..n), largest first, ties to the lower index.
std::vector<int64_t> top_indices(const float* values, int64_t n, int64_t count) {
  std::vector<int64_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  auto better = [&](int64_t a, int64_t b) { return values[a] > values[b] || (values[a] == values[b] && a < b); };
  count = std::min(count, n);
  std::partial_sort(idx.begin(), idx.begin() + count, idx.end(), better);
  idx.resize(count);
  return idx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> draft_tree(
    const c10::Dict<std::string, at::Tensor>& weights, at::Tensor cache_k, at::Tensor cache_v,
    const at::Tensor& lengths, const at::Tensor& root_tokens, const at::Tensor& root_hidden, at::IntArrayRef widths,
    at::IntArrayRef counts, int64_t n_draft, double eps_feature, double eps_input, double eps_post, double eps_final,
    int64_t num_heads, int64_t num_kv_heads, double rope_theta, int64_t window, int64_t n_anchor) {
  const char* op = "sparrow_cpu.draft_tree";
  check_tensor(op, "root_tokens", root_tokens, {{"B", kAnySize}}, {at::kLong}, kCpu);
  const int64_t B = root_tokens.size(0);
  check_cache(op, cache_k, cache_v, B, num_kv_heads);
  const Layer L = make_layer(op, weights, eps_feature, eps_input, eps_post, eps_final, num_heads, num_kv_heads,
                             cache_k.size(3), rope_theta, window, n_anchor);
  const int64_t H = L.H, capacity = cache_k.size(2);
  check_tensor(op, "lengths", lengths, {{"B", B}}, {at::kLong}, kCpu);
  check_tensor(op, "root_hidden", root_hidden, {{"B", B}, {"H", H}}, {at::kFloat}, kCpu);
  // levels: widths[0] = 1 (the root); level l expands widths[l] <= widths[l-1] * counts[l-1] of
  // the previous level's candidates (all exist); counts[l] <= K children each (top-k of the K
  // ids the draft proposes: V, or the draft vocabulary's size)
  TORCH_CHECK(widths.size() == counts.size() && !widths.empty() && widths[0] == 1, op,
              ": widths and counts must have the same length >= 1 with widths[0] == 1, got widths ",
              format_sizes(widths), ", counts ", format_sizes(counts));
  const int64_t levels = static_cast<int64_t>(widths.size());
  int64_t pool_size = 0, scratch = 0;
  for (int64_t l = 0; l < levels; ++l) {
    TORCH_CHECK(counts[l] >= 1 && counts[l] <= L.K, op, ": counts[", l, "] must be in [1, ", L.K,
                "] (the draft's vocabulary size), got ", counts[l]);
    TORCH_CHECK(widths[l] >= 1, op, ": widths[", l, "] must be >= 1, got ", widths[l]);
    if (l > 0) {
      int64_t prev_level = 0;     // candidates of level l - 1 (saturates: only bounds widths[l])
      if (c10::mul_overflows(widths[l - 1], counts[l - 1], &prev_level)) prev_level = INT64_MAX;
      TORCH_CHECK(widths[l] <= prev_level, op, ": widths[", l, "] must be <= widths[", l - 1, "] * counts[", l - 1,
                  "] = ", prev_level, " (the candidates it expands), got ", widths[l]);
      TORCH_CHECK(widths[l] <= capacity - scratch, op, ": the scratch nodes (sum of widths[1:]) exceed the draft ",
                  "cache capacity ", capacity, " at widths[", l, "]=", widths[l]);
      scratch += widths[l];
    }
    int64_t level_pool = 0;
    TORCH_CHECK(!c10::mul_overflows(widths[l], counts[l], &level_pool) &&
                    !c10::add_overflows(pool_size, level_pool, &pool_size),
                op, ": the candidate pool (sum of widths * counts) overflows int64");
  }
  TORCH_CHECK(n_draft >= 1 && n_draft <= pool_size, op, ": n_draft must be in [1, ", pool_size,
              "] (the candidate pool), got ", n_draft);
  {
    const at::Tensor len_chk = lengths.contiguous();
    const int64_t* len_p = len_chk.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) check_room(op, b, len_p[b], scratch, capacity, "scratch slots");
  }
  const at::Tensor len_c = lengths.contiguous(), root_c = root_tokens.contiguous(),
                   rh_c = root_hidden.contiguous();
  const int64_t N = n_draft + 1;
  auto i64 = at::TensorOptions().dtype(at::kLong);
  at::Tensor tokens = at::empty({B, N}, i64), parents = at::empty({B, N}, i64), depth = at::empty({B, N}, i64);
  at::Tensor next_token = at::empty({B, N}, i64), next_sibling = at::empty({B, N}, i64);
  at::Tensor scores = at::empty({B, N}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor tree_mask = at::zeros({B, N, N}, at::TensorOptions().dtype(at::kBool));

  for (int64_t b = 0; b < B; ++b) {
    const int64_t prefix = len_c.data_ptr<int64_t>()[b];     // checked above: prefix + scratch <= capacity
    float* k_row = fptr(cache_k) + b * cache_k.stride(0);
    float* v_row = fptr(cache_v) + b * cache_v.stride(0);
    // the pool: every drafted candidate, level by level (root's children first)
    std::vector<int64_t> pool_token, pool_parent;
    std::vector<float> pool_score;
    at::Tensor root_h = rh_c[b].unsqueeze(0).contiguous();                // [1, H]
    at::Tensor logp = log_probs(L, root_h);                               // [1, K]
    for (int64_t i : top_indices(fptr(logp), L.K, counts[0])) {
      pool_token.push_back(vocab_id(L, i));
      pool_score.push_back(fptr(logp)[i]);
      pool_parent.push_back(-1);
    }
    int64_t level_start = 0, level_size = counts[0], child_count = counts[0];
    at::Tensor predictor = root_h;                                        // hidden that predicted each level node
    bool root_level = true;
    std::vector<std::vector<char>> frontier_rows;                         // scratch-node visibility per frontier node
    std::vector<int64_t> scratch_slots;
    int64_t scratch_used = 0;
    for (int64_t l = 1; l < levels; ++l) {
      const int64_t w = widths[l], c = counts[l];
      const std::vector<int64_t> local = top_indices(pool_score.data() + level_start, level_size, w);
      std::vector<int64_t> frontier(w), frontier_tokens(w), slot(w);
      std::vector<float> frontier_scores(w);
      at::Tensor prev = at::empty({w, H}, root_h.options());
      for (int64_t i = 0; i < w; ++i) {
        frontier[i] = level_start + local[i];
        frontier_tokens[i] = pool_token[frontier[i]];
        frontier_scores[i] = pool_score[frontier[i]];
        slot[i] = root_level ? 0 : local[i] / child_count;
        std::copy_n(fptr(predictor) + slot[i] * H, H, fptr(prev) + i * H);
      }
      const int64_t M = scratch_used + w;
      std::vector<std::vector<char>> rows(w, std::vector<char>(M, 0));
      for (int64_t i = 0; i < w; ++i) {
        if (!root_level) std::copy(frontier_rows[slot[i]].begin(), frontier_rows[slot[i]].end(), rows[i].begin());
        rows[i][scratch_used + i] = 1;
      }
      const int64_t position = prefix + l - 1;
      std::vector<int64_t> positions(w, position), slots(w);
      for (int64_t i = 0; i < w; ++i) slots[i] = prefix + scratch_used + i;
      for (int64_t i = 0; i < w; ++i) scratch_slots.push_back(position);  // scratch slot -> position
      std::vector<QueryKeys> keys(w);
      for (int64_t i = 0; i < w; ++i) {
        keys[i].pos = position;
        keys[i].prefix_len = prefix;
        for (int64_t m = 0; m < M; ++m) {
          const int64_t key_pos = scratch_slots[m];
          const bool in_window = L.window <= 0 || key_pos >= position - L.window + 1 || key_pos < L.n_anchor;
          if (rows[i][m] && in_window) keys[i].extra.push_back(prefix + m);
        }
      }
      const at::Tensor x = input_states(L, frontier_tokens, prev);
      const at::Tensor hidden = layer_forward(L, x, positions, slots, k_row, v_row, capacity, keys);
      const at::Tensor lp = log_probs(L, hidden);                         // [w, K]
      for (int64_t i = 0; i < w; ++i) {
        const float* row = fptr(lp) + i * L.K;
        for (int64_t t : top_indices(row, L.K, c)) {
          pool_token.push_back(vocab_id(L, t));
          pool_score.push_back(frontier_scores[i] + row[t]);
          pool_parent.push_back(frontier[i]);
        }
      }
      frontier_rows = std::move(rows);
      predictor = hidden;
      root_level = false;
      scratch_used = M;
      level_start += level_size;
      level_size = w * c;
      child_count = c;
    }
    const int64_t P = static_cast<int64_t>(pool_token.size());
    // keep the n_draft best (stable: equal scores keep pool order), then number in pool order
    std::vector<int64_t> order(P);
    std::iota(order.begin(), order.end(), 0);
    if (n_draft < P) {
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return pool_score[a] > pool_score[c]; });
      order.resize(n_draft);
      std::sort(order.begin(), order.end());
    }
    std::vector<int64_t> node_of_pool(P, -1);
    for (int64_t i = 0; i < n_draft; ++i) node_of_pool[order[i]] = i + 1;
    int64_t* tok = tokens.data_ptr<int64_t>() + b * N;
    int64_t* par = parents.data_ptr<int64_t>() + b * N;
    int64_t* dep = depth.data_ptr<int64_t>() + b * N;
    float* sc = scores.data_ptr<float>() + b * N;
    tok[0] = root_c.data_ptr<int64_t>()[b];
    par[0] = -1;
    sc[0] = 0.f;
    dep[0] = 0;
    for (int64_t i = 0; i < n_draft; ++i) {
      const int64_t p = order[i];
      tok[i + 1] = pool_token[p];
      sc[i + 1] = pool_score[p];
      const int64_t parent_pool = pool_parent[p];
      par[i + 1] = parent_pool < 0 ? 0 : node_of_pool[parent_pool];
      TORCH_CHECK(par[i + 1] >= 0, op, ": the kept nodes are not ancestor-closed (NaN scores?)");
      dep[i + 1] = dep[par[i + 1]] + 1;
    }
    // layout: ancestor-or-self mask, first child, next sibling (by index)
    bool* mask = tree_mask.data_ptr<bool>() + b * N * N;
    int64_t* first = next_token.data_ptr<int64_t>() + b * N;
    int64_t* sibling = next_sibling.data_ptr<int64_t>() + b * N;
    std::vector<int64_t> last_child(N, -1);
    for (int64_t i = 0; i < N; ++i) {
      first[i] = -1;
      sibling[i] = -1;
    }
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t a = i; a >= 0; a = par[a]) mask[i * N + a] = true;
      if (i > 0) {
        const int64_t p = par[i];
        if (last_child[p] < 0) first[p] = i; else sibling[last_child[p]] = i;
        last_child[p] = i;
      }
    }
  }
  return {tokens, parents, scores, depth, tree_mask, next_token, next_sibling};
}

// SparrowDraft.extend for entries [0, valid[b]) of each row (the engine's commit after a
// verification, 1..depth+2 entries): returns hidden [B, T, H], zero at padding entries.
at::Tensor draft_extend(const c10::Dict<std::string, at::Tensor>& weights, at::Tensor cache_k, at::Tensor cache_v,
                        at::Tensor lengths, const at::Tensor& tokens, const at::Tensor& features,
                        const at::Tensor& valid, double eps_feature, double eps_input, double eps_post,
                        double eps_final, int64_t num_heads, int64_t num_kv_heads, double rope_theta, int64_t window,
                        int64_t n_anchor) {
  const char* op = "sparrow_cpu.draft_extend";
  check_tensor(op, "tokens", tokens, {{"B", kAnySize}, {"T", kAnySize}}, {at::kLong}, kCpu);
  const int64_t B = tokens.size(0), T = tokens.size(1);
  check_cache(op, cache_k, cache_v, B, num_kv_heads);
  const Layer L = make_layer(op, weights, eps_feature, eps_input, eps_post, eps_final, num_heads, num_kv_heads,
                             cache_k.size(3), rope_theta, window, n_anchor);
  const int64_t H = L.H, capacity = cache_k.size(2);
  check_tensor(op, "lengths", lengths, {{"B", B}}, {at::kLong}, kCpu);
  TORCH_CHECK(lengths.is_contiguous(), op, ": lengths must be contiguous (it is updated in place)");
  const int64_t F = L.fuse.numel() ? L.fuse.size(0) : H;
  check_tensor(op, "features", features, {{"B", B}, {"T", T}, {L.fuse.numel() ? "F" : "H", F}}, {at::kFloat}, kCpu);
  check_tensor(op, "valid", valid, {{"B", B}}, {at::kLong}, kCpu);
  const at::Tensor tok_c = tokens.contiguous(), feat_c = features.contiguous(), valid_c = valid.contiguous();
  {   // every row fits before any is written (no partial update on error)
    const int64_t* len_p = lengths.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = std::min<int64_t>(std::max<int64_t>(valid_c.data_ptr<int64_t>()[b], 0), T);
      check_room(op, b, len_p[b], n, capacity, "entries (valid[b], at most T)");
    }
  }
  at::Tensor out = at::zeros({B, T, H}, features.options());
  int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = std::min<int64_t>(std::max<int64_t>(valid_c.data_ptr<int64_t>()[b], 0), T);
    const int64_t prefix = len[b];                                          // checked above: prefix + n <= capacity
    if (n == 0) continue;
    at::Tensor fused = feat_c[b].narrow(0, 0, n);                          // [n, F]
    fused = L.fuse.numel() ? at::mm(fused, L.fuse) : fused.contiguous();   // [n, H]
    std::vector<int64_t> row_tokens(n), positions(n);
    std::vector<QueryKeys> keys(n);
    for (int64_t t = 0; t < n; ++t) {
      row_tokens[t] = std::min<int64_t>(std::max<int64_t>(tok_c.data_ptr<int64_t>()[b * T + t], 0), L.V - 1);
      positions[t] = prefix + t;
      keys[t] = QueryKeys{prefix + t, prefix + n, {}};
    }
    const at::Tensor x = input_states(L, row_tokens, fused);
    const at::Tensor hidden = layer_forward(L, x, positions, positions, fptr(cache_k) + b * cache_k.stride(0),
                                            fptr(cache_v) + b * cache_v.stride(0), capacity, keys);
    out[b].narrow(0, 0, n).copy_(hidden);
    len[b] = prefix + n;
  }
  return out;
}

}  // namespace
}  // namespace sparrow

TORCH_LIBRARY(sparrow_cpu, m) {
  m.def(
      "draft_tree(Dict(str, Tensor) weights, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor lengths, "
      "Tensor root_tokens, Tensor root_hidden, int[] widths, int[] counts, int n_draft, float eps_feature, "
      "float eps_input, float eps_post, float eps_final, int num_heads, int num_kv_heads, float rope_theta, "
      "int window, int n_anchor) -> (Tensor tokens, Tensor parents, Tensor scores, Tensor depth, "
      "Tensor tree_mask, Tensor next_token, Tensor next_sibling)");
  m.def(
      "draft_extend(Dict(str, Tensor) weights, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor(c!) lengths, "
      "Tensor tokens, Tensor features, Tensor valid, float eps_feature, float eps_input, float eps_post, "
      "float eps_final, int num_heads, int num_kv_heads, float rope_theta, int window, int n_anchor) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparrow_cpu, CPU, m) {
  m.impl("draft_tree", &sparrow::draft_tree);
  m.impl("draft_extend", &sparrow::draft_extend);
}
