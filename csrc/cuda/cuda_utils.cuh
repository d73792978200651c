// Shared plumbing of the CUDA kernels in csrc/cuda/: launch-configuration checks, the
// launch-error check after every launch, device queries, vector-load types and warp/block
// reductions. It holds no op logic and no input validation (that is csrc/checks.h, shared
// with the CPU kernels, so both backends raise the same messages).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

namespace sparrow {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kDefaultSmemBytes = 48 * 1024;  // above this a kernel must opt in

// After every launch: surfaces launch failures (bad configuration, too many resources) at
// the launch site with a C++ error instead of a later, unrelated CUDA error.
#define SPARROW_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline cudaStream_t current_stream() {
  return at::cuda::getCurrentCUDAStream().stream();
}

inline int sm_count() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// The grid for a launch of `threads`-thread blocks using `smem_bytes` of dynamic shared memory,
// after checking that the device can launch it (sizes in int64, so nothing wraps on the way);
// the error names the op and the limit instead of a later generic CUDA launch failure.
inline dim3 checked_grid(const char* op, int64_t x, int64_t y, int64_t z, int threads, size_t smem_bytes) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(threads >= 1 && threads <= prop->maxThreadsPerBlock, op, ": CUDA block of ", threads,
              " threads is outside [1, ", prop->maxThreadsPerBlock, "]");
  TORCH_CHECK(x >= 1 && y >= 1 && z >= 1 && x <= prop->maxGridSize[0] && y <= prop->maxGridSize[1] &&
                  z <= prop->maxGridSize[2],
              op, ": CUDA grid (", x, ", ", y, ", ", z, ") exceeds the device limit (", prop->maxGridSize[0], ", ",
              prop->maxGridSize[1], ", ", prop->maxGridSize[2], "); the input is too large for this kernel");
  TORCH_CHECK(smem_bytes <= prop->sharedMemPerBlockOptin, op, ": needs ", smem_bytes,
              " bytes of shared memory per block, the device allows ", prop->sharedMemPerBlockOptin);
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(z));
}

// Lets `kernel` use more than 48 KiB of dynamic shared memory on the current device. Called
// before each such launch (a cheap host call; caching it per kernel type would conflate kernels
// that share a signature).
template <typename Kernel>
inline void allow_dynamic_smem(Kernel kernel, size_t smem_bytes) {
  if (smem_bytes <= static_cast<size_t>(kDefaultSmemBytes)) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem_bytes)));
}

// True when `ptr` can be read in `bytes`-sized vectors.
inline bool is_aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(ptr) % static_cast<std::uintptr_t>(bytes) == 0;
}

// ----------------------------------------------------------------------------- device helpers
// VEC elements moved as one aligned vector (16 bytes = one LDG.128 / LDS.128 when VEC * sizeof
// is 16).
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// An opaque `BYTES`-wide word for moving data of any dtype.
template <int BYTES>
struct Word;
template <>
struct Word<16> {
  using type = uint4;
};
template <>
struct Word<8> {
  using type = uint2;
};
template <>
struct Word<4> {
  using type = uint32_t;
};
template <>
struct Word<2> {
  using type = uint16_t;
};
template <>
struct Word<1> {
  using type = uint8_t;
};

__device__ __forceinline__ float device_exp2(float x) {
  return exp2f(x);
}
__device__ __forceinline__ double device_exp2(double x) {
  return exp2(x);
}
__device__ __forceinline__ float device_log2(float x) {
  return log2f(x);
}
__device__ __forceinline__ double device_log2(double x) {
  return log2(x);
}
__device__ __forceinline__ float device_exp(float x) {
  return expf(x);
}
__device__ __forceinline__ double device_exp(double x) {
  return exp(x);
}
__device__ __forceinline__ float device_log(float x) {
  return logf(x);
}
__device__ __forceinline__ double device_log(double x) {
  return log(x);
}

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Sum / max over the `width` consecutive lanes of a group (width a power of two <= 32); every
// lane of the warp must call it, every lane of the group gets the result.
template <typename T>
__device__ __forceinline__ T group_sum(T value, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(kFullMask, value, offset);
  }
  return value;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
  return group_sum(value, kWarpSize);
}

// max that propagates NaN from either side (a > b alone would drop a NaN: a NaN score must
// reach the softmax sum, docs/ops.md)
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

template <typename T>
__device__ __forceinline__ T warp_max(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = nan_max(__shfl_xor_sync(kFullMask, value, offset), value);
  }
  return value;
}

// Block-wide sum for a 1-D block of NT threads (NT a multiple of 32, <= 1024); every thread
// gets the total. `scratch` is shared memory of NT / 32 elements; the call synchronises the
// block, so it is safe to call again right away.
template <int NT, typename T>
__device__ __forceinline__ T block_sum(T value, T* scratch) {
  static_assert(NT % kWarpSize == 0 && NT <= 1024, "block_sum needs whole warps");
  constexpr int kWarps = NT / kWarpSize;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  value = warp_sum(value);
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  T total = lane < kWarps ? scratch[lane] : T(0);
  total = warp_sum(total);
  __syncthreads();  // scratch may be reused by the next call
  return total;
}

}  // namespace cuda
}  // namespace sparrow
