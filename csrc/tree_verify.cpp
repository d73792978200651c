// CPU kernels of sparrow::tree_verify_greedy and sparrow::tree_verify_sample (docs/ops.md):
// walk each row's draft tree (first child / next sibling links) from the root and return the
// accepted path, its length and the bonus token. Sampling reproduces the reference bit for bit
// given the same uniforms: the same float32 operations in the same order, and the reductions
// (sum, cumsum) run by the same ATen kernels. Inputs are validated by csrc/checks.h only.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checks.h"

namespace sparrow {
namespace {

using VerifyResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// accept_index [B, N] (-1 padded), accept_len [B], bonus_token [B], all int64
VerifyResult make_outputs(int64_t B, int64_t N, const at::TensorOptions& options) {
  return {at::full({B, N}, -1, options.dtype(at::kLong)), at::empty({B}, options.dtype(at::kLong)),
          at::empty({B}, options.dtype(at::kLong))};
}

VerifyResult tree_verify_greedy_cpu(const at::Tensor& candidates, const at::Tensor& target_predict,
                                    const at::Tensor& next_token, const at::Tensor& next_sibling) {
  check_tree_verify_greedy_inputs(candidates, target_predict, next_token, next_sibling);
  const int64_t B = candidates.size(0), N = candidates.size(1);
  auto [accept_index, accept_len, bonus_token] = make_outputs(B, N, candidates.options());
  const at::Tensor tokens_c = candidates.contiguous(), predict_c = target_predict.contiguous(),
                   child_c = next_token.contiguous(), sibling_c = next_sibling.contiguous();
  const int64_t* tokens = tokens_c.data_ptr<int64_t>();
  const int64_t* predict = predict_c.data_ptr<int64_t>();
  const int64_t* first_child = child_c.data_ptr<int64_t>();
  const int64_t* sibling = sibling_c.data_ptr<int64_t>();
  int64_t* path = accept_index.data_ptr<int64_t>();
  int64_t* path_len = accept_len.data_ptr<int64_t>();
  int64_t* bonus = bonus_token.data_ptr<int64_t>();
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = b * N;  // links were checked to point forward, so the walk ends
      int64_t cur = 0, len = 1;
      path[row] = 0;
      while (true) {
        int64_t match = -1;
        for (int64_t c = first_child[row + cur]; c != -1; c = sibling[row + c]) {
          if (tokens[row + c] == predict[row + cur]) {
            match = c;
            break;
          }
        }
        if (match == -1) break;
        cur = match;
        path[row + len++] = cur;
      }
      path_len[b] = len;
      bonus[b] = predict[row + cur];
    }
  });
  return {accept_index, accept_len, bonus_token};
}

// Rows run one after another on the calling thread: the sums then use the same ATen kernels
// and thread split as the reference's torch.sum, which is what makes results bit-identical.
VerifyResult tree_verify_sample_cpu(const at::Tensor& candidates, const at::Tensor& target_probs,
                                    const at::Tensor& draft_probs, const at::Tensor& next_token,
                                    const at::Tensor& next_sibling, const at::Tensor& uniform_accept,
                                    const at::Tensor& uniform_final) {
  check_tree_verify_sample_inputs(candidates, target_probs, draft_probs, next_token, next_sibling, uniform_accept,
                                  uniform_final);
  const int64_t B = candidates.size(0), N = candidates.size(1), V = target_probs.size(2);
  auto [accept_index, accept_len, bonus_token] = make_outputs(B, N, candidates.options());
  const at::Tensor tokens_c = candidates.contiguous(), child_c = next_token.contiguous(),
                   sibling_c = next_sibling.contiguous(), u_accept_c = uniform_accept.contiguous(),
                   u_final_c = uniform_final.contiguous();
  const int64_t* tokens = tokens_c.data_ptr<int64_t>();
  const int64_t* first_child = child_c.data_ptr<int64_t>();
  const int64_t* sibling = sibling_c.data_ptr<int64_t>();
  const float* u_accept = u_accept_c.data_ptr<float>();
  const float* u_final = u_final_c.data_ptr<float>();
  int64_t* path = accept_index.data_ptr<int64_t>();
  int64_t* path_len = accept_len.data_ptr<int64_t>();
  int64_t* bonus = bonus_token.data_ptr<int64_t>();

  at::Tensor residual = at::empty({V}, target_probs.options());  // [V] p, unnormalised
  float* p = residual.data_ptr<float>();
  const auto sum_of = [](const at::Tensor& t) { return at::sum(t).item<float>(); };

  for (int64_t b = 0; b < B; ++b) {
    const int64_t row = b * N;
    int64_t cur = 0, len = 1;
    path[row] = 0;
    while (true) {
      const at::Tensor target_row = target_probs[b][cur];  // [V], contiguous (checked)
      const at::Tensor draft_row = draft_probs[b][cur];    // [V]
      const float* draft = draft_row.data_ptr<float>();
      residual.copy_(target_row);
      float S = sum_of(residual);
      const float Q = sum_of(draft_row);
      int64_t accepted = -1;
      for (int64_t c = first_child[row + cur]; c != -1; c = sibling[row + c]) {
        const int64_t x = tokens[row + c];
        const float u = u_accept[row + c];
        const bool accept = Q > 0 ? (u * draft[x] * S < p[x] * Q) : (u * S < p[x]);
        if (accept) {
          accepted = c;
          break;
        }
        if (Q > 0) {  // p = max(p / S - q / Q, 0)
          for (int64_t t = 0; t < V; ++t) {
            const float r = p[t] / S - draft[t] / Q;
            p[t] = r < 0.0f ? 0.0f : r;  // NaN stays NaN, as clamp_min
          }
        } else {
          p[x] = 0.0f;
        }
        S = sum_of(residual);
        if (S <= 0) {  // numerical guard: restore the target distribution
          residual.copy_(target_row);
          S = sum_of(residual);
        }
      }
      if (accepted == -1) {  // inverse CDF of the residual
        const float threshold = u_final[b] * S;
        const at::Tensor cdf = at::cumsum(residual, 0);
        const float* cum = cdf.data_ptr<float>();
        int64_t token = -1;
        for (int64_t t = 0; t < V && token == -1; ++t) {
          if (cum[t] > threshold) token = t;
        }
        for (int64_t t = V - 1; t >= 0 && token == -1; --t) {  // rounding ran past the end
          if (p[t] > 0) token = t;
        }
        TORCH_CHECK(token != -1, "tree_verify_sample: target_probs[", b, ", ", cur,
                    "] must have positive mass to sample the bonus token, got an all-zero row");
        bonus[b] = token;
        break;
      }
      cur = accepted;
      path[row + len++] = cur;
    }
    path_len[b] = len;
  }
  return {accept_index, accept_len, bonus_token};
}

}  // namespace
}  // namespace sparrow

TORCH_LIBRARY_IMPL(sparrow, CPU, m) {
  m.impl("tree_verify_greedy", &sparrow::tree_verify_greedy_cpu);
  m.impl("tree_verify_sample", &sparrow::tree_verify_sample_cpu);
}
