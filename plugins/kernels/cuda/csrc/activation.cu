// SiLU-and-multiply, the gated MLP's activation: out = silu(gate) * up for x = [gate | up].
// Math in fp32; as in the reference, silu(gate) is rounded to the input dtype before the product.
#include <cstdint>

#include "cuda_utils.cuh"

namespace fastgen_cuda {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kVectorBytes = 16;

// kWidth elements moved as one 16-byte load or store.
template <typename T, int kWidth>
struct alignas(sizeof(T) * kWidth) Pack {
  T v[kWidth];
};

// One block per token; each thread takes kWidth adjacent features at a time. kWidth > 1 only
// where every row of gate, up and out starts on a 16-byte boundary and I is a multiple of it.
template <typename T, int kWidth>
__global__ void silu_and_mul_kernel(const SiluAndMulParams p) {
  using Vec = Pack<T, kWidth>;
  const int64_t token = blockIdx.x;
  const T* gate = static_cast<const T*>(p.x) + token * p.x_row_stride;
  const T* up = gate + p.inter;
  T* out = static_cast<T*>(p.out) + token * p.inter;
  for (int i = threadIdx.x * kWidth; i < p.inter; i += blockDim.x * kWidth) {
    const Vec g = *reinterpret_cast<const Vec*>(gate + i);
    const Vec u = *reinterpret_cast<const Vec*>(up + i);
    Vec o;
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      const float x = to_float(g.v[j]);
      const float silu = round_to<T>(x / (1.f + expf(-x)));
      o.v[j] = from_float<T>(silu * to_float(u.v[j]));
    }
    *reinterpret_cast<Vec*>(out + i) = o;
  }
}

bool rows_aligned(const SiluAndMulParams& p, int width) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % kVectorBytes == 0; };
  return p.inter % width == 0 && p.x_row_stride % width == 0 && aligned(p.x) && aligned(p.out);
}

template <typename T, int kWidth>
void launch(const SiluAndMulParams& p, cudaStream_t stream) {
  const int threads = block_threads((p.inter + kWidth - 1) / kWidth, kMaxThreads);
  silu_and_mul_kernel<T, kWidth><<<p.num_tokens, threads, 0, stream>>>(p);
}

}  // namespace

int launch_silu_and_mul(const SiluAndMulParams& p, DType dtype, void* stream) {
  if (p.num_tokens == 0 || p.inter == 0) return cudaSuccess;
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int kWidth = kVectorBytes / sizeof(T);
    if (rows_aligned(p, kWidth)) launch<T, kWidth>(p, s);
    else launch<T, 1>(p, s);
  });
  return cudaGetLastError();
}

}  // namespace fastgen_cuda
