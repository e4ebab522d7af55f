// Shared by every fastgen CUDA source: the checks each op runs on its arguments, and the dtype
// dispatch. Each check raises a c10::Error (a RuntimeError in Python) naming the op and argument.
#pragma once

#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>

#define FASTGEN_CHECK_CUDA(op, x) \
  TORCH_CHECK((x).is_cuda(), op, ": ", #x, " must be on a CUDA device, got ", (x).device())
#define FASTGEN_CHECK_DTYPE(op, x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), op, ": ", #x, " must be ", (dt), ", got ", (x).scalar_type())
#define FASTGEN_CHECK_DIM(op, x, n) \
  TORCH_CHECK((x).dim() == (n), op, ": ", #x, " must have ", (n), " dimensions, got shape ", (x).sizes())
#define FASTGEN_CHECK_SAME_DEVICE(op, x, y)                                                   \
  TORCH_CHECK((x).device() == (y).device(), op, ": ", #x, " and ", #y, " must be on one device, got ", \
              (x).device(), " and ", (y).device())
#define FASTGEN_CHECK_LAST_DIM_CONTIGUOUS(op, x) \
  TORCH_CHECK((x).stride(-1) == 1, op, ": ", #x, " must be contiguous in its last dimension")

// fp32, fp16 and bf16: the dtypes models run in. Accumulation is always in fp32.
#define FASTGEN_DISPATCH_FLOATING(dtype, op, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, dtype, op, __VA_ARGS__)

namespace fastgen_cuda {

constexpr int kWarpSize = 32;

}  // namespace fastgen_cuda
