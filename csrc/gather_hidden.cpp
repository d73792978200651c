// CPU kernel of sparrow::gather_hidden (docs/ops.md): one pass that gathers rows of every
// layer's hidden states [B, T, H] at index [B, N] into out [B, N, n_layers * H] (-1 = zeros).
// A pure copy (dtype-agnostic byte moves); inputs are validated by csrc/checks.h only.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "checks.h"

namespace sparrow {
namespace {

at::Tensor gather_hidden_cpu(at::TensorList hidden, const at::Tensor& index) {
  check_gather_hidden_inputs(hidden, index);
  const int64_t n_layers = static_cast<int64_t>(hidden.size());
  const int64_t B = index.size(0), N = index.size(1), H = hidden[0].size(2);
  at::Tensor out = at::empty({B, N, n_layers * H}, hidden[0].options());  // [B, N, n_layers * H]
  if (out.numel() == 0) return out;
  const at::Tensor index_c = index.contiguous();
  const int64_t* index_data = index_c.data_ptr<int64_t>();
  const int64_t elem = static_cast<int64_t>(hidden[0].element_size());
  const int64_t row_bytes = H * elem;
  std::vector<const char*> bases(n_layers);
  std::vector<int64_t> batch_stride(n_layers), token_stride(n_layers);  // in bytes
  for (int64_t l = 0; l < n_layers; ++l) {
    bases[l] = static_cast<const char*>(hidden[l].data_ptr());
    batch_stride[l] = hidden[l].stride(0) * elem;
    token_stride[l] = hidden[l].stride(1) * elem;
  }
  char* out_data = static_cast<char*>(out.data_ptr());
  // grain: enough rows per task that a task moves at least ~64 KiB
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, n_layers * row_bytes));
  at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N, t = index_data[row];
      char* dst = out_data + row * n_layers * row_bytes;
      for (int64_t l = 0; l < n_layers; ++l) {
        if (t < 0) {
          std::memset(dst + l * row_bytes, 0, row_bytes);  // padding: zeros (all-zero bits = 0 for float types)
        } else {
          std::memcpy(dst + l * row_bytes, bases[l] + b * batch_stride[l] + t * token_stride[l], row_bytes);
        }
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace sparrow

TORCH_LIBRARY_IMPL(sparrow, CPU, m) {
  m.impl("gather_hidden", &sparrow::gather_hidden_cpu);
}
