// RMSNorm, optionally fused with the residual add before it. Numerics follow the reference:
// the sum x + residual is rounded to the input dtype, normalised in fp32, rounded back to the
// input dtype and then scaled by the weight in the input dtype.
#include "cuda_utils.cuh"

namespace fastgen_cuda {
namespace {

constexpr int kMaxThreads = 1024;

// Sum over the block; every thread gets the total. blockDim.x is a multiple of the warp size.
__device__ float block_sum(float x) {
  __shared__ float partials[kMaxThreads / kWarpSize];
  x = warp_sum(x);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (lane == 0) partials[warp] = x;
  __syncthreads();
  return warp_sum(lane < blockDim.x / kWarpSize ? partials[lane] : 0.f);
}

// One block per row. With a residual, residual_out receives x + residual and the norm is of it.
template <typename T>
__global__ void rms_norm_kernel(const RMSNormParams p) {
  const int64_t row = blockIdx.x;
  const T* x_row = static_cast<const T*>(p.x) + row * p.x_row_stride;
  const T* res_row = p.residual ? static_cast<const T*>(p.residual) + row * p.residual_row_stride : nullptr;
  T* sum_row = p.residual ? static_cast<T*>(p.residual_out) + row * p.hidden : nullptr;
  const T* weight = static_cast<const T*>(p.weight);
  float squares = 0.f;
  for (int i = threadIdx.x; i < p.hidden; i += blockDim.x) {
    T v = x_row[i];
    if (res_row) {
      v = from_float<T>(to_float(v) + to_float(res_row[i]));
      sum_row[i] = v;
    }
    const float f = to_float(v);
    squares += f * f;
  }
  const float inv_rms = rsqrtf(block_sum(squares) / p.hidden + p.eps);
  // Each thread reads back only what it wrote above, so no barrier is needed.
  const T* in_row = sum_row ? sum_row : x_row;
  T* out_row = static_cast<T*>(p.out) + row * p.hidden;
  for (int i = threadIdx.x; i < p.hidden; i += blockDim.x) {
    const T normed = from_float<T>(to_float(in_row[i]) * inv_rms);
    out_row[i] = from_float<T>(to_float(weight[i]) * to_float(normed));
  }
}

}  // namespace

int launch_rms_norm(const RMSNormParams& p, DType dtype, void* stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  // Whole warps, as block_sum needs, and no more threads than a row has features.
  const int threads = block_threads(p.hidden, kMaxThreads);
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rms_norm_kernel<T><<<p.num_tokens, threads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  });
  return cudaGetLastError();
}

}  // namespace fastgen_cuda
