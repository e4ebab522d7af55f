// x @ weight.T (+ bias), for bf16 and fp16 on CPUs without 16-bit matrix instructions (no
// AVX512-BF16, no AMX): there torch's bf16 matmul runs at a sixth of its fp32 rate (11-17 against
// 56-113 GFLOP/s on the 2-core AVX2 test machine). Here the weights are read in place and widened
// in registers, the inputs widened once, and the sums kept in fp32, so a product runs at about the
// fp32 rate on half the weight bytes.
//
// Work is split over the weight's rows (outputs) in chunks, one chunk per task, so each chunk's
// weight rows are read from memory once and reused from the cache for every input row. For 16-bit
// weights, input rows go four at a time against two weight rows (a 4 x 2 tile: eight
// accumulators, each weight vector widened once for four rows); fp32 rows, and the one to three
// 16-bit rows left over, go one at a time against eight weight rows, which keeps eight streams of
// weights in flight. fp32 products of a few rows come here too (the backend's linear says when).
#include <ATen/ops/empty.h>

#include <vector>

#include "dot_tiles.h"

namespace fastgen_cpu {
namespace {

constexpr int64_t kChunkCols = 32;   // weight rows per task: a multiple of the tiles' 2 and 8

template <typename scalar_t>
void linear_chunk(const float* x, int64_t rows, int64_t K, const scalar_t* w, int64_t col_begin, int64_t col_end,
                  float* out, int64_t N) {
  int64_t r = 0;
  // A 4-row tile widens each weight vector once for four rows, which pays for 16-bit weights; fp32
  // weights need no widening, and one row against eight weight rows keeps more of them in flight.
  // Measured on the AVX2 machine at 4 to 16 rows: one row at a time 1.0-1.4x faster for fp32,
  // 1.0-1.5x slower for bf16.
  constexpr bool kRowTiles = !std::is_same_v<scalar_t, float>;
  for (; kRowTiles && r + 4 <= rows; r += 4) {
    int64_t c = col_begin;
    for (; c + 2 <= col_end; c += 2) dot_tile<4, 2>(x + r * K, K, w + c * K, K, K, out + r * N + c, N);
    for (; c < col_end; ++c) dot_tile<4, 1>(x + r * K, K, w + c * K, K, K, out + r * N + c, N);
  }
  for (; r < rows; ++r) {
    int64_t c = col_begin;
    for (; c + 8 <= col_end; c += 8) dot_tile<1, 8>(x + r * K, K, w + c * K, K, K, out + r * N + c, N);
    for (; c < col_end; ++c) dot_tile<1, 1>(x + r * K, K, w + c * K, K, K, out + r * N + c, N);
  }
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const char* op = "fastgen_cpu.linear";
  check_cpu(op, {&x, &weight});
  check_float_dtype(op, x);
  check_same_dtype(op, {&x, &weight});
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), op,
              ": x must be [M, K] and weight [N, K], got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  if (bias.has_value()) {
    check_cpu(op, {&*bias});
    check_same_dtype(op, {&x, &*bias});
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->is_contiguous(), op,
                ": bias must be a contiguous [N], got ", bias->sizes());
  }
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const auto input = x.contiguous();
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  std::vector<float> x_f(M * K), out_f(M * N);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastgen_cpu_linear", [&] {
    load_floats(input.data_ptr<scalar_t>(), x_f.data(), M * K);
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const int64_t chunks = (N + kChunkCols - 1) / kChunkCols;
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        linear_chunk(x_f.data(), M, K, w, i * kChunkCols, std::min(N, (i + 1) * kChunkCols), out_f.data(), N);
      }
    });
    if (bias.has_value()) {
      const scalar_t* b = bias->data_ptr<scalar_t>();
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = 0; n < N; ++n) out_f[m * N + n] += static_cast<float>(b[n]);
      }
    }
    store_floats(out_f.data(), out.data_ptr<scalar_t>(), M * N);
  });
  return out;
}

}  // namespace fastgen_cpu
