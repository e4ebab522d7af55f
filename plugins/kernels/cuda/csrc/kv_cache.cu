// KV cache write: each new token's key and value go to the slot slot_mapping names.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common.h"

namespace fastgen_cuda {
namespace {

// One block per token; threads stride over the token's Hkv * D elements. key/value rows may be
// strided views (a fused qkv projection split in Python), so each is read through its strides.
template <typename scalar_t>
__global__ void write_kv_kernel(const scalar_t* __restrict__ key, const scalar_t* __restrict__ value,
                                scalar_t* __restrict__ k_cache, scalar_t* __restrict__ v_cache,
                                const int64_t* __restrict__ slot_mapping, int64_t key_token_stride,
                                int64_t key_head_stride, int64_t value_token_stride,
                                int64_t value_head_stride, int num_kv_heads, int head_dim) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0) return;
  const int row = num_kv_heads * head_dim;
  for (int i = threadIdx.x; i < row; i += blockDim.x) {
    const int head = i / head_dim;
    const int d = i % head_dim;
    k_cache[slot * row + i] = key[token * key_token_stride + head * key_head_stride + d];
    v_cache[slot * row + i] = value[token * value_token_stride + head * value_head_stride + d];
  }
}

void write_kv(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
              const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  constexpr const char* op = "fastgen_cuda::write_kv";
  for (const auto* t : {&key, &value, &k_cache, &v_cache, &slot_mapping}) {
    TORCH_CHECK(t->is_cuda(), op, ": every argument must be on a CUDA device, got ", t->device());
    TORCH_CHECK(t->device() == key.device(), op, ": every argument must be on one device, got ",
                t->device(), " and ", key.device());
  }
  FASTGEN_CHECK_DIM(op, key, 3);
  FASTGEN_CHECK_DIM(op, k_cache, 4);
  FASTGEN_CHECK_DIM(op, slot_mapping, 1);
  FASTGEN_CHECK_DTYPE(op, slot_mapping, at::kLong);
  TORCH_CHECK(value.sizes() == key.sizes(), op, ": value must have key's shape ", key.sizes(),
              ", got ", value.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have k_cache's shape ",
              k_cache.sizes(), ", got ", v_cache.sizes());
  TORCH_CHECK(key.size(0) == slot_mapping.size(0), op, ": slot_mapping must hold one slot per token (",
              key.size(0), "), got ", slot_mapping.size(0));
  TORCH_CHECK(key.size(1) == k_cache.size(2) && key.size(2) == k_cache.size(3), op,
              ": key heads and head size ", key.sizes().slice(1), " must match the cache's ",
              k_cache.sizes().slice(2));
  for (const auto* t : {&value, &k_cache, &v_cache}) {
    TORCH_CHECK(t->scalar_type() == key.scalar_type(), op, ": key, value and the caches must share "
                "one dtype, got ", key.scalar_type(), " and ", t->scalar_type());
  }
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op, ": the caches must be contiguous");
  FASTGEN_CHECK_LAST_DIM_CONTIGUOUS(op, key);
  FASTGEN_CHECK_LAST_DIM_CONTIGUOUS(op, value);

  const int64_t num_tokens = key.size(0);
  if (num_tokens == 0) return;
  const int num_kv_heads = key.size(1);
  const int head_dim = key.size(2);
  const auto slots = slot_mapping.contiguous();
  const c10::cuda::CUDAGuard guard(key.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int threads = std::min(num_kv_heads * head_dim, 512);
  FASTGEN_DISPATCH_FLOATING(key.scalar_type(), "fastgen_cuda::write_kv", [&] {
    write_kv_kernel<scalar_t><<<num_tokens, threads, 0, stream>>>(
        key.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
        v_cache.data_ptr<scalar_t>(), slots.data_ptr<int64_t>(), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), num_kv_heads, head_dim);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen_cuda, CUDA, m) { m.impl("write_kv", &write_kv); }

}  // namespace fastgen_cuda
