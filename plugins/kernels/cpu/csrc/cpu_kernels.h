// Shared helpers of the fastgen CPU kernels: float conversion, the reference's rounding, argument
// checks, and a dynamically scheduled parallel loop.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
// vec_reduce_all, load_to_float: vec.h brings them along with AVX2's vector types, not AVX512's.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <tuple>

namespace fastgen_cpu {

using Vec = at::vec::Vectorized<float>;

// Rows of scalar_t to float and back, vectorised: bf16 widens by a shift, the narrowing rounds to
// nearest even as c10's conversions do.
template <typename scalar_t>
inline void load_floats(const scalar_t* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const auto* bits = reinterpret_cast<const uint16_t*>(src);
    auto* out = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

template <typename scalar_t>
inline void store_floats(const float* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    at::vec::convert(src, dst, n);
  }
}

// Rounds n floats to scalar_t and back, in place, through `scratch` (n of scalar_t): the kernels
// round where the torch reference keeps an intermediate in the input dtype, so bf16 and fp16
// results match it, not just come close.
template <typename scalar_t>
inline void round_floats(float* x, int64_t n, scalar_t* scratch) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    store_floats(x, scratch, n);
    load_floats(scratch, x, n);
  }
}

// The ops' declarations, defined in attention.cpp and elementwise.cpp, registered in ops.cpp.
void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping);
void paged_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& query_start_loc,
                     const at::Tensor& seq_lens, const at::Tensor& block_tables, const at::Tensor& seq_ids,
                     double scale, int64_t window);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                          const at::Tensor& sin, bool is_neox);
at::Tensor silu_and_mul(const at::Tensor& x);
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

inline void check_float_dtype(const char* op, const at::Tensor& t) {
  auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, op, ": dtype ", d,
              " is not supported; use float32, bfloat16 or float16");
}

inline void check_same_dtype(const char* op, std::initializer_list<const at::Tensor*> tensors) {
  const auto dtype = (*tensors.begin())->scalar_type();
  for (const auto* t : tensors) {
    TORCH_CHECK(t->scalar_type() == dtype, op, ": tensors must share one dtype, got ", dtype, " and ",
                t->scalar_type());
  }
}

inline void check_cpu(const char* op, std::initializer_list<const at::Tensor*> tensors) {
  for (const auto* t : tensors) {
    TORCH_CHECK(t->device().is_cpu(), op, ": every tensor must be on the CPU, got one on ", t->device());
  }
}

inline void check_rows(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.stride(-1) == 1, op, ": ", name, " must be contiguous in its last dimension, got strides ",
              t.strides());
}

// Runs body(i) for i in [0, n) on torch's intra-op threads, handing out items one at a time so
// that uneven items (long and short sequences, causal tiles) balance across threads.
template <typename Body>
void parallel_dynamic(int64_t n, const Body& body) {
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) body(i);
    }
  });
}

}  // namespace fastgen_cpu
