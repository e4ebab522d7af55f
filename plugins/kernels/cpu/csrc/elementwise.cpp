// The element-wise ops: fused residual-add + RMSNorm, rotary embedding (neox and gpt-j, partial)
// and SiLU-and-multiply. Each works a row at a time in fp32 and rounds to the input dtype where
// the torch reference keeps an intermediate in that dtype.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <vector>

#include "cpu_kernels.h"

namespace fastgen_cpu {
namespace {

// Rows per parallel task: enough work per task that small steps run on the calling thread.
inline int64_t row_grain(int64_t row_elems) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems));
}

// x, residual (may be null), out_residual (may be null): rows of `hidden`; weight: [hidden].
template <typename scalar_t>
void rms_norm_rows(const scalar_t* x, int64_t x_stride, const scalar_t* residual, int64_t r_stride,
                   const scalar_t* weight, float eps, scalar_t* out, scalar_t* out_residual, int64_t rows,
                   int64_t hidden) {
  std::vector<float> w(hidden);
  load_floats(weight, w.data(), hidden);
  at::parallel_for(0, rows, row_grain(hidden), [&](int64_t begin, int64_t end) {
    std::vector<float> sum(hidden), other(hidden);
    std::vector<scalar_t> scratch(hidden);
    float *s = sum.data(), *o = other.data();
    for (int64_t t = begin; t < end; ++t) {
      load_floats(x + t * x_stride, s, hidden);
      if (residual != nullptr) {
        load_floats(residual + t * r_stride, o, hidden);
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i) s[i] += o[i];
        store_floats(s, out_residual + t * hidden, hidden);
        load_floats(out_residual + t * hidden, s, hidden);
      }
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < hidden; ++i) squares += s[i] * s[i];
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(hidden) + eps);
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i) o[i] = s[i] * inv;
      round_floats(o, hidden, scratch.data());
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i) o[i] *= w[i];
      store_floats(o, out + t * hidden, hidden);
    }
  });
}

// x: [T, heads, dim] rows (strided) -> out: [T, heads, dim] contiguous; cos, sin: [T, half] float.
template <typename scalar_t>
void rotate_heads(const scalar_t* x, int64_t token_stride, int64_t head_stride, int64_t heads, int64_t dim,
                  const float* cos, const float* sin, int64_t half, bool is_neox, scalar_t* out, int64_t tokens) {
  at::parallel_for(0, tokens, row_grain(heads * dim), [&](int64_t begin, int64_t end) {
    // row: one head in float; x1/x2: the pairs' first and second elements; c/s: cos and sin.
    std::vector<float> row(dim), x1(half), x2(half), c(half), s(half), a(half), b(half);
    std::vector<scalar_t> scratch(std::max(dim, half));
    for (int64_t t = begin; t < end; ++t) {
      std::copy(cos + t * half, cos + (t + 1) * half, c.begin());
      std::copy(sin + t * half, sin + (t + 1) * half, s.begin());
      round_floats(c.data(), half, scratch.data());
      round_floats(s.data(), half, scratch.data());
      for (int64_t h = 0; h < heads; ++h) {
        load_floats(x + t * token_stride + h * head_stride, row.data(), dim);
        // neox rotates (i, i + half) pairs, gpt-j adjacent (2i, 2i + 1) pairs.
        for (int64_t i = 0; i < half; ++i) {
          x1[i] = is_neox ? row[i] : row[2 * i];
          x2[i] = is_neox ? row[i + half] : row[2 * i + 1];
        }
        // first = x1 * c - x2 * s, second = x2 * c + x1 * s, each product rounded as the reference does.
        for (int pass = 0; pass < 2; ++pass) {
          const float sign = pass == 0 ? -1.f : 1.f;
          const float* p = pass == 0 ? x1.data() : x2.data();
          const float* q = pass == 0 ? x2.data() : x1.data();
#pragma omp simd
          for (int64_t i = 0; i < half; ++i) {
            a[i] = p[i] * c[i];
            b[i] = q[i] * s[i];
          }
          round_floats(a.data(), half, scratch.data());
          round_floats(b.data(), half, scratch.data());
          for (int64_t i = 0; i < half; ++i) {
            const float v = a[i] + sign * b[i];
            if (is_neox) row[i + pass * half] = v;
            else row[2 * i + pass] = v;
          }
        }
        store_floats(row.data(), out + (t * heads + h) * dim, dim);
      }
    }
  });
}

template <typename scalar_t>
void silu_and_mul_rows(const scalar_t* x, int64_t x_stride, scalar_t* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, row_grain(2 * inter), [&](int64_t begin, int64_t end) {
    const int64_t width = Vec::size();
    std::vector<float> gate(inter), up(inter);
    std::vector<scalar_t> scratch(inter);
    for (int64_t t = begin; t < end; ++t) {
      load_floats(x + t * x_stride, gate.data(), inter);
      load_floats(x + t * x_stride + inter, up.data(), inter);
      for (int64_t i = 0; i < inter; i += width) {
        const int64_t n = std::min(width, inter - i);
        const Vec g = Vec::loadu(gate.data() + i, n);
        (g / (Vec(1.f) + g.neg().exp())).store(gate.data() + i, n);
      }
      round_floats(gate.data(), inter, scratch.data());
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) gate[i] *= up[i];
      store_floats(gate.data(), out + t * inter, inter);
    }
  });
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const char* op = "fastgen_cpu.rms_norm";
  check_cpu(op, {&x, &weight});
  check_float_dtype(op, x);
  check_same_dtype(op, {&x, &weight});
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), op,
              ": x must be [T, E] and weight [E]");
  check_rows(op, "x", x);
  const auto w = weight.contiguous();
  auto out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastgen_cpu_rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), nullptr, 0, w.data_ptr<scalar_t>(),
                            static_cast<float>(eps), out.data_ptr<scalar_t>(), nullptr, x.size(0), x.size(1));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  const char* op = "fastgen_cpu.add_rms_norm";
  check_cpu(op, {&x, &residual, &weight});
  check_float_dtype(op, x);
  check_same_dtype(op, {&x, &residual, &weight});
  TORCH_CHECK(x.dim() == 2 && residual.sizes() == x.sizes() && weight.dim() == 1 && weight.size(0) == x.size(1),
              op, ": x and residual must be [T, E] and weight [E]");
  check_rows(op, "x", x);
  check_rows(op, "residual", residual);
  const auto w = weight.contiguous();
  auto out = at::empty(x.sizes(), x.options());
  auto new_residual = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastgen_cpu_add_rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), residual.data_ptr<scalar_t>(), residual.stride(0),
                            w.data_ptr<scalar_t>(), static_cast<float>(eps), out.data_ptr<scalar_t>(),
                            new_residual.data_ptr<scalar_t>(), x.size(0), x.size(1));
  });
  return {out, new_residual};
}

std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                          const at::Tensor& sin, bool is_neox) {
  const char* op = "fastgen_cpu.rotary";
  check_cpu(op, {&q, &k, &cos, &sin});
  check_float_dtype(op, q);
  check_same_dtype(op, {&q, &k});
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2), op,
              ": q must be [T, H, D] and k [T, Hkv, D]");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == q.size(0) &&
                  2 * cos.size(1) <= q.size(2),
              op, ": cos and sin must be [T, R/2] with R at most the head size");
  check_rows(op, "q", q);
  check_rows(op, "k", k);
  const auto c = cos.to(at::kFloat).contiguous(), s = sin.to(at::kFloat).contiguous();
  auto q_out = at::empty(q.sizes(), q.options());
  auto k_out = at::empty(k.sizes(), k.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastgen_cpu_rotary", [&] {
    for (auto [in, out] : {std::pair<const at::Tensor*, at::Tensor*>{&q, &q_out}, {&k, &k_out}}) {
      rotate_heads<scalar_t>(in->data_ptr<scalar_t>(), in->stride(0), in->stride(1), in->size(1), in->size(2),
                             c.data_ptr<float>(), s.data_ptr<float>(), c.size(1), is_neox,
                             out->data_ptr<scalar_t>(), in->size(0));
    }
  });
  return {q_out, k_out};
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  const char* op = "fastgen_cpu.silu_and_mul";
  check_cpu(op, {&x});
  check_float_dtype(op, x);
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, op, ": x must be [T, 2I]");
  check_rows(op, "x", x);
  const int64_t inter = x.size(1) / 2;
  auto out = at::empty({x.size(0), inter}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastgen_cpu_silu_and_mul", [&] {
    silu_and_mul_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), out.data_ptr<scalar_t>(), x.size(0), inter);
  });
  return out;
}

}  // namespace fastgen_cpu
