// Sampling, one block per row of logits. A greedy row takes its argmax; a sampled row the argmax of
// logit / temperature + Gumbel noise (the Gumbel-max trick draws from the softmax without computing
// it) over the tokens at or above its top-k / top-p cut. The cut is found without sorting: a radix
// search over the scaled logits' order keys, 8 bits a pass, each pass a shared-memory histogram of
// the candidates' counts and softmax masses. What is kept is what kernels.triton keeps
// (plugins/kernels/triton/top_k_top_p.py states it against the reference): tokens tied at the cut
// all stay, top-p is taken on the top-k distribution renormalised over exactly k tokens. The noise
// is Philox 4x32-10, keyed by the row's seed and counted by token.
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "cuda_utils.cuh"

namespace fastgen_cuda {
namespace {

constexpr int kSampleThreads = 512;
constexpr int kSampleWarps = kSampleThreads / kWarpSize;
constexpr int kBins = 256;   // 8 bits of the key per pass: 4 passes settle a 32-bit key
// A bin's softmax mass is summed in fixed point, units of 2^-40: integer atomics add up to the same
// total in any order, so a top-p cut is the same on every run (float atomics' order, and with it
// the last bit of a sum, changes from run to run). A token's mass is at most 1 (2^40 units), so
// 2^23 tokens fit in 64 bits; a mass under 2^-40 counts as 0.
constexpr float kMassUnits = 1099511627776.f;   // 2^40

// logit / temperature; a greedy row's logits as they are. Every pass computes a token's value
// with this, so it is bit-identical where the cut is taken and where it is applied.
__device__ __forceinline__ float scaled(float logit, float temperature) {
  return temperature > 0.f ? logit / temperature : logit;
}

// float -> uint32 in the floats' order (NaN aside): negatives have every bit flipped, the others
// the sign bit set.
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t bits = __float_as_uint(x);
  return bits & 0x80000000u ? ~bits : bits | 0x80000000u;
}

__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float(key & 0x80000000u ? key & 0x7fffffffu : ~key);
}

// Uniform in (0, 1) for token `index` of the stream `seed`: Philox 4x32-10's first word.
__device__ __forceinline__ float uniform(uint64_t seed, uint32_t index) {
  uint32_t c0 = index, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return (static_cast<float>(c0 >> 8) + 0.5f) * (1.f / 16777216.f);
}

// The block's sum or max of x, in every thread. `scratch` holds a value per warp.
template <bool kMax>
__device__ float block_reduce(float x, float* scratch) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(0xffffffff, x, offset);
    x = kMax ? fmaxf(x, other) : x + other;
  }
  if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = x;
  __syncthreads();
  x = scratch[0];
  for (int w = 1; w < kSampleWarps; ++w) x = kMax ? fmaxf(x, scratch[w]) : x + scratch[w];
  __syncthreads();   // scratch is free again
  return x;
}

// The block's best (value, index): the largest value, the lowest index among equals (as argmax).
__device__ int block_argmax(float value, int index, float* scratch, int* scratch_index) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(0xffffffff, value, offset);
    const int other_index = __shfl_xor_sync(0xffffffff, index, offset);
    if (other > value || (other == value && other_index < index)) {
      value = other;
      index = other_index;
    }
  }
  if (threadIdx.x % kWarpSize == 0) {
    scratch[threadIdx.x / kWarpSize] = value;
    scratch_index[threadIdx.x / kWarpSize] = index;
  }
  __syncthreads();
  value = scratch[0];
  index = scratch_index[0];
  for (int w = 1; w < kSampleWarps; ++w) {
    if (scratch[w] > value || (scratch[w] == value && scratch_index[w] < index)) {
      value = scratch[w];
      index = scratch_index[w];
    }
  }
  __syncthreads();
  return index;
}

struct Histogram {
  int count[kBins];
  unsigned long long mass[kBins];   // in units of 2^-40 (kMassUnits)
  uint32_t prefix;   // the search's result so far, shared with the block
  float above;       // the count or mass of the candidates above the prefix's range
};

// The key at which the candidates (keys >= floor), taken from the largest down, first reach
// `target`: counted (kByMass false: the target-th largest) or by softmax mass exp(x - row_max)
// (the key of the last token whose candidates above it weigh less than the target; the smallest
// candidate if none do). Each pass bins the candidates that share the prefix found so far by the
// next 8 bits; one thread walks the bins from the top.
template <bool kByMass>
__device__ uint32_t radix_search(const float* __restrict__ logits, int vocab, float temperature,
                                 float row_max, uint32_t floor, float target, Histogram& h) {
  uint32_t prefix = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < kBins; b += blockDim.x) {
      h.count[b] = 0;
      h.mass[b] = 0;
    }
    __syncthreads();
    const uint32_t settled = shift == 24 ? 0u : ~0u << (shift + 8);   // the bits the prefix fixes
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float x = scaled(logits[i], temperature);
      const uint32_t key = order_key(x);
      if (key < floor || (key & settled) != prefix) continue;
      const int bin = (key >> shift) & (kBins - 1);
      atomicAdd(&h.count[bin], 1);
      if (kByMass) atomicAdd(&h.mass[bin], static_cast<unsigned long long>(__expf(x - row_max) * kMassUnits));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float above = shift == 24 ? 0.f : h.above;
      int chosen = -1, lowest = -1;
      float above_lowest = 0.f;
      for (int b = kBins - 1; b >= 0; --b) {
        if (h.count[b] == 0) continue;
        const float amount = kByMass ? static_cast<float>(h.mass[b]) / kMassUnits
                                     : static_cast<float>(h.count[b]);
        if (above + amount >= target) {
          chosen = b;
          break;
        }
        lowest = b;
        above_lowest = above;
        above += amount;
      }
      if (chosen < 0) {   // every candidate stays: the search goes on in the lowest bin
        chosen = lowest;
        above = above_lowest;
      }
      h.prefix = prefix | static_cast<uint32_t>(chosen) << shift;
      h.above = above;
    }
    __syncthreads();
    prefix = h.prefix;
  }
  return prefix;
}

// The row's cut: the smallest scaled logit it keeps (-inf: no filter).
__device__ float find_cut(const float* __restrict__ logits, int vocab, float temperature, int64_t top_k,
                          float top_p, float* scratch, Histogram& h) {
  const bool by_k = top_k > 0 && top_k < vocab;
  const bool by_p = top_p < 1.f;
  float row_max = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) row_max = fmaxf(row_max, scaled(logits[i], temperature));
  row_max = block_reduce<true>(row_max, scratch);

  uint32_t floor = 0;
  float total = 0.f;   // the softmax mass top-p is taken on
  if (by_k) {
    floor = radix_search<false>(logits, vocab, temperature, row_max, 0, static_cast<float>(top_k), h);
    // The mass of exactly k tokens, as the reference renormalises: those above the cut and as many
    // of those at it as make k.
    float count_above = 0.f, mass_above = 0.f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float x = scaled(logits[i], temperature);
      if (order_key(x) > floor) {
        count_above += 1.f;
        mass_above += __expf(x - row_max);
      }
    }
    count_above = block_reduce<false>(count_above, scratch);
    mass_above = block_reduce<false>(mass_above, scratch);
    total = mass_above + (static_cast<float>(top_k) - count_above) * __expf(key_value(floor) - row_max);
  } else if (by_p) {
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) total += __expf(scaled(logits[i], temperature) - row_max);
    total = block_reduce<false>(total, scratch);
  }
  if (by_p) floor = radix_search<true>(logits, vocab, temperature, row_max, floor, top_p * total, h);
  return by_k || by_p ? key_value(floor) : -INFINITY;
}

// Min blocks 1: left to itself ptxas aims at 4 blocks an SM (32 registers) and spills the 64-bit
// mass sums; 42 registers still let 3 blocks run.
__global__ void __launch_bounds__(kSampleThreads, 1) sample_kernel(const SampleParams p) {
  __shared__ float scratch[kSampleWarps];
  __shared__ int scratch_index[kSampleWarps];
  __shared__ Histogram histogram;
  const int row = blockIdx.x;
  const float* logits = p.logits + row * p.row_stride;
  const float temperature = p.temperatures[row];
  const bool greedy = temperature <= 0.f;
  const float cut = greedy                     ? -INFINITY
                    : p.given_cuts != nullptr ? p.given_cuts[row]
                                              : find_cut(logits, p.vocab, temperature, p.top_k[row], p.top_p[row],
                                                         scratch, histogram);
  if (p.cuts != nullptr && threadIdx.x == 0) p.cuts[row] = cut;
  const auto seed = static_cast<uint64_t>(p.seeds[row]);
  float best = -INFINITY;
  int best_index = p.vocab;
  for (int i = threadIdx.x; i < p.vocab; i += blockDim.x) {
    const float logit = logits[i];
    const float x = scaled(logit, temperature);
    if (logit == -INFINITY || x < cut) continue;
    const float key = greedy ? logit : x - logf(-logf(uniform(seed, static_cast<uint32_t>(i))));
    if (key > best) {   // strict: a thread's tokens come in order, the first of equals wins
      best = key;
      best_index = i;
    }
  }
  const int winner = block_argmax(best, best_index, scratch, scratch_index);
  if (threadIdx.x == 0) p.out[row] = winner == p.vocab ? 0 : winner;   // a row all -inf: token 0
}

}  // namespace

int launch_sample(const SampleParams& p, void* stream) {
  if (p.num_rows == 0) return cudaSuccess;
  sample_kernel<<<p.num_rows, kSampleThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return cudaGetLastError();
}

}  // namespace fastgen_cuda
