// Tiles of dot products over rows in memory, shared by the attention scores (query rows x key rows)
// and the linear op (input rows x weight rows): kRows fp32 rows against kCols rows of the cache's or
// weight's dtype, read in place and widened in registers, one vector accumulator per pair.
#pragma once

#include "cpu_kernels.h"

namespace fastgen_cpu {

// Vec::size() elements from p as floats; with `count`, only that many, the rest zeros.
template <typename scalar_t>
inline Vec load_vec(const scalar_t* p, int64_t count) {
  float values[Vec::size()] = {};
  load_floats(p, values, count);
  return Vec::loadu(values);
}

template <typename scalar_t>
inline Vec load_vec(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return Vec::loadu(p);
  } else if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    Vec out;
    at::vec::load_to_float<scalar_t>(p, out);
    return out;
  } else {   // double: dispatched with the others, never run (the ops check the dtype)
    return load_vec(p, Vec::size());
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// The lane sums of eight 8-lane vectors as one vector (lane j: the sum of a[j]'s lanes), in 8
// instructions where eight separate reductions take about 48: pairwise horizontal adds, then
// the two 128-bit halves added.
inline Vec sum_lanes8(const Vec* a) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}
#endif

// One vector's span [d, d + count) of a tile: acc[r * kCols + c] += a_r[d..] * b_c[d..], the
// whole vector (count == Vec::size()) unless kPartial. The smaller operand set is held in
// registers and the larger streamed past it, so a tile needs kRows * kCols + min(kRows, kCols) + 1
// vector registers. Inlined by force, as dot_tile is: a call left in place keeps the accumulators
// in memory (measured 1.2-1.3x slower in the attention's scores).
template <int kRows, int kCols, bool kPartial, typename scalar_t>
C10_ALWAYS_INLINE void dot_step(Vec* acc, const float* a, int64_t a_stride, const scalar_t* b, int64_t b_stride,
                                int64_t d, int64_t count) {
  if constexpr (kRows >= kCols) {
    Vec bv[kCols];
    for (int c = 0; c < kCols; ++c) {
      bv[c] = kPartial ? load_vec(b + c * b_stride + d, count) : load_vec(b + c * b_stride + d);
    }
    for (int r = 0; r < kRows; ++r) {
      const Vec av = kPartial ? Vec::loadu(a + r * a_stride + d, count) : Vec::loadu(a + r * a_stride + d);
      for (int c = 0; c < kCols; ++c) acc[r * kCols + c] = at::vec::fmadd(av, bv[c], acc[r * kCols + c]);
    }
  } else {
    Vec av[kRows];
    for (int r = 0; r < kRows; ++r) {
      av[r] = kPartial ? Vec::loadu(a + r * a_stride + d, count) : Vec::loadu(a + r * a_stride + d);
    }
    for (int c = 0; c < kCols; ++c) {
      const Vec bv = kPartial ? load_vec(b + c * b_stride + d, count) : load_vec(b + c * b_stride + d);
      for (int r = 0; r < kRows; ++r) acc[r * kCols + c] = at::vec::fmadd(av[r], bv, acc[r * kCols + c]);
    }
  }
}

// out[r * out_stride + c] = a_r . b_c over n dims, for kRows fp32 rows a_r = a + r * a_stride and
// kCols rows b_c = b + c * b_stride: each row of b is loaded (and widened) once for all kRows rows
// of a, and each dot product costs one horizontal sum at the end, not one per vector.
template <int kRows, int kCols, typename scalar_t>
C10_ALWAYS_INLINE void dot_tile(const float* a, int64_t a_stride, const scalar_t* b, int64_t b_stride, int64_t n,
                                float* out, int64_t out_stride) {
  constexpr int64_t kLanes = Vec::size();
  Vec acc[kRows * kCols];
  for (int i = 0; i < kRows * kCols; ++i) acc[i] = Vec(0.f);
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) dot_step<kRows, kCols, false>(acc, a, a_stride, b, b_stride, d, kLanes);
  if (d < n) dot_step<kRows, kCols, true>(acc, a, a_stride, b, b_stride, d, n - d);   // the rest, zero-filled
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (kRows * kCols == 8) {
    float sums[8];
    sum_lanes8(acc).store(sums);
    for (int r = 0; r < kRows; ++r) {
      for (int c = 0; c < kCols; ++c) out[r * out_stride + c] = sums[r * kCols + c];
    }
    return;
  }
#endif
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kCols; ++c) {
      out[r * out_stride + c] = at::vec::vec_reduce_all<float>([](const Vec& x, const Vec& y) { return x + y; },
                                                               acc[r * kCols + c]);
    }
  }
}

}  // namespace fastgen_cpu
