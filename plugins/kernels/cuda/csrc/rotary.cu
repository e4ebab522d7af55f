// Rotary position embedding: neox (halves) and gpt-j (adjacent pairs) layouts, partial rotary.
// Numerics follow the reference, which multiplies in the input dtype: cos and sin are rounded to
// it, each product is rounded to it, and their sum is rounded once more when stored.
#include "cuda_utils.cuh"

namespace fastgen_cuda {
namespace {

constexpr int kMaxThreads = 512;

// Head `head` of a token's rows, query heads first, then key heads. Out-of-place (the protocol
// leaves the inputs untouched), so the dims past R are copied through.
template <typename T>
__device__ __forceinline__ const T* input_row(const RotaryParams& p, int64_t token, int head) {
  return head < p.num_heads
             ? static_cast<const T*>(p.q) + token * p.q_token_stride + head * p.q_head_stride
             : static_cast<const T*>(p.k) + token * p.k_token_stride + (head - p.num_heads) * p.k_head_stride;
}

template <typename T>
__device__ __forceinline__ T* output_row(const RotaryParams& p, int64_t token, int head) {
  return head < p.num_heads
             ? static_cast<T*>(p.q_out) + (token * p.num_heads + head) * p.head_dim
             : static_cast<T*>(p.k_out) + (token * p.num_kv_heads + head - p.num_heads) * p.head_dim;
}

// One block per token rotates all of its query and key heads, so q and k take one launch and the
// token's cos and sin are read from global memory once.
template <typename T>
__global__ void rotary_kernel(const RotaryParams p) {
  extern __shared__ float cos_sin[];   // [2 * R/2]: cos, then sin, each rounded to T
  const int half = p.rotary_half;
  float* cos_row = cos_sin;
  float* sin_row = cos_sin + half;
  const int64_t token = blockIdx.x;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    cos_row[i] = round_to<T>(p.cos[token * half + i]);
    sin_row[i] = round_to<T>(p.sin[token * half + i]);
  }
  __syncthreads();

  const int heads = p.num_heads + p.num_kv_heads;
  for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
    const int head = i / half;
    const int pair = i % half;
    const int first = p.is_neox ? pair : 2 * pair;
    const int second = p.is_neox ? pair + half : 2 * pair + 1;
    const T* in = input_row<T>(p, token, head);
    T* out = output_row<T>(p, token, head);
    const float x1 = to_float(in[first]), x2 = to_float(in[second]);
    const float c = cos_row[pair], s = sin_row[pair];
    // __fmul_rn: never contracted into an fma with the sum, which would skip the products' rounding.
    out[first] = from_float<T>(round_to<T>(__fmul_rn(x1, c)) - round_to<T>(__fmul_rn(x2, s)));
    out[second] = from_float<T>(round_to<T>(__fmul_rn(x2, c)) + round_to<T>(__fmul_rn(x1, s)));
  }

  const int rotated = 2 * half;
  const int rest = p.head_dim - rotated;
  for (int i = threadIdx.x; i < heads * rest; i += blockDim.x) {
    const int head = i / rest;
    const int d = rotated + i % rest;
    output_row<T>(p, token, head)[d] = input_row<T>(p, token, head)[d];
  }
}

}  // namespace

int launch_rotary(const RotaryParams& p, DType dtype, void* stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  const int heads = p.num_heads + p.num_kv_heads;
  const int rest = p.head_dim - 2 * p.rotary_half;
  const int work = heads * (p.rotary_half > rest ? p.rotary_half : rest);
  const size_t shared = 2 * p.rotary_half * sizeof(float);
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rotary_kernel<T><<<p.num_tokens, block_threads(work, kMaxThreads), shared,
                       static_cast<cudaStream_t>(stream)>>>(p);
  });
  return cudaGetLastError();
}

}  // namespace fastgen_cuda
