// Paged attention over a ragged batch: decodes and prompt chunks in one launch.
//
// One thread block per (query token, group of up to kHeads query heads that share one key/value
// head, split). The block reads each key and value row once for all its heads (grouped-query
// attention); its warps stride over the block's share of the keys the token may see (causal within
// its sequence, optionally a sliding window), kKeysPerStep keys at a time so that each warp has
// several rows in flight, each warp keeping an online softmax (running max, running sum, weighted
// value sum) per head; the block merges the warps' states at the end. Every query token finds its
// sequence from query_start_loc, so decodes and chunks mix freely. Accumulation is fp32 whatever
// the cache dtype.
//
// Split-KV (flash-decoding): with num_splits > 1 the keys are cut into that many contiguous parts,
// so a step of few long decodes still fills the GPU; each block writes its part's unnormalised
// output, max and sum, and reduce_splits_kernel merges the parts of each (token, head).
#include <cfloat>
#include <cmath>

#include "cuda_utils.cuh"

namespace fastgen_cuda {
namespace {

constexpr int kAttentionWarps = 4;
constexpr int kKeysPerStep = 4;

// The sequence a flat token belongs to: the last s with query_start_loc[s] <= token.
__device__ __forceinline__ int find_sequence(const int* __restrict__ query_start_loc, int num_seqs,
                                             int token) {
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (query_start_loc[mid] <= token) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Each lane's share (dims lane, lane + 32, ...) of kKeysPerStep rows of a cache, in fp32.
template <typename T, int kHeadDim, int kPerLane>
__device__ __forceinline__ void load_rows(const T* __restrict__ cache, const int64_t (&row)[kKeysPerStep],
                                          int lane, float (&values)[kKeysPerStep][kPerLane]) {
#pragma unroll
  for (int j = 0; j < kKeysPerStep; ++j)
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + i * kWarpSize;
      values[j][i] = d < kHeadDim ? to_float(cache[row[j] + d]) : 0.f;
    }
}

// kHeadDim and kHeads are template arguments so each lane's share of a row (kPerLane values) and of
// each head's state lives in registers; for head sizes that are not a multiple of 32 some lanes
// idle on the last element, and a block whose group has fewer than kHeads heads left idles the rest.
template <typename T, int kHeadDim, int kHeads>
__global__ void attention_kernel(const AttentionParams p) {
  constexpr int kPerLane = (kHeadDim + kWarpSize - 1) / kWarpSize;
  const T* __restrict__ k_cache = static_cast<const T*>(p.k_cache);
  const T* __restrict__ v_cache = static_cast<const T*>(p.v_cache);
  const int token = blockIdx.x;
  const int group = p.num_heads / p.num_kv_heads;
  const int blocks_per_kv_head = (group + kHeads - 1) / kHeads;
  const int kv_head = blockIdx.y / blocks_per_kv_head;
  const int first_head = kv_head * group + (blockIdx.y % blocks_per_kv_head) * kHeads;
  const int num_heads_here = min(kHeads, (kv_head + 1) * group - first_head);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;

  const int seq = find_sequence(p.query_start_loc, p.num_seqs, token);
  const int q_start = p.query_start_loc[seq];
  const int q_len = p.query_start_loc[seq + 1] - q_start;
  const int position = p.seq_lens[seq] - q_len + (token - q_start);   // keys 0..position are visible
  const int first_key = p.sliding_window > 0 ? max(0, position - p.sliding_window + 1) : 0;
  // This block's part of [first_key, position]; a part past the end is empty.
  const int per_split = (position - first_key + p.num_splits) / p.num_splits;
  const int begin = first_key + static_cast<int>(blockIdx.z) * per_split;
  const int end = min(begin + per_split, position + 1);
  const int* table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks;

  float q_reg[kHeads][kPerLane];
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    const T* q_row = static_cast<const T*>(p.q) + token * p.q_token_stride + (first_head + h) * p.q_head_stride;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + i * kWarpSize;
      q_reg[h][i] = h < num_heads_here && d < kHeadDim ? to_float(q_row[d]) * p.scale : 0.f;
    }
  }

  float running_max[kHeads], running_sum[kHeads], acc[kHeads][kPerLane];
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    running_max[h] = -FLT_MAX;
    running_sum[h] = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[h][i] = 0.f;
  }
  const int64_t kv_row = static_cast<int64_t>(p.num_kv_heads) * kHeadDim;
  for (int first = begin + warp * kKeysPerStep; first < end; first += kAttentionWarps * kKeysPerStep) {
    // Rows of up to kKeysPerStep keys; a key past the end reads the first's row and weighs nothing.
    int64_t row[kKeysPerStep];
#pragma unroll
    for (int j = 0; j < kKeysPerStep; ++j) {
      const int key = first + j < end ? first + j : first;
      const int64_t slot = static_cast<int64_t>(table[key / p.block_size]) * p.block_size + key % p.block_size;
      row[j] = slot * kv_row + kv_head * kHeadDim;
    }
    float k_val[kKeysPerStep][kPerLane];
    load_rows<T, kHeadDim>(k_cache, row, lane, k_val);
    float score[kKeysPerStep][kHeads];
#pragma unroll
    for (int j = 0; j < kKeysPerStep; ++j)
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        float partial = 0.f;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) partial += q_reg[h][i] * k_val[j][i];
        score[j][h] = first + j < end ? warp_sum(partial) : -INFINITY;
      }
    float v_val[kKeysPerStep][kPerLane];
    load_rows<T, kHeadDim>(v_cache, row, lane, v_val);
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      float new_max = running_max[h];
#pragma unroll
      for (int j = 0; j < kKeysPerStep; ++j) new_max = fmaxf(new_max, score[j][h]);
      const float correction = __expf(running_max[h] - new_max);
      float weight[kKeysPerStep];
      running_sum[h] *= correction;
#pragma unroll
      for (int j = 0; j < kKeysPerStep; ++j) {
        weight[j] = __expf(score[j][h] - new_max);   // 0 for a key past the end
        running_sum[h] += weight[j];
      }
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        float sum = acc[h][i] * correction;
#pragma unroll
        for (int j = 0; j < kKeysPerStep; ++j) sum += weight[j] * v_val[j][i];
        acc[h][i] = sum;
      }
      running_max[h] = new_max;
    }
  }

  // Merge the warps, per head: rescale each to the block-wide max, then sum.
  __shared__ float warp_max[kAttentionWarps][kHeads];
  __shared__ float warp_sum_exp[kAttentionWarps][kHeads];
  __shared__ float warp_acc[kAttentionWarps][kHeads][kHeadDim];
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    if (lane == 0) {
      warp_max[warp][h] = running_max[h];
      warp_sum_exp[warp][h] = running_sum[h];
    }
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + i * kWarpSize;
      if (d < kHeadDim) warp_acc[warp][h][d] = acc[h][i];
    }
  }
  __syncthreads();
  for (int h = 0; h < num_heads_here; ++h) {
    float block_max = -FLT_MAX;
#pragma unroll
    for (int w = 0; w < kAttentionWarps; ++w) block_max = fmaxf(block_max, warp_max[w][h]);
    float total = 0.f;
    float factors[kAttentionWarps];
#pragma unroll
    for (int w = 0; w < kAttentionWarps; ++w) {
      // A warp that saw no key holds sum 0, so its factor does not matter.
      factors[w] = __expf(warp_max[w][h] - block_max);
      total += warp_sum_exp[w][h] * factors[w];
    }
    // Without a split, the output: normalised (the token's own key is always visible, so
    // total > 0). With one, this part's unnormalised output and its state; an empty part leaves
    // sum 0 (and max -FLT_MAX), which gives it no weight in the merge.
    const bool whole = p.num_splits == 1;
    const int64_t out_row = static_cast<int64_t>(token) * p.num_heads + first_head + h;
    const int64_t part = static_cast<int64_t>(blockIdx.z) * p.num_tokens * p.num_heads + out_row;
    const float inv_total = whole ? 1.f / total : 1.f;
    for (int d = threadIdx.x; d < kHeadDim; d += blockDim.x) {
      float o = 0.f;
#pragma unroll
      for (int w = 0; w < kAttentionWarps; ++w) o += warp_acc[w][h][d] * factors[w];
      if (whole) {
        static_cast<T*>(p.out)[out_row * kHeadDim + d] = from_float<T>(o * inv_total);
      } else {
        p.part_out[part * kHeadDim + d] = o;
      }
    }
    if (!whole && threadIdx.x == 0) {
      p.part_max[part] = block_max;
      p.part_sum[part] = total;
    }
  }
}

// One block per (query token, query head): the parts' outputs, each weighted by exp(its max - the
// largest max), summed and divided by the equally weighted sum of their sums.
template <typename T, int kHeadDim>
__global__ void reduce_splits_kernel(const AttentionParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * p.num_heads + blockIdx.y;
  const int64_t split_stride = static_cast<int64_t>(p.num_tokens) * p.num_heads;
  __shared__ float weight[kMaxAttentionSplits];
  __shared__ float inv_total;
  if (threadIdx.x == 0) {
    float top = -FLT_MAX;
    for (int s = 0; s < p.num_splits; ++s) top = fmaxf(top, p.part_max[s * split_stride + row]);
    float total = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      weight[s] = __expf(p.part_max[s * split_stride + row] - top);
      total += weight[s] * p.part_sum[s * split_stride + row];
    }
    inv_total = 1.f / total;   // the part holding the token's own key has sum > 0
  }
  __syncthreads();
  T* out_row = static_cast<T*>(p.out) + row * kHeadDim;
  for (int d = threadIdx.x; d < kHeadDim; d += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < p.num_splits; ++s) o += weight[s] * p.part_out[(s * split_stride + row) * kHeadDim + d];
    out_row[d] = from_float<T>(o * inv_total);
  }
}

// Query heads per block: the whole group of a key/value head, up to 4 (more take more blocks); 1
// without grouped-query attention, where a larger block would idle.
template <typename T, int kHeadDim, int kHeads>
void launch_heads(const AttentionParams& p, cudaStream_t stream) {
  const int group = p.num_heads / p.num_kv_heads;
  const dim3 grid(p.num_tokens, p.num_kv_heads * ((group + kHeads - 1) / kHeads), p.num_splits);
  attention_kernel<T, kHeadDim, kHeads><<<grid, kAttentionWarps * kWarpSize, 0, stream>>>(p);
}

template <typename T, int kHeadDim>
void launch(const AttentionParams& p, cudaStream_t stream) {
  if (p.num_heads == p.num_kv_heads) {
    launch_heads<T, kHeadDim, 1>(p, stream);
  } else {
    launch_heads<T, kHeadDim, 4>(p, stream);
  }
  if (p.num_splits > 1) {
    const dim3 rows(p.num_tokens, p.num_heads);
    reduce_splits_kernel<T, kHeadDim><<<rows, block_threads(kHeadDim, 128), 0, stream>>>(p);
  }
}

}  // namespace

// The caller (ops.cpp) has checked head_dim is one of kAttentionHeadSizes.
int launch_attention(const AttentionParams& p, DType dtype, void* stream) {
  if (p.num_tokens == 0 || p.num_seqs == 0) return cudaSuccess;
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    switch (p.head_dim) {
      case 64: launch<T, 64>(p, s); break;
      case 80: launch<T, 80>(p, s); break;
      case 96: launch<T, 96>(p, s); break;
      case 112: launch<T, 112>(p, s); break;
      case 128: launch<T, 128>(p, s); break;
      case 256: launch<T, 256>(p, s); break;
    }
  });
  return cudaGetLastError();
}

static_assert(sizeof(kAttentionHeadSizes) / sizeof(int) == 6,
              "launch_attention's switch must list every size in kAttentionHeadSizes");

}  // namespace fastgen_cuda
