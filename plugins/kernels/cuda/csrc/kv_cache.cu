// KV cache write: each new token's key and value go to the slot slot_mapping names.
#include "cuda_utils.cuh"

namespace fastgen_cuda {
namespace {

// One block per token; threads stride over the token's Hkv * D elements. key/value rows may be
// strided views (a fused qkv projection split in Python), so each is read through its strides.
template <typename T>
__global__ void write_kv_kernel(const WriteKVParams p) {
  const int64_t token = blockIdx.x;
  const int64_t slot = p.slot_mapping[token];
  if (slot < 0) return;
  const T* __restrict__ key = static_cast<const T*>(p.key);
  const T* __restrict__ value = static_cast<const T*>(p.value);
  T* __restrict__ k_cache = static_cast<T*>(p.k_cache);
  T* __restrict__ v_cache = static_cast<T*>(p.v_cache);
  const int row = p.num_kv_heads * p.head_dim;
  for (int i = threadIdx.x; i < row; i += blockDim.x) {
    const int head = i / p.head_dim;
    const int d = i % p.head_dim;
    k_cache[slot * row + i] = key[token * p.key_token_stride + head * p.key_head_stride + d];
    v_cache[slot * row + i] = value[token * p.value_token_stride + head * p.value_head_stride + d];
  }
}

}  // namespace

int launch_write_kv(const WriteKVParams& p, DType dtype, void* stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  const int threads = p.num_kv_heads * p.head_dim < 512 ? p.num_kv_heads * p.head_dim : 512;
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    write_kv_kernel<T><<<p.num_tokens, threads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  });
  return cudaGetLastError();
}

}  // namespace fastgen_cuda
