// CPU kernels of sparrow::window_attn and sparrow::window_attn_backward (docs/ops.md).
// Each query visits only its visible keys (anchors, window, tree nodes), so the cost is
// O(Tq * (window + n_anchor + Tq)), not O(Tq * Tk); fp32 accumulation (fp64 for fp64 inputs).
// Inputs are validated by csrc/checks.h only; this file must not change the op semantics.
// fp32: a contiguous range of keys that every query of a row sees (inside all their windows,
// past the anchors; a long visual prefix) is first scored for all queries at once by
// csrc/window_attn_shared.cpp; each query then continues from that online-softmax state over
// its own remaining keys (anchors, the rest of its window, tree slots).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "window_attn_shared.h"

namespace sparrow {
namespace {

constexpr int64_t kKeyBlock = 32;  // keys scored together (one softmax rescale per block)

// The key slots one query sees, in increasing order: the anchors [0, anchor_end), the
// window [window_begin, prefix_end), then the tree slots whose tree_mask entry is set.
struct VisibleKeys {
  int64_t anchor_end = 0;
  int64_t window_begin = 0;
  int64_t prefix_end = 0;
  int64_t tree_start = 0;      // slot of tree node 0
  const bool* tree_row = nullptr;  // tree_mask[b, i, :] or nullptr
  int64_t n_tree = 0;
  int64_t skip_begin = 0;      // window slots [skip_begin, skip_end) are already done (shared phase)
  int64_t skip_end = 0;

  // Calls process(n) for consecutive blocks of up to kKeyBlock visible slots written to `slots`.
  template <typename F>
  void for_each_block(int64_t* slots, F&& process) const {
    int64_t n = 0;
    auto push = [&](int64_t slot) {
      slots[n++] = slot;
      if (n == kKeyBlock) {
        process(n);
        n = 0;
      }
    };
    for (int64_t j = 0; j < anchor_end; ++j) push(j);
    const int64_t first = std::max(window_begin, anchor_end);
    if (skip_end > skip_begin) {  // the skipped range lies inside [first, prefix_end)
      for (int64_t j = first; j < std::min(skip_begin, prefix_end); ++j) push(j);
      for (int64_t j = std::max(first, skip_end); j < prefix_end; ++j) push(j);
    } else {
      for (int64_t j = first; j < prefix_end; ++j) push(j);
    }
    for (int64_t t = 0; t < n_tree; ++t) {
      if (tree_row[t]) push(tree_start + t);
    }
    if (n > 0) process(n);
  }
};

// Visibility of query i of row b (docs/ops.md, window_attn), as slot ranges. Written so that
// no int64 expression overflows for any q_pos / window value.
VisibleKeys visible_keys(int64_t kv_len, int64_t pos, int64_t window, int64_t n_anchor, const bool* tree_row,
                         int64_t Tq) {
  VisibleKeys keys;
  const int64_t prefix_len = tree_row ? kv_len - Tq : kv_len;  // slots under the window rule
  keys.prefix_end = pos < 0 ? 0 : (pos >= prefix_len ? prefix_len : pos + 1);  // j < prefix_len, j <= pos
  keys.anchor_end = std::min(n_anchor, keys.prefix_end);
  keys.window_begin = (window > 0 && pos >= window) ? pos - window + 1 : 0;
  if (tree_row) {
    keys.tree_start = prefix_len;
    keys.tree_row = tree_row;
    keys.n_tree = Tq;
  }
  return keys;
}

template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  // 8 partial sums: lets the compiler vectorize without reassociating a single chain
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    for (int u = 0; u < 8; ++u) part[u] += a[d + u] * b[d + u];
  }
  for (; d < n; ++d) part[0] += a[d] * b[d];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

template <typename acc_t>
inline void axpy(acc_t alpha, const acc_t* x, acc_t* y, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += alpha * x[d];
}

// Rows `slots[0..n)` of a [Tk, D] slice (row stride `stride`, unit last stride) as acc_t
// pointers: direct for acc_t inputs, converted into `buffer` [kKeyBlock, D] otherwise.
template <typename scalar_t, typename acc_t>
inline void load_rows(const scalar_t* base, int64_t stride, const int64_t* slots, int64_t n, int64_t D,
                      acc_t* buffer, const acc_t** rows) {
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* src = base + slots[r] * stride;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      rows[r] = src;
    } else {
      acc_t* dst = buffer + r * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d]);
      rows[r] = dst;
    }
  }
}

template <typename scalar_t, typename acc_t>
inline void load_vector(const scalar_t* src, int64_t D, acc_t* dst) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d]);
}

double resolve_scale(double scale, int64_t D) {
  return scale > 0 ? scale : 1.0 / std::sqrt(static_cast<double>(D));
}

// Host copies of the small per-row inputs (contiguous).
struct RowInputs {
  at::Tensor kv_len, q_pos, tree_mask;
  RowInputs(const at::Tensor& kv_len_, const at::Tensor& q_pos_, const c10::optional<at::Tensor>& tree_mask_)
      : kv_len(kv_len_.contiguous()), q_pos(q_pos_.contiguous()) {
    if (tree_mask_.has_value() && tree_mask_->defined()) tree_mask = tree_mask_->contiguous();
  }
  VisibleKeys keys(int64_t b, int64_t i, int64_t Tq, int64_t window, int64_t n_anchor) const {
    const bool* tree_row = tree_mask.defined() ? tree_mask.data_ptr<bool>() + (b * Tq + i) * Tq : nullptr;
    return visible_keys(kv_len.data_ptr<int64_t>()[b], q_pos.data_ptr<int64_t>()[b * Tq + i], window, n_anchor,
                        tree_row, Tq);
  }
};

// ------------------------------------------------------------------------------ forward
template <typename scalar_t>
void window_attn_forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const RowInputs& rows,
                                int64_t window, int64_t n_anchor, double scale, at::Tensor& out, at::Tensor& lse,
                                const std::vector<int64_t>& shared_begin = {},
                                const std::vector<int64_t>& shared_end = {}, const at::Tensor& shared = {}) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1);
  const int64_t group = Hq / Hkv;
  const acc_t softmax_scale = static_cast<acc_t>(scale);
  const scalar_t* q_data = q.data_ptr<scalar_t>();
  const scalar_t* k_data = k.data_ptr<scalar_t>();
  const scalar_t* v_data = v.data_ptr<scalar_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();  // [B, Hq, Tq, D] contiguous
  acc_t* lse_data = lse.data_ptr<acc_t>();        // [B, Hq, Tq] contiguous

  // work item = (b, kv head, query i): the group's query heads share every loaded key block
  at::parallel_for(0, B * Hkv * Tq, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> k_buffer(kKeyBlock * D), v_buffer(kKeyBlock * D);
    std::vector<acc_t> q_rows(group * D), acc(group * D), row_max(group), row_sum(group);
    std::vector<acc_t> scores(kKeyBlock);
    const acc_t* k_rows[kKeyBlock];
    const acc_t* v_rows[kKeyBlock];
    int64_t slots[kKeyBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item % Tq, hkv = (item / Tq) % Hkv, b = item / (Tq * Hkv);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hkv * group + g;
        load_vector(q_data + b * q.stride(0) + h * q.stride(1) + i * q.stride(2), D, q_rows.data() + g * D);
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
      VisibleKeys keys = rows.keys(b, i, Tq, window, n_anchor);
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (shared.defined() && shared_end[b] > shared_begin[b]) {  // continue from the shared phase's state
          const int64_t W = D + 2;
          for (int64_t g = 0; g < group; ++g) {
            const float* st = shared.data_ptr<float>() + ((b * Hq + hkv * group + g) * Tq + i) * W;
            std::copy(st, st + D, acc.begin() + g * D);
            row_max[g] = st[D];
            row_sum[g] = st[D + 1];
          }
          keys.skip_begin = shared_begin[b];
          keys.skip_end = shared_end[b];
        }
      }
      const scalar_t* k_base = k_data + b * k.stride(0) + hkv * k.stride(1);
      const scalar_t* v_base = v_data + b * v.stride(0) + hkv * v.stride(1);

      keys.for_each_block(slots, [&](int64_t n) {
        load_rows(k_base, k.stride(2), slots, n, D, k_buffer.data(), k_rows);
        load_rows(v_base, v.stride(2), slots, n, D, v_buffer.data(), v_rows);
        for (int64_t g = 0; g < group; ++g) {
          const acc_t* q_row = q_rows.data() + g * D;
          acc_t block_max = -std::numeric_limits<acc_t>::infinity();
          for (int64_t r = 0; r < n; ++r) {
            scores[r] = dot(q_row, k_rows[r], D) * softmax_scale;
            block_max = std::max(block_max, scores[r]);
          }
          const acc_t new_max = std::max(row_max[g], block_max);
          const acc_t correction = std::exp(row_max[g] - new_max);  // 0 on the first block
          acc_t* acc_row = acc.data() + g * D;
          row_sum[g] *= correction;
          for (int64_t d = 0; d < D; ++d) acc_row[d] *= correction;
          for (int64_t r = 0; r < n; ++r) {
            const acc_t weight = std::exp(scores[r] - new_max);
            row_sum[g] += weight;
            axpy(weight, v_rows[r], acc_row, D);
          }
          row_max[g] = new_max;
        }
      });

      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hkv * group + g;
        const int64_t row = (b * Hq + h) * Tq + i;
        scalar_t* out_row = out_data + row * D;
        const acc_t* acc_row = acc.data() + g * D;
        // row_sum is 0 only without a visible key (the largest weight is exp(0) = 1); a NaN
        // anywhere in a visible score or value leaves it or acc NaN, and NaN must come out
        if (row_sum[g] != acc_t(0)) {
          const acc_t inv = acc_t(1) / row_sum[g];
          for (int64_t d = 0; d < D; ++d) out_row[d] = static_cast<scalar_t>(acc_row[d] * inv);
          lse_data[row] = std::log(row_sum[g]) + row_max[g];
        } else {  // no visible key
          for (int64_t d = 0; d < D; ++d) out_row[d] = scalar_t(0);
          lse_data[row] = -std::numeric_limits<acc_t>::infinity();
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> window_attn_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& kv_len, const at::Tensor& q_pos, int64_t window,
                                                   int64_t n_anchor, const c10::optional<at::Tensor>& tree_mask,
                                                   double scale) {
  check_window_attn_inputs("window_attn", q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, scale);
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2);
  const at::ScalarType lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));  // [B, Hq, Tq, D]
  at::Tensor lse = at::empty({B, Hq, Tq}, q.options().dtype(lse_dtype));                           // [B, Hq, Tq]
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  const RowInputs rows(kv_len, q_pos, tree_mask);
  const double softmax_scale = resolve_scale(scale, q.size(3));
  if (q.scalar_type() == at::kFloat) {
    // per row b: the window slots every query sees, past the anchors (a query's anchors are
    // [0, min(n_anchor, prefix_end)), its window [max(window_begin, anchor_end), prefix_end))
    std::vector<int64_t> shared_begin(B, 0), shared_end(B, 0);
    bool any = false;
    for (int64_t b = 0; b < B; ++b) {
      int64_t lo = std::max<int64_t>(n_anchor, 0), hi = std::numeric_limits<int64_t>::max();
      for (int64_t i = 0; i < Tq; ++i) {
        const VisibleKeys keys = rows.keys(b, i, Tq, window, n_anchor);
        lo = std::max(lo, std::max(keys.window_begin, keys.anchor_end));
        hi = std::min(hi, keys.prefix_end);
      }
      if (hi - lo >= kMinSharedKeys) {
        shared_begin[b] = lo;
        shared_end[b] = hi;
        any = true;
      }
    }
    if (any) {
      const at::Tensor state = window_attn_shared_keys(q, k, v, shared_begin, shared_end, softmax_scale);
      window_attn_forward_kernel<float>(q, k, v, rows, window, n_anchor, softmax_scale, out, lse, shared_begin,
                                        shared_end, state);
      return {out, lse};
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "window_attn_cpu", [&] {
    window_attn_forward_kernel<scalar_t>(q, k, v, rows, window, n_anchor, softmax_scale, out, lse);
  });
  return {out, lse};
}

// ------------------------------------------------------------------------------ backward
// P = exp(S - lse), dS = P * (dO . V - rowsum(dO * O)); dq = scale dS K, dk = scale dS^T Q,
// dv = P^T dO. Work item = (b, kv head): it owns dk, dv of that head (summed over the group's
// query heads) and dq of the group's heads, so no two threads write the same element.
template <typename scalar_t>
void window_attn_backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const RowInputs& rows, int64_t window, int64_t n_anchor, double scale,
                                 at::Tensor& dq, at::Tensor& dk_acc, at::Tensor& dv_acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1), Tk = k.size(2);
  const int64_t group = Hq / Hkv;
  const acc_t softmax_scale = static_cast<acc_t>(scale);
  const scalar_t* q_data = q.data_ptr<scalar_t>();
  const scalar_t* k_data = k.data_ptr<scalar_t>();
  const scalar_t* v_data = v.data_ptr<scalar_t>();
  const scalar_t* grad_data = grad_out.data_ptr<scalar_t>();  // contiguous [B, Hq, Tq, D]
  const scalar_t* out_data = out.data_ptr<scalar_t>();        // contiguous [B, Hq, Tq, D]
  const acc_t* lse_data = lse.data_ptr<acc_t>();              // contiguous [B, Hq, Tq]
  scalar_t* dq_data = dq.data_ptr<scalar_t>();                // contiguous [B, Hq, Tq, D]
  acc_t* dk_data = dk_acc.data_ptr<acc_t>();                  // contiguous [B, Hkv, Tk, D], zeroed
  acc_t* dv_data = dv_acc.data_ptr<acc_t>();

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> k_buffer(kKeyBlock * D), v_buffer(kKeyBlock * D);
    std::vector<acc_t> q_rows(group * D), grad_rows(group * D), dq_rows(group * D);
    std::vector<acc_t> row_lse(group), row_dot(group);
    const acc_t* k_rows[kKeyBlock];
    const acc_t* v_rows[kKeyBlock];
    int64_t slots[kKeyBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t hkv = item % Hkv, b = item / Hkv;
      const scalar_t* k_base = k_data + b * k.stride(0) + hkv * k.stride(1);
      const scalar_t* v_base = v_data + b * v.stride(0) + hkv * v.stride(1);
      acc_t* dk_head = dk_data + (b * Hkv + hkv) * Tk * D;
      acc_t* dv_head = dv_data + (b * Hkv + hkv) * Tk * D;
      for (int64_t i = 0; i < Tq; ++i) {
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = hkv * group + g;
          const int64_t row = (b * Hq + h) * Tq + i;
          load_vector(q_data + b * q.stride(0) + h * q.stride(1) + i * q.stride(2), D, q_rows.data() + g * D);
          load_vector(grad_data + row * D, D, grad_rows.data() + g * D);
          acc_t delta = 0;  // rowsum(dO * O)
          for (int64_t d = 0; d < D; ++d) delta += grad_rows[g * D + d] * static_cast<acc_t>(out_data[row * D + d]);
          row_dot[g] = delta;
          row_lse[g] = lse_data[row];
        }
        std::fill(dq_rows.begin(), dq_rows.end(), acc_t(0));
        rows.keys(b, i, Tq, window, n_anchor).for_each_block(slots, [&](int64_t n) {
          load_rows(k_base, k.stride(2), slots, n, D, k_buffer.data(), k_rows);
          load_rows(v_base, v.stride(2), slots, n, D, v_buffer.data(), v_rows);
          for (int64_t g = 0; g < group; ++g) {
            if (std::isinf(row_lse[g]) && row_lse[g] < 0) continue;  // no visible key: P = 0
            const acc_t* q_row = q_rows.data() + g * D;
            const acc_t* grad_row = grad_rows.data() + g * D;
            acc_t* dq_row = dq_rows.data() + g * D;
            for (int64_t r = 0; r < n; ++r) {
              const acc_t prob = std::exp(dot(q_row, k_rows[r], D) * softmax_scale - row_lse[g]);
              const acc_t d_score = prob * (dot(grad_row, v_rows[r], D) - row_dot[g]) * softmax_scale;
              axpy(d_score, k_rows[r], dq_row, D);
              axpy(d_score, q_row, dk_head + slots[r] * D, D);
              axpy(prob, grad_row, dv_head + slots[r] * D, D);
            }
          }
        });
        for (int64_t g = 0; g < group; ++g) {
          const int64_t row = (b * Hq + hkv * group + g) * Tq + i;
          for (int64_t d = 0; d < D; ++d) dq_data[row * D + d] = static_cast<scalar_t>(dq_rows[g * D + d]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attn_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& kv_len, const at::Tensor& q_pos, int64_t window, int64_t n_anchor,
    const c10::optional<at::Tensor>& tree_mask, double scale) {
  check_window_attn_backward_inputs(grad_out, q, k, v, out, lse, kv_len, q_pos, window, n_anchor, tree_mask, scale);
  const at::ScalarType acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto contiguous = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), contiguous);  // [B, Hq, Tq, D]
  // dk, dv accumulate in acc_dtype ([B, Hkv, Tk, D]); converted to k's dtype at the end
  at::Tensor dk_acc = at::zeros(k.sizes(), contiguous.dtype(acc_dtype));
  at::Tensor dv_acc = at::zeros(v.sizes(), contiguous.dtype(acc_dtype));
  if (dq.numel() > 0 && dk_acc.numel() > 0) {
    const RowInputs rows(kv_len, q_pos, tree_mask);
    const at::Tensor grad_c = grad_out.contiguous(), out_c = out.contiguous();
    const at::Tensor lse_c = lse.to(acc_dtype).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "window_attn_backward_cpu", [&] {
      window_attn_backward_kernel<scalar_t>(grad_c, q, k, v, out_c, lse_c, rows, window, n_anchor,
                                            resolve_scale(scale, q.size(3)), dq, dk_acc, dv_acc);
    });
  } else {
    dq.zero_();
  }
  return {dq, dk_acc.to(k.scalar_type()), dv_acc.to(v.scalar_type())};
}

}  // namespace
}  // namespace sparrow

TORCH_LIBRARY_IMPL(sparrow, CPU, m) {
  m.impl("window_attn", &sparrow::window_attn_cpu);
  m.impl("window_attn_backward", &sparrow::window_attn_backward_cpu);
}
