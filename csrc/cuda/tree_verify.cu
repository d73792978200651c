// sparrow::tree_verify_greedy and sparrow::tree_verify_sample on CUDA (docs/ops.md): one block
// per batch row walks the draft tree from the root; sampling makes block-wide passes over the
// vocabulary (residual sums and updates, the inverse-CDF bonus sample). No op logic beyond
// docs/ops.md, no input validation beyond csrc/checks.h.
//
// Value checks (link targets, token range) run on the host for CPU tensors only; here a link
// that does not point forward inside the row (the order checks.h enforces) ends the list, and
// a candidate token outside [0, V) has probability 0, so bad input never reads out of bounds.
// Sampling matches the reference's float32 element-wise arithmetic exactly; its sums run as
// block reductions and a block scan, so they may differ from torch.sum / torch.cumsum in the
// last bits: an accept decision can differ only when a uniform lands within that rounding of
// its threshold, but over a 152k vocabulary the cumsum rounding can exceed one token's mass,
// so the bonus token may be a neighbour of the reference's pick. A target row with no
// positive mass yields bonus_token = -1 (the CPU kernel raises; a kernel cannot).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cuda_utils.cuh"

namespace sparrow {
namespace {

using VerifyResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

constexpr int kGreedyThreads = 128;
constexpr int kSampleThreads = 1024;
constexpr int kSampleWarps = kSampleThreads / cuda::kWarpSize;

// A link `next` of node `from` is followed only when it points forward inside the row.
__device__ __forceinline__ int64_t follow(int64_t next, int64_t from, int64_t N) {
  return next > from && next < N ? next : -1;
}

// ----------------------------------------------------------------------------- greedy
// Grid: B blocks. Thread 0 walks the tree; the block then pads accept_index with -1.
__global__ void __launch_bounds__(kGreedyThreads)
    tree_verify_greedy_kernel(const int64_t* __restrict__ candidates, const int64_t* __restrict__ target_predict,
                              const int64_t* __restrict__ next_token, const int64_t* __restrict__ next_sibling,
                              int64_t* __restrict__ accept_index, int64_t* __restrict__ accept_len,
                              int64_t* __restrict__ bonus_token, int64_t N) {
  __shared__ int64_t path_len;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * N;
  if (threadIdx.x == 0) {
    int64_t cur = 0, len = 1;
    accept_index[row] = 0;
    while (true) {
      const int64_t want = target_predict[row + cur];
      int64_t match = -1;
      for (int64_t c = follow(next_token[row + cur], cur, N); c != -1; c = follow(next_sibling[row + c], c, N)) {
        if (candidates[row + c] == want) {
          match = c;
          break;
        }
      }
      if (match == -1) break;
      cur = match;
      accept_index[row + len++] = cur;
    }
    accept_len[blockIdx.x] = len;
    bonus_token[blockIdx.x] = target_predict[row + cur];
    path_len = len;
  }
  __syncthreads();
  for (int64_t i = path_len + threadIdx.x; i < N; i += blockDim.x) accept_index[row + i] = -1;
}

// ----------------------------------------------------------------------------- sample
struct SampleParams {
  const int64_t* candidates;      // [B, N] contiguous
  const float* target_probs;      // [B, N, V], last dim contiguous
  const float* draft_probs;       // [B, N, V], last dim contiguous
  int64_t target_stride_b, target_stride_n, draft_stride_b, draft_stride_n;
  const int64_t* next_token;      // [B, N] contiguous
  const int64_t* next_sibling;    // [B, N] contiguous
  const float* uniform_accept;    // [B, N] contiguous
  const float* uniform_final;     // [B]
  float* residual;                // [B, V] scratch: the residual after a rejection
  int64_t* accept_index;          // [B, N]
  int64_t* accept_len;            // [B]
  int64_t* bonus_token;           // [B]
  int64_t N, V;
};

// Loads VEC consecutive floats at element v (v % VEC == 0, v + VEC <= V when VEC > 1).
template <int VEC>
__device__ __forceinline__ void load_floats(const float* row, int64_t v, float (&out)[VEC]) {
  if constexpr (VEC == 4) {
    const float4 value = *reinterpret_cast<const float4*>(row + v);
    out[0] = value.x, out[1] = value.y, out[2] = value.z, out[3] = value.w;
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = row[v + e];
  }
}

// Sum over the block of two per-thread values; every thread gets both totals.
__device__ __forceinline__ void block_sum2(float& a, float& b, float* scratch /* [2 * kSampleWarps] */) {
  const int lane = threadIdx.x % cuda::kWarpSize, warp = threadIdx.x / cuda::kWarpSize;
  a = cuda::warp_sum(a);
  b = cuda::warp_sum(b);
  if (lane == 0) {
    scratch[warp] = a;
    scratch[kSampleWarps + warp] = b;
  }
  __syncthreads();
  a = cuda::warp_sum(lane < kSampleWarps ? scratch[lane] : 0.0f);
  b = cuda::warp_sum(lane < kSampleWarps ? scratch[kSampleWarps + lane] : 0.0f);
  __syncthreads();
}

// Inclusive prefix sum of one value per thread over the block; `scratch` holds kSampleWarps
// floats. Returns the thread's inclusive prefix; `total` gets the block total.
__device__ __forceinline__ float block_inclusive_scan(float value, float* scratch, float& total) {
  const int lane = threadIdx.x % cuda::kWarpSize, warp = threadIdx.x / cuda::kWarpSize;
#pragma unroll
  for (int offset = 1; offset < cuda::kWarpSize; offset *= 2) {
    const float other = __shfl_up_sync(cuda::kFullMask, value, offset);
    if (lane >= offset) value += other;
  }
  if (lane == cuda::kWarpSize - 1) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    float warp_total = lane < kSampleWarps ? scratch[lane] : 0.0f;
#pragma unroll
    for (int offset = 1; offset < cuda::kWarpSize; offset *= 2) {
      const float other = __shfl_up_sync(cuda::kFullMask, warp_total, offset);
      if (lane >= offset) warp_total += other;
    }
    if (lane < kSampleWarps) scratch[lane] = warp_total;
  }
  __syncthreads();
  const float before = warp > 0 ? scratch[warp - 1] : 0.0f;
  total = scratch[kSampleWarps - 1];
  __syncthreads();  // scratch may be reused right away
  return before + value;
}

// Grid: B blocks of kSampleThreads. Every thread follows the same control flow (all decisions
// are made from block-wide values), so no decision needs broadcasting.
template <int VEC>
__global__ void __launch_bounds__(kSampleThreads) tree_verify_sample_kernel(const SampleParams p) {
  __shared__ float scratch[2 * kSampleWarps];
  __shared__ int64_t found_token, last_positive;
  const int b = blockIdx.x, tid = threadIdx.x;
  const int64_t N = p.N, V = p.V, row = static_cast<int64_t>(b) * N;
  constexpr int64_t kStep = static_cast<int64_t>(kSampleThreads) * VEC;  // elements per block sweep
  float* residual = p.residual + static_cast<int64_t>(b) * V;

  int64_t cur = 0, len = 1;
  if (tid == 0) p.accept_index[row] = 0;
  while (true) {
    const float* target = p.target_probs + b * p.target_stride_b + cur * p.target_stride_n;  // [V]
    const float* draft = p.draft_probs + b * p.draft_stride_b + cur * p.draft_stride_n;      // [V]
    // S = sum(p), Q = sum(q) of the node's fresh distributions
    float S0 = 0.0f, Q = 0.0f;
    for (int64_t v = static_cast<int64_t>(tid) * VEC; v < V; v += kStep) {
      float t[VEC], d[VEC];
      load_floats<VEC>(target, v, t);
      load_floats<VEC>(draft, v, d);
#pragma unroll
      for (int e = 0; e < VEC; ++e) S0 += t[e], Q += d[e];
    }
    block_sum2(S0, Q, scratch);

    const float* p_cur = target;  // the residual p: the target row until a rejection
    float S = S0;
    int64_t accepted = -1;
    for (int64_t c = follow(p.next_token[row + cur], cur, N); c != -1; c = follow(p.next_sibling[row + c], c, N)) {
      const int64_t x = p.candidates[row + c];
      const bool in_vocab = x >= 0 && x < V;
      const float px = in_vocab ? p_cur[x] : 0.0f, qx = in_vocab ? draft[x] : 0.0f;
      const float u = p.uniform_accept[row + c];
      const bool accept = Q > 0.0f ? (u * qx * S < px * Q) : (u * S < px);
      if (accept) {
        accepted = c;
        break;
      }
      __syncthreads();  // every thread has read p[x] before the update below overwrites it
      // reject: p = max(p / S - q / Q, 0) (draft known) or p[x] = 0 (target only); S = sum(p)
      float partial = 0.0f, unused = 0.0f;
      for (int64_t v = static_cast<int64_t>(tid) * VEC; v < V; v += kStep) {
        float pv[VEC], qv[VEC];
        load_floats<VEC>(p_cur, v, pv);
        load_floats<VEC>(draft, v, qv);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          float updated;
          if (Q > 0.0f) {
            const float r = pv[e] / S - qv[e] / Q;
            updated = r < 0.0f ? 0.0f : r;  // NaN stays NaN, as clamp_min
          } else {
            updated = v + e == x ? 0.0f : pv[e];
          }
          residual[v + e] = updated;
          partial += updated;
        }
      }
      block_sum2(partial, unused, scratch);  // its barriers also publish `residual` to the block
      p_cur = residual;
      S = partial;
      if (S <= 0.0f) {  // numerical guard: restore the target distribution
        p_cur = target;
        S = S0;
      }
    }
    if (accepted != -1) {
      cur = accepted;
      if (tid == 0) p.accept_index[row + len] = cur;
      ++len;
      continue;
    }

    // Bonus token: first t with cumsum(p)[t] > u * S, else the last t with p[t] > 0.
    const float threshold = p.uniform_final[b] * S;
    if (tid == 0) {
      found_token = -1;
      last_positive = -1;
    }
    __syncthreads();
    float running = 0.0f;  // cumsum before this sweep (block-uniform)
    for (int64_t base = 0; base < V; base += kStep) {
      const int64_t v = base + static_cast<int64_t>(tid) * VEC;
      float pv[VEC] = {};
      if (v < V) load_floats<VEC>(p_cur, v, pv);
      float local = 0.0f;
#pragma unroll
      for (int e = 0; e < VEC; ++e) local += pv[e];
      float sweep_total;
      const float inclusive = block_inclusive_scan(local, scratch, sweep_total);
      float cum = running + (inclusive - local);
      int64_t first = -1, positive = -1;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        cum += pv[e];
        if (first == -1 && v + e < V && cum > threshold) first = v + e;
        if (v + e < V && pv[e] > 0.0f) positive = v + e;
      }
      if (first != -1) atomicMin(reinterpret_cast<unsigned long long*>(&found_token), static_cast<unsigned long long>(first));
      if (positive != -1) atomicMax(reinterpret_cast<long long*>(&last_positive), static_cast<long long>(positive));
      __syncthreads();
      running += sweep_total;
      if (found_token != -1) break;
    }
    if (tid == 0) p.bonus_token[b] = found_token != -1 ? found_token : last_positive;
    break;
  }
  if (tid == 0) p.accept_len[b] = len;
  for (int64_t i = len + tid; i < N; i += kSampleThreads) p.accept_index[row + i] = -1;
}

VerifyResult make_outputs(int64_t B, int64_t N, const at::TensorOptions& options) {
  return {at::empty({B, N}, options.dtype(at::kLong)), at::empty({B}, options.dtype(at::kLong)),
          at::empty({B}, options.dtype(at::kLong))};
}

VerifyResult tree_verify_greedy_cuda(const at::Tensor& candidates, const at::Tensor& target_predict,
                                     const at::Tensor& next_token, const at::Tensor& next_sibling) {
  check_tree_verify_greedy_inputs(candidates, target_predict, next_token, next_sibling);
  const c10::cuda::CUDAGuard device_guard(candidates.device());
  const int64_t B = candidates.size(0), N = candidates.size(1);
  auto [accept_index, accept_len, bonus_token] = make_outputs(B, N, candidates.options());
  if (B == 0) return {accept_index, accept_len, bonus_token};
  const at::Tensor tokens = candidates.contiguous(), predict = target_predict.contiguous(),
                   first_child = next_token.contiguous(), sibling = next_sibling.contiguous();
  const dim3 grid = cuda::checked_grid("tree_verify_greedy", B, 1, 1, kGreedyThreads, 0);
  tree_verify_greedy_kernel<<<grid, kGreedyThreads, 0, cuda::current_stream()>>>(
      tokens.data_ptr<int64_t>(), predict.data_ptr<int64_t>(), first_child.data_ptr<int64_t>(),
      sibling.data_ptr<int64_t>(), accept_index.data_ptr<int64_t>(), accept_len.data_ptr<int64_t>(),
      bonus_token.data_ptr<int64_t>(), N);
  SPARROW_CHECK_LAUNCH();
  return {accept_index, accept_len, bonus_token};
}

VerifyResult tree_verify_sample_cuda(const at::Tensor& candidates, const at::Tensor& target_probs,
                                     const at::Tensor& draft_probs, const at::Tensor& next_token,
                                     const at::Tensor& next_sibling, const at::Tensor& uniform_accept,
                                     const at::Tensor& uniform_final) {
  check_tree_verify_sample_inputs(candidates, target_probs, draft_probs, next_token, next_sibling, uniform_accept,
                                  uniform_final);
  const c10::cuda::CUDAGuard device_guard(candidates.device());
  const int64_t B = candidates.size(0), N = candidates.size(1), V = target_probs.size(2);
  auto [accept_index, accept_len, bonus_token] = make_outputs(B, N, candidates.options());
  if (B == 0) return {accept_index, accept_len, bonus_token};
  const at::Tensor tokens = candidates.contiguous(), first_child = next_token.contiguous(),
                   sibling = next_sibling.contiguous(), u_accept = uniform_accept.contiguous(),
                   u_final = uniform_final.contiguous();
  const at::Tensor residual = at::empty({B, V}, target_probs.options());

  SampleParams p;
  p.candidates = tokens.data_ptr<int64_t>();
  p.target_probs = target_probs.data_ptr<float>();
  p.draft_probs = draft_probs.data_ptr<float>();
  p.target_stride_b = target_probs.stride(0), p.target_stride_n = target_probs.stride(1);
  p.draft_stride_b = draft_probs.stride(0), p.draft_stride_n = draft_probs.stride(1);
  p.next_token = first_child.data_ptr<int64_t>();
  p.next_sibling = sibling.data_ptr<int64_t>();
  p.uniform_accept = u_accept.data_ptr<float>();
  p.uniform_final = u_final.data_ptr<float>();
  p.residual = residual.data_ptr<float>();
  p.accept_index = accept_index.data_ptr<int64_t>();
  p.accept_len = accept_len.data_ptr<int64_t>();
  p.bonus_token = bonus_token.data_ptr<int64_t>();
  p.N = N, p.V = V;

  // float4 sweeps when every row the kernel reads starts on a 16-byte boundary
  bool vectorized = V % 4 == 0;
  for (const at::Tensor& t : {target_probs, draft_probs}) {
    vectorized = vectorized && cuda::is_aligned(t.data_ptr(), 16) && t.stride(0) % 4 == 0 && t.stride(1) % 4 == 0;
  }
  const dim3 grid = cuda::checked_grid("tree_verify_sample", B, 1, 1, kSampleThreads, 0);
  if (vectorized) {
    tree_verify_sample_kernel<4><<<grid, kSampleThreads, 0, cuda::current_stream()>>>(p);
  } else {
    tree_verify_sample_kernel<1><<<grid, kSampleThreads, 0, cuda::current_stream()>>>(p);
  }
  SPARROW_CHECK_LAUNCH();
  return {accept_index, accept_len, bonus_token};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparrow, CUDA, m) {
  m.impl("tree_verify_greedy", &tree_verify_greedy_cuda);
  m.impl("tree_verify_sample", &tree_verify_sample_cuda);
}

}  // namespace sparrow
