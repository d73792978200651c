// sparrow::kv_compact on CUDA (docs/ops.md): in place, all layers in one launch, moves each row's
// accepted draft-tree slots prefix_len[b] + accept_index[b, i] to prefix_len[b] + i, one block
// per (layer, batch row, head) slab, in the widest aligned words. No arithmetic, no validation
// beyond csrc/checks.h.
//
// Overlap: accept_index is strictly increasing (a_i >= i), so no copy reads an earlier copy's
// destination, but a destination i may be an earlier copy's source (a_i' = i for i' < i), so
// copies must not run ahead of each other. They run in increasing i, in batches: the block
// reads a batch of source words into registers, synchronises, then writes them, which is the
// sequential semantics exactly. Values that checks.h verifies only for CPU tensors are
// made safe here: a copy whose source or destination slot falls outside [prefix_len[b], S), or
// whose accept_index is negative, is skipped (tested without forming an overflowing sum), and
// accept_len is clamped to [0, A].
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cuda_utils.cuh"

namespace sparrow {
namespace {

constexpr int kThreads = 128;
constexpr int kWordsPerThread = 8;                      // words held in registers per batch
constexpr int kBatchWords = kThreads * kWordsPerThread;
constexpr int64_t kMaxBlocks = 1 << 20;

struct CompactParams {
  unsigned char* kv;             // [L, B, H, S, D] contiguous
  const int64_t* prefix_len;     // [B]
  const int64_t* accept_index;   // [B, A] contiguous
  const int64_t* accept_len;     // [B]
  int64_t slabs, B, H, S, A;     // slabs = L * B * H
  int64_t slot_words;            // D * elt / sizeof(word)
};

// Grid-stride over the L * B * H slabs of S slots each.
template <typename WordT>
__global__ void __launch_bounds__(kThreads) kv_compact_kernel(const CompactParams p) {
  for (int64_t slab = blockIdx.x; slab < p.slabs; slab += gridDim.x) {
    const int64_t b = (slab / p.H) % p.B;
    const int64_t start = p.prefix_len[b];
    const int64_t n_keep = min(max(p.accept_len[b], int64_t(0)), p.A);
    const int64_t* kept = p.accept_index + b * p.A;
    WordT* base = reinterpret_cast<WordT*>(p.kv) + slab * p.S * p.slot_words;  // slot 0 of this slab
    const int64_t total = n_keep * p.slot_words;                                 // words to move, in i order
    for (int64_t batch = 0; batch < total; batch += kBatchWords) {
      WordT words[kWordsPerThread];
      int64_t dst_offset[kWordsPerThread];  // -1: nothing to write
#pragma unroll
      for (int j = 0; j < kWordsPerThread; ++j) {
        const int64_t w = batch + threadIdx.x + static_cast<int64_t>(j) * kThreads;
        dst_offset[j] = -1;
        if (w < total) {
          const int64_t i = w / p.slot_words, word = w % p.slot_words;
          // compared without adding first (start + kept[i] may overflow int64), as csrc/checks.h
          const bool in_range = start >= 0 && start < p.S && kept[i] >= 0 && kept[i] < p.S - start && i < p.S - start;
          const int64_t src_slot = in_range ? start + kept[i] : 0, dst_slot = in_range ? start + i : 0;
          if (in_range && src_slot != dst_slot) {
            words[j] = base[src_slot * p.slot_words + word];
            dst_offset[j] = dst_slot * p.slot_words + word;
          }
        }
      }
      __syncthreads();  // the whole batch is read before any of it is written
#pragma unroll
      for (int j = 0; j < kWordsPerThread; ++j) {
        if (dst_offset[j] >= 0) base[dst_offset[j]] = words[j];
      }
      __syncthreads();  // and written before the next batch reads
    }
  }
}

template <int WORD_BYTES>
void launch_compact(const CompactParams& p, dim3 grid, cudaStream_t stream) {
  kv_compact_kernel<typename cuda::Word<WORD_BYTES>::type><<<grid, kThreads, 0, stream>>>(p);
  SPARROW_CHECK_LAUNCH();
}

void kv_compact_cuda(const at::Tensor& kv, const at::Tensor& prefix_len, const at::Tensor& accept_index,
                     const at::Tensor& accept_len) {
  check_kv_compact_inputs(kv, prefix_len, accept_index, accept_len);
  const c10::cuda::CUDAGuard device_guard(kv.device());
  const int64_t L = kv.size(0), B = kv.size(1), H = kv.size(2), S = kv.size(3), D = kv.size(4);
  const int64_t slot_bytes = D * kv.element_size();
  if (kv.numel() == 0 || accept_index.size(1) == 0) return;
  const at::Tensor prefix_c = prefix_len.contiguous(), index_c = accept_index.contiguous(),
                   len_c = accept_len.contiguous();
  CompactParams p;
  p.kv = static_cast<unsigned char*>(kv.data_ptr());
  p.prefix_len = prefix_c.data_ptr<int64_t>();
  p.accept_index = index_c.data_ptr<int64_t>();
  p.accept_len = len_c.data_ptr<int64_t>();
  p.slabs = L * B * H, p.B = B, p.H = H, p.S = S, p.A = accept_index.size(1);
  int64_t word = 16;
  while (word > 1 && (slot_bytes % word != 0 || !cuda::is_aligned(p.kv, word))) word /= 2;
  p.slot_words = slot_bytes / word;

  const dim3 grid = cuda::checked_grid("kv_compact", std::min(p.slabs, kMaxBlocks), 1, 1, kThreads, 0);
  const cudaStream_t stream = cuda::current_stream();
  if (word == 16) {
    launch_compact<16>(p, grid, stream);
  } else if (word == 8) {
    launch_compact<8>(p, grid, stream);
  } else if (word == 4) {
    launch_compact<4>(p, grid, stream);
  } else if (word == 2) {
    launch_compact<2>(p, grid, stream);
  } else {
    launch_compact<1>(p, grid, stream);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(sparrow, CUDA, m) {
  m.impl("kv_compact", &kv_compact_cuda);
}

}  // namespace sparrow
