// RMSNorm, optionally fused with the residual add before it. Numerics follow the reference:
// the sum x + residual is rounded to the input dtype, normalised in fp32, rounded back to the
// input dtype and then scaled by the weight in the input dtype.
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

#include "common.h"

namespace fastgen_cuda {
namespace {

constexpr int kMaxThreads = 1024;

// Sum over the block; every thread gets the total.
__device__ float block_sum(float x) {
  __shared__ float partials[kMaxThreads / kWarpSize];
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffff, x, offset);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (lane == 0) partials[warp] = x;
  __syncthreads();
  const int num_warps = blockDim.x / kWarpSize;
  x = lane < num_warps ? partials[lane] : 0.f;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffff, x, offset);
  return x;
}

// One block per row. residual and residual_out are both null (plain RMSNorm) or both set; then
// residual_out receives x + residual and the norm is taken of it.
template <typename scalar_t>
__global__ void rms_norm_kernel(scalar_t* __restrict__ out, scalar_t* __restrict__ residual_out,
                                const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
                                const scalar_t* __restrict__ weight, int64_t x_row_stride,
                                int64_t residual_row_stride, int hidden, float eps) {
  const int64_t row = blockIdx.x;
  const scalar_t* x_row = x + row * x_row_stride;
  const scalar_t* res_row = residual ? residual + row * residual_row_stride : nullptr;
  scalar_t* sum_row = residual_out ? residual_out + row * hidden : nullptr;
  float squares = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    scalar_t v = x_row[i];
    if (res_row) {
      v = static_cast<scalar_t>(static_cast<float>(v) + static_cast<float>(res_row[i]));
      sum_row[i] = v;
    }
    const float f = static_cast<float>(v);
    squares += f * f;
  }
  const float inv_rms = rsqrtf(block_sum(squares) / hidden + eps);
  // Reads back what this thread itself wrote above, so no barrier is needed.
  const scalar_t* in_row = sum_row ? sum_row : x_row;
  scalar_t* out_row = out + row * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const scalar_t normed = static_cast<scalar_t>(static_cast<float>(in_row[i]) * inv_rms);
    out_row[i] = static_cast<scalar_t>(static_cast<float>(weight[i]) * static_cast<float>(normed));
  }
}

void check_rms_norm_args(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  FASTGEN_CHECK_CUDA(op, x);
  FASTGEN_CHECK_SAME_DEVICE(op, x, weight);
  FASTGEN_CHECK_DIM(op, x, 2);
  FASTGEN_CHECK_DIM(op, weight, 1);
  FASTGEN_CHECK_LAST_DIM_CONTIGUOUS(op, x);
  TORCH_CHECK(weight.size(0) == x.size(1), op, ": weight must hold one value per feature (", x.size(1),
              "), got ", weight.size(0));
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight and x must share one dtype, got ",
              weight.scalar_type(), " and ", x.scalar_type());
}

// residual: undefined for plain RMSNorm. out and residual_out: [T, E], contiguous.
void launch_rms_norm(const at::Tensor& out, const at::Tensor& residual_out, const at::Tensor& x,
                     const at::Tensor& residual, const at::Tensor& weight, double eps) {
  const int64_t rows = x.size(0);
  if (rows == 0) return;
  const int hidden = x.size(1);
  const auto w = weight.contiguous();
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Whole warps, as block_sum needs, and no more threads than a row has features.
  const int threads = std::min(kMaxThreads, (hidden + kWarpSize - 1) / kWarpSize * kWarpSize);
  FASTGEN_DISPATCH_FLOATING(x.scalar_type(), "fastgen_cuda::rms_norm", [&] {
    rms_norm_kernel<scalar_t><<<rows, threads, 0, stream>>>(
        out.data_ptr<scalar_t>(), residual.defined() ? residual_out.data_ptr<scalar_t>() : nullptr,
        x.data_ptr<scalar_t>(), residual.defined() ? residual.data_ptr<scalar_t>() : nullptr,
        w.data_ptr<scalar_t>(), x.stride(0), residual.defined() ? residual.stride(0) : 0, hidden,
        static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_args("fastgen_cuda::rms_norm", x, weight);
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  launch_rms_norm(out, at::Tensor(), x, at::Tensor(), weight, eps);
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  constexpr const char* op = "fastgen_cuda::add_rms_norm";
  check_rms_norm_args(op, x, weight);
  FASTGEN_CHECK_SAME_DEVICE(op, x, residual);
  FASTGEN_CHECK_LAST_DIM_CONTIGUOUS(op, residual);
  TORCH_CHECK(residual.sizes() == x.sizes(), op, ": residual must have x's shape ", x.sizes(), ", got ",
              residual.sizes());
  TORCH_CHECK(residual.scalar_type() == x.scalar_type(), op, ": residual and x must share one dtype, got ",
              residual.scalar_type(), " and ", x.scalar_type());
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto residual_out = at::empty_like(x, at::MemoryFormat::Contiguous);
  launch_rms_norm(out, residual_out, x, residual, weight, eps);
  return {out, residual_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen_cuda, CUDA, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
}

}  // namespace fastgen_cuda
