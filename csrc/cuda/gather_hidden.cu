// sparrow::gather_hidden on CUDA (docs/ops.md): gathers several layers' hidden-state rows
// [B, T, H] at index [B, N] into out [B, N, n_layers * H] in one launch (per 16 layers), in the
// widest aligned words, zeros for padding. No arithmetic, no validation beyond csrc/checks.h.
//
// An index outside [-1, T), which is not checked for CUDA tensors, also yields a zero row.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cuda_utils.cuh"

namespace sparrow {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxLayersPerLaunch = 16;
constexpr int64_t kMaxBlocks = 1 << 20;

struct GatherParams {
  const unsigned char* hidden[kMaxLayersPerLaunch];  // this launch's layers
  int64_t stride_b[kMaxLayersPerLaunch];             // bytes
  int64_t stride_t[kMaxLayersPerLaunch];             // bytes
  int n_layers;                                      // layers in this launch
  int64_t out_offset;                                // bytes from an output row's start to this launch's first layer
  const int64_t* index;                              // [B, N] contiguous
  unsigned char* out;                                // [B, N, L * H] contiguous
  int64_t rows, N, T;                                // rows = B * N
  int64_t layer_bytes, out_row_bytes;                // H * elt, L * H * elt
};

// Grid-stride over the B * N output rows; a block copies one row's layers word by word.
template <typename WordT>
__global__ void __launch_bounds__(kThreads) gather_hidden_kernel(const GatherParams p) {
  const int64_t words_per_layer = p.layer_bytes / static_cast<int64_t>(sizeof(WordT));
  const int64_t words = words_per_layer * p.n_layers;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t b = row / p.N, t = p.index[row];
    const bool valid = t >= 0 && t < p.T;
    WordT* dst = reinterpret_cast<WordT*>(p.out + row * p.out_row_bytes + p.out_offset);
    for (int64_t w = threadIdx.x; w < words; w += kThreads) {
      WordT value{};  // zeros for padding
      if (valid) {
        const int layer = static_cast<int>(w / words_per_layer);
        const WordT* src = reinterpret_cast<const WordT*>(p.hidden[layer] + b * p.stride_b[layer] + t * p.stride_t[layer]);
        value = src[w % words_per_layer];
      }
      dst[w] = value;
    }
  }
}

template <int WORD_BYTES>
void launch_gather(const GatherParams& p, dim3 grid, cudaStream_t stream) {
  gather_hidden_kernel<typename cuda::Word<WORD_BYTES>::type><<<grid, kThreads, 0, stream>>>(p);
  SPARROW_CHECK_LAUNCH();
}

at::Tensor gather_hidden_cuda(at::TensorList hidden, const at::Tensor& index) {
  check_gather_hidden_inputs(hidden, index);
  const at::Tensor& first = hidden[0];
  const c10::cuda::CUDAGuard device_guard(first.device());
  const int64_t B = first.size(0), T = first.size(1), H = first.size(2), N = index.size(1);
  const int64_t n_layers = static_cast<int64_t>(hidden.size()), elt = first.element_size();
  at::Tensor out = at::empty({B, N, n_layers * H}, first.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor index_c = index.contiguous();

  GatherParams p;
  p.index = index_c.data_ptr<int64_t>();
  p.out = static_cast<unsigned char*>(out.data_ptr());
  p.rows = B * N, p.N = N, p.T = T;
  p.layer_bytes = H * elt, p.out_row_bytes = n_layers * H * elt;
  // the widest word that every row start (input and output) is aligned to
  int64_t word = 16;
  auto fits = [&](int64_t w) {
    bool ok = p.layer_bytes % w == 0 && cuda::is_aligned(p.out, w);
    for (const at::Tensor& h : hidden) {
      ok = ok && cuda::is_aligned(h.data_ptr(), w) && (h.stride(0) * elt) % w == 0 && (h.stride(1) * elt) % w == 0;
    }
    return ok;
  };
  while (word > 1 && !fits(word)) word /= 2;

  const dim3 grid = cuda::checked_grid("gather_hidden", std::min(p.rows, kMaxBlocks), 1, 1, kThreads, 0);
  const cudaStream_t stream = cuda::current_stream();
  for (int64_t first_layer = 0; first_layer < n_layers; first_layer += kMaxLayersPerLaunch) {
    p.n_layers = static_cast<int>(std::min<int64_t>(kMaxLayersPerLaunch, n_layers - first_layer));
    p.out_offset = first_layer * p.layer_bytes;
    for (int l = 0; l < p.n_layers; ++l) {
      const at::Tensor& h = hidden[first_layer + l];
      p.hidden[l] = static_cast<const unsigned char*>(h.data_ptr());
      p.stride_b[l] = h.stride(0) * elt;
      p.stride_t[l] = h.stride(1) * elt;
    }
    if (word == 16) {
      launch_gather<16>(p, grid, stream);
    } else if (word == 8) {
      launch_gather<8>(p, grid, stream);
    } else if (word == 4) {
      launch_gather<4>(p, grid, stream);
    } else if (word == 2) {
      launch_gather<2>(p, grid, stream);
    } else {
      launch_gather<1>(p, grid, stream);
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparrow, CUDA, m) {
  m.impl("gather_hidden", &gather_hidden_cuda);
}

}  // namespace sparrow
