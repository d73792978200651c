// sparrow::window_attn forward on CUDA (docs/ops.md): split-KV attention over each query's
// text-anchored window, for decode, draft trees and prefill alike. It holds no backward (the
// Python front registers Triton's as sparrow::window_attn_backward's CUDA kernel) and no
// validation beyond csrc/checks.h.
//
// One CTA takes a tile of query rows sharing a KV head (the GQA group packed, so each K/V byte
// is read once per group), walks only the tile's anchor, window and tree key slots in 16-byte
// vectors with fp32 (fp64 for fp64) accumulation, and the key range is split across CTAs whose
// partial results a second kernel merges by log-sum-exp.
//
// Inputs are validated by csrc/checks.h (same messages as the CPU kernel). kv_len values are
// not checked for CUDA tensors (no device sync): they are clamped to [0, Tk], so bad lengths
// never read out of bounds. SPARROW_WINDOW_ATTN_SPLITS=n forces the split count (tests).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "cuda_utils.cuh"

namespace sparrow {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / cuda::kWarpSize;
constexpr int kMaxBlockN = 64;                             // keys per tile, at most
constexpr int kLoadsPerThread = 8;                         // vectors of K (and of V) per thread per tile
constexpr int kTileVectors = kThreads * kLoadsPerThread;   // vectors in one K tile, at most
constexpr int kMaxSplits = 128;
constexpr int kMinKeysPerSplit = 256;                      // a split below this costs more than it saves

template <typename acc_t>
struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_stride_b, q_stride_h, q_stride_t;  // elements; the last dim is contiguous
  int64_t k_stride_b, k_stride_h, k_stride_t;
  int64_t v_stride_b, v_stride_h, v_stride_t;
  const int64_t* kv_len;   // [B]
  const int64_t* q_pos;    // [B, Tq] contiguous
  const bool* tree_mask;   // [B, Tq, Tq] contiguous, or nullptr
  void* out;               // [B, Hq, Tq, D] contiguous, written directly when num_splits == 1
  acc_t* lse;              // [B, Hq, Tq]
  acc_t* split_out;        // [num_splits, B * Hq * Tq, D] normalised partial outputs (num_splits > 1)
  acc_t* split_lse;        // [num_splits, B * Hq * Tq] partial log-sum-exp (num_splits > 1)
  int B, Hq, Hkv, Tq, Tk, D, group;
  int64_t window, n_anchor;
  acc_t scale_log2;        // softmax scale * log2(e): scores live in the log2 domain
  int block_n;             // keys per tile (power of two, 4..64)
  int threads_per_key;     // kThreads / block_n
  int key_stride;          // shared-memory row stride of the K/V tiles, elements
  int num_splits;
  int v_tile_offset, q_tile_offset, scores_offset;  // shared-memory layout, bytes
};

// The key slots a row tile may see, as up to three disjoint slot ranges walked in this order
// ("virtual" key index 0 .. total-1): anchors [0, anchor_end), the union of the rows' windows
// [window_begin, window_end), and the draft-tree slots [tree_begin, kv_len). It is a superset:
// each (row, key) pair is still tested with key_visible.
struct KeySegments {
  int anchor_end;
  int window_begin, window_end;
  int tree_begin;
  int kv_len;           // clamped to [0, Tk]
  int64_t tree_start;   // slot of tree node 0 = kv_len - Tq (may be < 0); unused without a tree
  int total;

  __device__ __forceinline__ int slot(int virtual_index) const {
    if (virtual_index < anchor_end) return virtual_index;
    virtual_index -= anchor_end;
    const int window_len = window_end - window_begin;
    if (virtual_index < window_len) return window_begin + virtual_index;
    return tree_begin + (virtual_index - window_len);
  }
};

// docs/ops.md's visibility rule for key `slot` and a query at position `pos`; `tree_row` is
// the query's tree_mask row or nullptr without a tree.
__device__ __forceinline__ bool key_visible(int slot, int64_t pos, const KeySegments& seg, const bool* tree_row,
                                            int64_t window, int64_t n_anchor) {
  if (slot >= seg.kv_len) return false;
  if (tree_row != nullptr && slot >= seg.tree_start) return tree_row[slot - seg.tree_start];
  if (slot > pos) return false;
  return window <= 0 || slot >= pos - window + 1 || slot < n_anchor;
}

template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void unpack(const cuda::Pack<scalar_t, VEC>& pack, acc_t (&values)[VEC]) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) values[e] = static_cast<acc_t>(pack.v[e]);
}

// Grid: (B * Hkv, row tiles, num_splits). A row tile is MAX_M consecutive rows r = i * group + g
// (query i, head g of the KV head's group) of one batch row and KV head.
template <typename scalar_t, typename acc_t, int VEC, int MAX_M>
__global__ void __launch_bounds__(kThreads) window_attn_split_kernel(const AttnParams<acc_t> p) {
  using PackT = cuda::Pack<scalar_t, VEC>;
  // PV accumulators: (row, vector chunk) pairs spread over the block, D <= kMaxHeadDim
  constexpr int kMaxPairs = (MAX_M * (kMaxHeadDim / VEC) + kThreads - 1) / kThreads;

  extern __shared__ __align__(16) unsigned char smem[];
  scalar_t* k_tile = reinterpret_cast<scalar_t*>(smem);                              // [block_n, key_stride]
  scalar_t* v_tile = reinterpret_cast<scalar_t*>(smem + p.v_tile_offset);            // [block_n, key_stride]
  acc_t* q_tile = reinterpret_cast<acc_t*>(smem + p.q_tile_offset);                  // [MAX_M, D], pre-scaled
  acc_t* scores = reinterpret_cast<acc_t*>(smem + p.scores_offset);                  // [MAX_M, kMaxBlockN]
  __shared__ acc_t row_max[MAX_M], row_sum[MAX_M], row_alpha[MAX_M];
  __shared__ int64_t row_pos[MAX_M];
  __shared__ int row_query[MAX_M], row_head[MAX_M];
  __shared__ KeySegments shared_seg;

  const int tid = threadIdx.x, lane = tid % cuda::kWarpSize, warp = tid / cuda::kWarpSize;
  const int split = blockIdx.z;
  const int b = blockIdx.x / p.Hkv, kv_head = blockIdx.x % p.Hkv;
  const int rows = p.Tq * p.group;
  const int row0 = blockIdx.y * MAX_M;
  const int n_rows = min(MAX_M, rows - row0);
  const int D = p.D, chunks = D / VEC;

  if (tid < MAX_M) {
    const int m = tid;
    const int r = row0 + min(m, n_rows - 1);
    row_query[m] = r / p.group;
    row_head[m] = kv_head * p.group + r % p.group;
    row_pos[m] = p.q_pos[static_cast<int64_t>(b) * p.Tq + r / p.group];
    row_max[m] = cuda::neg_inf<acc_t>();
    row_sum[m] = acc_t(0);
  }
  __syncthreads();

  if (tid == 0) {
    KeySegments seg;
    const int64_t kv_len = min(max(p.kv_len[b], int64_t(0)), static_cast<int64_t>(p.Tk));
    const bool tree = p.tree_mask != nullptr;
    seg.kv_len = static_cast<int>(kv_len);
    seg.tree_start = kv_len - p.Tq;
    const int64_t prefix_end = tree ? max(seg.tree_start, int64_t(0)) : kv_len;  // window rule below this
    int64_t limit = 0;                                                              // max over rows of the last slot + 1
    int64_t first = prefix_end;                                                     // min over rows of the window start
    for (int m = 0; m < n_rows; ++m) {
      const int64_t pos = row_pos[m];  // any int64: no expression below overflows
      limit = max(limit, pos < prefix_end ? pos + 1 : prefix_end);
      first = min(first, (p.window > 0 && pos >= p.window) ? pos - p.window + 1 : int64_t(0));
    }
    const int64_t anchor_end = p.window > 0 ? min(p.n_anchor, limit) : int64_t(0);
    seg.anchor_end = static_cast<int>(anchor_end);
    seg.window_end = static_cast<int>(limit);
    seg.window_begin = static_cast<int>(min(max(first, anchor_end), limit));
    seg.tree_begin = tree ? static_cast<int>(prefix_end) : seg.kv_len;
    seg.total = seg.anchor_end + (seg.window_end - seg.window_begin) + (seg.kv_len - seg.tree_begin);
    shared_seg = seg;
  }
  for (int idx = tid; idx < MAX_M * D; idx += kThreads) {
    const int m = idx / D, d = idx % D;
    acc_t value = acc_t(0);
    if (m < n_rows) {
      const scalar_t* q = static_cast<const scalar_t*>(p.q) + b * p.q_stride_b + row_head[m] * p.q_stride_h +
                          row_query[m] * p.q_stride_t;
      value = static_cast<acc_t>(q[d]) * p.scale_log2;
    }
    q_tile[idx] = value;
  }
  __syncthreads();

  const KeySegments seg = shared_seg;
  const int per_split = static_cast<int>(cuda::ceil_div(cuda::ceil_div(seg.total, p.num_splits), p.block_n)) * p.block_n;
  const int v_begin = min(seg.total, split * per_split);
  const int v_end = min(seg.total, v_begin + per_split);

  const scalar_t* k_head = static_cast<const scalar_t*>(p.k) + b * p.k_stride_b + kv_head * p.k_stride_h;
  const scalar_t* v_head = static_cast<const scalar_t*>(p.v) + b * p.v_stride_b + kv_head * p.v_stride_h;
  const int tile_vectors = p.block_n * chunks;

  // Next tile, global -> registers (issued before the math on the current tile, used after it).
  PackT k_next[kLoadsPerThread], v_next[kLoadsPerThread];
  auto load_tile = [&](int v0) {
    const int n_keys = min(p.block_n, v_end - v0);
#pragma unroll
    for (int j = 0; j < kLoadsPerThread; ++j) {
      const int idx = tid + j * kThreads;
      const int n = idx / chunks, c = idx % chunks;
      if (idx < tile_vectors && n < n_keys) {
        const int64_t slot = seg.slot(v0 + n);
        k_next[j] = *reinterpret_cast<const PackT*>(k_head + slot * p.k_stride_t + c * VEC);
        v_next[j] = *reinterpret_cast<const PackT*>(v_head + slot * p.v_stride_t + c * VEC);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          k_next[j].v[e] = scalar_t(0);
          v_next[j].v[e] = scalar_t(0);
        }
      }
    }
  };

  acc_t acc[kMaxPairs][VEC];
#pragma unroll
  for (int j = 0; j < kMaxPairs; ++j) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[j][e] = acc_t(0);
  }

  const bool* tree_rows = p.tree_mask == nullptr
                              ? nullptr
                              : p.tree_mask + static_cast<int64_t>(b) * p.Tq * p.Tq;  // [Tq, Tq] of row b
  const int tpk = p.threads_per_key;
  if (v_begin < v_end) load_tile(v_begin);
  for (int v0 = v_begin; v0 < v_end; v0 += p.block_n) {
    const int n_keys = min(p.block_n, v_end - v0);
#pragma unroll
    for (int j = 0; j < kLoadsPerThread; ++j) {
      const int idx = tid + j * kThreads;
      if (idx < tile_vectors) {
        const int n = idx / chunks, c = idx % chunks;
        *reinterpret_cast<PackT*>(k_tile + n * p.key_stride + c * VEC) = k_next[j];
        *reinterpret_cast<PackT*>(v_tile + n * p.key_stride + c * VEC) = v_next[j];
      }
    }
    __syncthreads();
    if (v0 + p.block_n < v_end) load_tile(v0 + p.block_n);

    // Scores: threads_per_key consecutive threads share key n, each a strided part of D.
    {
      const int n = tid / tpk, part = tid % tpk;
      acc_t dot[MAX_M];
#pragma unroll
      for (int m = 0; m < MAX_M; ++m) dot[m] = acc_t(0);
      for (int c = part; c < chunks; c += tpk) {
        acc_t key[VEC];
        unpack(*reinterpret_cast<const PackT*>(k_tile + n * p.key_stride + c * VEC), key);
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) {
          const acc_t* query = q_tile + m * D + c * VEC;
#pragma unroll
          for (int e = 0; e < VEC; ++e) dot[m] += query[e] * key[e];
        }
      }
#pragma unroll
      for (int m = 0; m < MAX_M; ++m) dot[m] = cuda::group_sum(dot[m], tpk);
      if (part == 0) {
        const bool in_tile = n < n_keys;
        const int slot = in_tile ? seg.slot(v0 + n) : 0;
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) {
          const bool* tree_row = tree_rows == nullptr ? nullptr : tree_rows + static_cast<int64_t>(row_query[m]) * p.Tq;
          const bool visible = in_tile && m < n_rows &&
                               key_visible(slot, row_pos[m], seg, tree_row, p.window, p.n_anchor);
          scores[m * kMaxBlockN + n] = visible ? dot[m] : cuda::neg_inf<acc_t>();
        }
      }
    }
    __syncthreads();

    // Online softmax, one warp per row: scores -> probabilities, running max and sum.
    for (int m = warp; m < MAX_M; m += kWarps) {
      const acc_t old_max = row_max[m];
      acc_t* row = scores + m * kMaxBlockN;
      const acc_t s0 = lane < p.block_n ? row[lane] : cuda::neg_inf<acc_t>();
      const acc_t s1 = lane + cuda::kWarpSize < p.block_n ? row[lane + cuda::kWarpSize] : cuda::neg_inf<acc_t>();
      const acc_t tile_max = cuda::warp_max(cuda::nan_max(s0, s1));
      const acc_t new_max = cuda::nan_max(tile_max, old_max);  // NaN once a visible score is NaN
      acc_t alpha = acc_t(1), p0 = acc_t(0), p1 = acc_t(0);
      if (new_max != cuda::neg_inf<acc_t>()) {
        alpha = cuda::device_exp2(old_max - new_max);
        p0 = cuda::device_exp2(s0 - new_max);
        p1 = cuda::device_exp2(s1 - new_max);
      }
      if (lane < p.block_n) row[lane] = p0;
      if (lane + cuda::kWarpSize < p.block_n) row[lane + cuda::kWarpSize] = p1;
      const acc_t tile_sum = cuda::warp_sum(p0 + p1);
      if (lane == 0) {
        row_max[m] = new_max;
        row_sum[m] = row_sum[m] * alpha + tile_sum;
        row_alpha[m] = alpha;
      }
    }
    __syncthreads();

    // P V: each thread owns fixed (row, chunk) pairs of the output accumulator.
#pragma unroll
    for (int j = 0; j < kMaxPairs; ++j) {
      const int pair = tid + j * kThreads;
      if (pair < MAX_M * chunks) {
        const int m = pair / chunks, c = pair % chunks;
        const acc_t alpha = row_alpha[m];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[j][e] *= alpha;
        const acc_t* probs = scores + m * kMaxBlockN;
        for (int n = 0; n < n_keys; ++n) {
          const acc_t prob = probs[n];
          if (prob != acc_t(0)) {  // also keeps unread (possibly non-finite) values out of the sum
            acc_t value[VEC];
            unpack(*reinterpret_cast<const PackT*>(v_tile + n * p.key_stride + c * VEC), value);
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[j][e] += prob * value[e];
          }
        }
      }
    }
    __syncthreads();
  }

  // Epilogue: normalise; write the output directly or this split's partial result.
  const int64_t all_rows = static_cast<int64_t>(p.B) * p.Hq * p.Tq;
#pragma unroll
  for (int j = 0; j < kMaxPairs; ++j) {
    const int pair = tid + j * kThreads;
    const int m = pair / chunks, c = pair % chunks;
    if (pair < MAX_M * chunks && m < n_rows) {
      const acc_t sum = row_sum[m];
      // sum is 0 only without a visible key; NaN (a NaN input) must come out as NaN
      const acc_t inv = sum != acc_t(0) ? acc_t(1) / sum : acc_t(0);
      const int64_t row = (static_cast<int64_t>(b) * p.Hq + row_head[m]) * p.Tq + row_query[m];
      if (p.num_splits == 1) {
        scalar_t* out = static_cast<scalar_t*>(p.out) + row * D + c * VEC;
#pragma unroll
        for (int e = 0; e < VEC; ++e) out[e] = static_cast<scalar_t>(acc[j][e] * inv);
      } else {
        acc_t* out = p.split_out + (split * all_rows + row) * D + c * VEC;
#pragma unroll
        for (int e = 0; e < VEC; ++e) out[e] = acc[j][e] * inv;
      }
    }
  }
  if (tid < n_rows) {
    const int m = tid;
    const acc_t sum = row_sum[m];
    const acc_t lse = sum != acc_t(0) ? (row_max[m] + cuda::device_log2(sum)) * acc_t(M_LN2) : cuda::neg_inf<acc_t>();
    const int64_t row = (static_cast<int64_t>(b) * p.Hq + row_head[m]) * p.Tq + row_query[m];
    if (p.num_splits == 1) {
      p.lse[row] = lse;
    } else {
      p.split_lse[split * all_rows + row] = lse;
    }
  }
}

// One warp per output row: out = sum_s w_s * out_s / sum_s w_s with w_s = exp(lse_s - max lse).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    merge_splits_kernel(const acc_t* split_out, const acc_t* split_lse, scalar_t* out, acc_t* lse, int64_t rows,
                        int D, int num_splits) {
  const int lane = threadIdx.x % cuda::kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / cuda::kWarpSize;
  if (row >= rows) return;
  acc_t max_lse = cuda::neg_inf<acc_t>();
  for (int s = 0; s < num_splits; ++s) {
    const acc_t value = split_lse[s * rows + row];
    max_lse = cuda::nan_max(value, max_lse);  // a NaN split makes the row NaN
  }
  if (max_lse == cuda::neg_inf<acc_t>()) {  // no visible key in any split
    for (int d = lane; d < D; d += cuda::kWarpSize) out[row * D + d] = static_cast<scalar_t>(0.0f);
    if (lane == 0) lse[row] = max_lse;
    return;
  }
  acc_t total = acc_t(0);
  for (int s = 0; s < num_splits; ++s) total += cuda::device_exp(split_lse[s * rows + row] - max_lse);
  const acc_t inv_total = acc_t(1) / total;
  for (int d = lane; d < D; d += cuda::kWarpSize) {
    acc_t value = acc_t(0);
    for (int s = 0; s < num_splits; ++s) {
      const acc_t weight = cuda::device_exp(split_lse[s * rows + row] - max_lse);
      if (weight != acc_t(0)) value += weight * split_out[(s * rows + row) * D + d];
    }
    out[row * D + d] = static_cast<scalar_t>(value * inv_total);
  }
  if (lane == 0) lse[row] = max_lse + cuda::device_log(total);
}

int64_t round_up(int64_t value, int64_t multiple) {
  return cuda::ceil_div(value, multiple) * multiple;
}

// Enough CTAs to fill the device (about 4 per SM) without splits so short that their fixed
// cost and the merge outweigh the parallelism; SPARROW_WINDOW_ATTN_SPLITS overrides.
int choose_num_splits(int64_t visited_keys, int64_t ctas_per_split) {
  if (const char* forced = std::getenv("SPARROW_WINDOW_ATTN_SPLITS")) {
    const int value = std::atoi(forced);
    TORCH_CHECK(value >= 1 && value <= kMaxSplits, "window_attn: SPARROW_WINDOW_ATTN_SPLITS must be in [1, ",
                kMaxSplits, "], got '", forced, "'");
    return value;
  }
  int64_t splits = cuda::ceil_div(4 * static_cast<int64_t>(cuda::sm_count()), std::max<int64_t>(ctas_per_split, 1));
  splits = std::min(splits, cuda::ceil_div(visited_keys, kMinKeysPerSplit));
  return static_cast<int>(std::clamp<int64_t>(splits, 1, kMaxSplits));
}

struct AttnInputs {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  const at::Tensor& kv_len;     // contiguous
  const at::Tensor& q_pos;      // contiguous
  const at::Tensor& tree_mask;  // contiguous or undefined
  int64_t window, n_anchor;
  double scale;
  at::Tensor& out;
  at::Tensor& lse;
};

template <typename scalar_t, typename acc_t, int VEC, int MAX_M>
void launch_window_attn(const AttnInputs& in) {
  const int64_t B = in.q.size(0), Hq = in.q.size(1), Tq = in.q.size(2), D = in.q.size(3);
  const int64_t Hkv = in.k.size(1), Tk = in.k.size(2), group = Hq / Hkv;
  const int64_t chunks = D / VEC;
  int block_n = kMaxBlockN;
  while (block_n > 4 && block_n * chunks > kTileVectors) block_n /= 2;
  const int threads_per_key = kThreads / block_n;
  // pad K/V rows so the threads_per_key threads of neighbouring keys hit distinct banks
  const int64_t pad = VEC > 1 ? ((16 * threads_per_key) % 128) / static_cast<int64_t>(sizeof(scalar_t)) : 1;
  const int64_t key_stride = D + pad;
  const int64_t tile_bytes = round_up(block_n * key_stride * static_cast<int64_t>(sizeof(scalar_t)), 16);
  const int64_t q_tile_bytes = round_up(MAX_M * D * static_cast<int64_t>(sizeof(acc_t)), 16);
  const int64_t scores_bytes = MAX_M * kMaxBlockN * static_cast<int64_t>(sizeof(acc_t));
  const size_t smem_bytes = static_cast<size_t>(2 * tile_bytes + q_tile_bytes + scores_bytes);

  const int64_t row_tiles = cuda::ceil_div(Tq * group, MAX_M);
  const bool tree = in.tree_mask.defined();
  // min(Tk, window + n_anchor + Tq (+ Tq)) summed in steps that stop at Tk (window, n_anchor may be ~2^63)
  int64_t visited_keys = Tk;
  if (in.window > 0 && in.window < Tk) {
    visited_keys = in.window;
    for (const int64_t extra : {in.n_anchor, Tq, tree ? Tq : int64_t(0)}) {
      visited_keys = extra < Tk - visited_keys ? visited_keys + extra : Tk;
    }
  }
  const int num_splits = choose_num_splits(visited_keys, B * Hkv * row_tiles);
  const int64_t all_rows = B * Hq * Tq;

  at::Tensor split_out, split_lse;
  const auto acc_options = in.q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  if (num_splits > 1) {
    split_out = at::empty({num_splits, all_rows, D}, acc_options);
    split_lse = at::empty({num_splits, all_rows}, acc_options);
  }

  AttnParams<acc_t> p;
  p.q = in.q.data_ptr();
  p.k = in.k.data_ptr();
  p.v = in.v.data_ptr();
  p.q_stride_b = in.q.stride(0), p.q_stride_h = in.q.stride(1), p.q_stride_t = in.q.stride(2);
  p.k_stride_b = in.k.stride(0), p.k_stride_h = in.k.stride(1), p.k_stride_t = in.k.stride(2);
  p.v_stride_b = in.v.stride(0), p.v_stride_h = in.v.stride(1), p.v_stride_t = in.v.stride(2);
  p.kv_len = in.kv_len.data_ptr<int64_t>();
  p.q_pos = in.q_pos.data_ptr<int64_t>();
  p.tree_mask = tree ? in.tree_mask.data_ptr<bool>() : nullptr;
  p.out = in.out.data_ptr();
  p.lse = in.lse.data_ptr<acc_t>();
  p.split_out = num_splits > 1 ? split_out.data_ptr<acc_t>() : nullptr;
  p.split_lse = num_splits > 1 ? split_lse.data_ptr<acc_t>() : nullptr;
  p.B = static_cast<int>(B), p.Hq = static_cast<int>(Hq), p.Hkv = static_cast<int>(Hkv);
  p.Tq = static_cast<int>(Tq), p.Tk = static_cast<int>(Tk), p.D = static_cast<int>(D);
  p.group = static_cast<int>(group);
  p.window = in.window, p.n_anchor = in.n_anchor;
  const double scale = in.scale > 0 ? in.scale : 1.0 / std::sqrt(static_cast<double>(D));
  p.scale_log2 = static_cast<acc_t>(scale * M_LOG2E);
  p.block_n = block_n, p.threads_per_key = threads_per_key, p.key_stride = static_cast<int>(key_stride);
  p.num_splits = num_splits;
  p.v_tile_offset = static_cast<int>(tile_bytes);
  p.q_tile_offset = static_cast<int>(2 * tile_bytes);
  p.scores_offset = static_cast<int>(2 * tile_bytes + q_tile_bytes);

  const dim3 grid = cuda::checked_grid("window_attn", B * Hkv, row_tiles, num_splits, kThreads, smem_bytes);
  const auto kernel = window_attn_split_kernel<scalar_t, acc_t, VEC, MAX_M>;
  cuda::allow_dynamic_smem(kernel, smem_bytes);
  const cudaStream_t stream = cuda::current_stream();
  kernel<<<grid, kThreads, smem_bytes, stream>>>(p);
  SPARROW_CHECK_LAUNCH();
  if (num_splits > 1) {
    const dim3 merge_grid = cuda::checked_grid("window_attn", cuda::ceil_div(all_rows, kWarps), 1, 1, kThreads, 0);
    merge_splits_kernel<scalar_t, acc_t><<<merge_grid, kThreads, 0, stream>>>(
        p.split_out, p.split_lse, static_cast<scalar_t*>(p.out), p.lse, all_rows, p.D, num_splits);
    SPARROW_CHECK_LAUNCH();
  }
}

// Picks the instantiation: 16-byte vectors when K/V rows allow them, and the smallest row
// tile (1, 4, 8 or 16 rows) that holds a KV head's Tq * group query rows.
template <typename scalar_t>
void dispatch_window_attn(const AttnInputs& in) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t D = in.q.size(3);
  bool vectorized = D % kVec == 0 && cuda::is_aligned(in.k.data_ptr(), 16) && cuda::is_aligned(in.v.data_ptr(), 16);
  for (int dim = 0; dim < 3; ++dim) {
    vectorized = vectorized && in.k.stride(dim) % kVec == 0 && in.v.stride(dim) % kVec == 0;
  }
  // the element-wise fallback and float64 (a correctness path for gradcheck) keep small tiles:
  // their accumulators would not fit in registers at 16 rows
  if (!vectorized) return launch_window_attn<scalar_t, acc_t, 1, 4>(in);
  if constexpr (std::is_same_v<scalar_t, double>) {
    return launch_window_attn<scalar_t, acc_t, kVec, 4>(in);
  } else {
    const int64_t rows = in.q.size(2) * (in.q.size(1) / in.k.size(1));
    if (rows <= 1) return launch_window_attn<scalar_t, acc_t, kVec, 1>(in);
    if (rows <= 4) return launch_window_attn<scalar_t, acc_t, kVec, 4>(in);
    if (rows <= 8) return launch_window_attn<scalar_t, acc_t, kVec, 8>(in);
    return launch_window_attn<scalar_t, acc_t, kVec, 16>(in);
  }
}

std::tuple<at::Tensor, at::Tensor> window_attn_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& kv_len, const at::Tensor& q_pos,
                                                    int64_t window, int64_t n_anchor,
                                                    const c10::optional<at::Tensor>& tree_mask, double scale) {
  check_window_attn_inputs("window_attn", q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, scale);
  TORCH_CHECK(k.size(2) <= std::numeric_limits<int32_t>::max() && q.size(2) <= std::numeric_limits<int32_t>::max(),
              "window_attn: the CUDA kernel needs Tk and Tq below 2^31, got Tk = ", k.size(2), ", Tq = ", q.size(2));
  const c10::cuda::CUDAGuard device_guard(q.device());
  const bool is_double = q.scalar_type() == at::kDouble;
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(is_double ? at::kDouble : at::kFloat));
  if (lse.numel() == 0) return {out, lse};
  const at::Tensor kv_len_c = kv_len.contiguous(), q_pos_c = q_pos.contiguous();
  const bool has_tree = tree_mask.has_value() && tree_mask->defined();
  const at::Tensor tree_c = has_tree ? tree_mask->contiguous() : at::Tensor();
  const AttnInputs in{q, k, v, kv_len_c, q_pos_c, tree_c, window, n_anchor, scale, out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "window_attn_cuda",
                                  [&] { dispatch_window_attn<scalar_t>(in); });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparrow, CUDA, m) {
  m.impl("window_attn", &window_attn_cuda);
}

}  // namespace sparrow
