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

// sums[r * width + j] = x_r . w_j for the chunk's weight rows w_j = w + j * K, j < width.
template <typename scalar_t>
void linear_chunk(const float* x, int64_t rows, int64_t K, const scalar_t* w, int64_t width, float* sums) {
  int64_t r = 0;
  // A 4-row tile widens each weight vector once for four rows, which pays for 16-bit weights; fp32
  // weights need no widening, and one row against eight weight rows keeps more of them in flight.
  // Measured on the AVX2 machine at 4 to 16 rows: one row at a time 1.0-1.4x faster for fp32,
  // 1.0-1.5x slower for bf16.
  constexpr bool kRowTiles = !std::is_same_v<scalar_t, float>;
  for (; kRowTiles && r + 4 <= rows; r += 4) {
    int64_t c = 0;
    for (; c + 2 <= width; c += 2) dot_tile<4, 2>(x + r * K, K, w + c * K, K, K, sums + r * width + c, width);
    for (; c < width; ++c) dot_tile<4, 1>(x + r * K, K, w + c * K, K, K, sums + r * width + c, width);
  }
  for (; r < rows; ++r) {
    int64_t c = 0;
    for (; c + 8 <= width; c += 8) dot_tile<1, 8>(x + r * K, K, w + c * K, K, K, sums + r * width + c, width);
    for (; c < width; ++c) dot_tile<1, 1>(x + r * K, K, w + c * K, K, K, sums + r * width + c, width);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastgen_cpu_linear", [&] {
    // fp32 inputs are read as they are; 16-bit ones widened once, for every chunk to share.
    std::vector<float> widened;
    const float* xs;
    if constexpr (std::is_same_v<scalar_t, float>) {
      xs = input.data_ptr<float>();
    } else {
      widened.resize(M * K);
      load_floats(input.data_ptr<scalar_t>(), widened.data(), M * K);
      xs = widened.data();
    }
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t chunks = (N + kChunkCols - 1) / kChunkCols;
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> sums(M * kChunkCols);   // one chunk's [M, width] sums, then rounded into out
      for (int64_t i = begin; i < end; ++i) {
        const int64_t col = i * kChunkCols, width = std::min(N - col, kChunkCols);
        linear_chunk(xs, M, K, w + col * K, width, sums.data());
        for (int64_t m = 0; m < M; ++m) {
          float* row = sums.data() + m * width;
          if (b != nullptr) {
            for (int64_t j = 0; j < width; ++j) row[j] += static_cast<float>(b[col + j]);
          }
          store_floats(row, dst + m * N + col, width);
        }
      }
    });
  });
  return out;
}

}  // namespace fastgen_cpu
