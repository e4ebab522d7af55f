// Paged attention over a ragged batch: decodes and prompt chunks in one launch.
//
// One thread block per (query token, group of up to kHeads query heads that share one key/value
// head, split). The block reads each key and value row once for all its heads (grouped-query
// attention). A warp's lanes are cut into groups of kLanesPerKey lanes that each take one key at a
// time, a lane holding a 16-byte run of the row, so a score needs a reduction over the group's few
// lanes, not the warp's 32. The warps stride over the block's share of the keys the token may see
// (causal within its sequence, optionally a sliding window), each lane group kKeys keys a step,
// their K and V rows loaded together so that each warp has many bytes in flight; each lane group
// keeps an online softmax (running max, running sum, weighted value sum) per head, and the groups
// and then the warps merge theirs at the end. Every query token finds its sequence from
// query_start_loc, so decodes and chunks mix freely. Accumulation is fp32 whatever the cache dtype.
//
// Split-KV (flash-decoding): with num_splits > 1 the keys are cut into that many contiguous parts,
// so a step of few long decodes still fills the GPU; each block writes its part's unnormalised
// output, max and sum, and reduce_splits_kernel merges the parts of each (token, head).
//
// Prompt chunks, where tensor cores run them (see kernels.h), take prompt_attention_kernel instead:
// tiles of kPromptTileTokens new tokens of one sequence that read each key once for the whole tile,
// split as the per-token blocks are (a short chunk after a long context is few tiles). The
// per-token kernel then leaves their tokens alone.
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda_utils.cuh"
#include "sm80.cuh"

namespace fastgen_cuda {
namespace {

constexpr int kAttentionWarps = 4;
// Keys each lane group takes per step of its loop, their K and V rows loaded together: enough bytes
// in flight to cover memory latency with few blocks per SM (a long decode split over the GPU).
constexpr int kKeysPerStep = 4;
// prompt_attention_kernel: 16 query rows per warp (the mma's M), keys per step of its loop.
constexpr int kPromptWarps = kPromptTileTokens / 16;
constexpr int kTileKeys = 64;
constexpr float kLog2e = 1.4426950408889634f;

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

// The cache slot of a sequence's key, through the sequence's row of the block table. The block size
// is a runtime value, and a division by one takes about 20 instructions a key (sm_90 SASS: a
// reciprocal and its corrections); this divides by a multiply and a shift, with a multiplier
// worked out once per thread (the round-up method of Granlund and Montgomery): key / size is
// (key * multiplier) >> shift, with shift = 31 + ceil(log2(size)) and multiplier =
// ceil(2^shift / size), exact for every key in [0, 2^31) and every size from 1; the multiplier
// is below 2^32 (2^31 at most for a power of two, below 2^32 otherwise, as size > 2^(shift - 32)).
struct CacheBlocks {
  int size;
  int shift;
  uint32_t multiplier;

  __device__ explicit CacheBlocks(int block_size) : size(block_size), shift(31) {
    while ((1LL << (shift - 31)) < block_size) ++shift;
    multiplier = static_cast<uint32_t>(((1ULL << shift) + block_size - 1) / block_size);
  }

  __device__ __forceinline__ int block(int key) const {
    return static_cast<int>((static_cast<uint64_t>(key) * multiplier) >> shift);
  }

  __device__ __forceinline__ int64_t slot(const int* __restrict__ table, int key) const {
    const int b = block(key);
    return static_cast<int64_t>(table[b]) * size + (key - b * size);
  }
};

// A kernel's result for dimension d of output row out_row (token * num_heads + head): without a
// split, the output itself (o normalised); with one, this block's part (blockIdx.z) of it,
// unnormalised, and the part's softmax state (natural-log max, sum) for reduce_splits_kernel.
__device__ __forceinline__ int64_t part_row(const AttentionParams& p, int64_t out_row) {
  return static_cast<int64_t>(blockIdx.z) * p.num_tokens * p.num_heads + out_row;
}

template <typename T, int kHeadDim>
__device__ __forceinline__ void store_result(const AttentionParams& p, int64_t out_row, int d, float o) {
  if (p.num_splits == 1) {
    static_cast<T*>(p.out)[out_row * kHeadDim + d] = from_float<T>(o);
  } else {
    p.part_out[part_row(p, out_row) * kHeadDim + d] = o;
  }
}

__device__ __forceinline__ void store_part_state(const AttentionParams& p, int64_t out_row, float max,
                                                 float sum) {
  p.part_max[part_row(p, out_row)] = max;
  p.part_sum[part_row(p, out_row)] = sum;
}

// How a warp's lanes share a key's row: each lane a run of kPerLane consecutive dimensions, 16 bytes
// (more where 32 lanes would not cover the head), and kLanesPerKey lanes a key, a power of two so
// that a group's reduction stays within it. Lanes past the head's end (head size 80, 96 or 112)
// hold zeros.
template <typename T, int kHeadDim>
struct KeyLayout {
  static constexpr int kRun = 16 / static_cast<int>(sizeof(T));
  static constexpr int kPerLane = kHeadDim > kRun * kWarpSize ? kHeadDim / kWarpSize : kRun;
  static constexpr int kLanesUsed = (kHeadDim + kPerLane - 1) / kPerLane;
  static constexpr int kLanesPerKey = kLanesUsed <= 4 ? 4 : kLanesUsed <= 8 ? 8 : kLanesUsed <= 16 ? 16 : 32;
  static constexpr int kGroups = kWarpSize / kLanesPerKey;   // keys a warp takes at once
  static_assert(kLanesUsed <= kWarpSize && kHeadDim % kPerLane == 0, "a head must tile into lane runs");
};

// kCount consecutive elements from src, read as Words (src aligned to a Word), in fp32.
template <typename Word, typename T, int kCount>
__device__ __forceinline__ void load_as(const T* __restrict__ src, float (&dst)[kCount]) {
  constexpr int kWords = kCount * static_cast<int>(sizeof(T)) / static_cast<int>(sizeof(Word));
  Word words[kWords];
#pragma unroll
  for (int w = 0; w < kWords; ++w) words[w] = reinterpret_cast<const Word*>(src)[w];
  const T* elements = reinterpret_cast<const T*>(words);
#pragma unroll
  for (int i = 0; i < kCount; ++i) dst[i] = to_float(elements[i]);
}

// A lane's run of each of kKeys cache rows (16-byte loads), in fp32; zeros for a lane past the
// head's end.
template <typename T, int kPerLane, int kKeys>
__device__ __forceinline__ void load_runs(const T* __restrict__ cache, const int64_t (&row)[kKeys],
                                          int dim, bool in_head, float (&values)[kKeys][kPerLane]) {
  static_assert(kPerLane * sizeof(T) % 16 == 0, "runs are whole 16-byte loads");
#pragma unroll
  for (int j = 0; j < kKeys; ++j) {
    if (in_head) {
      load_as<uint4>(cache + row[j] + dim, values[j]);
    } else {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) values[j][i] = 0.f;
    }
  }
}

// Sum over the kLanes lanes of the lane's group (aligned groups of a power-of-two size).
template <int kLanes>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffff, x, offset);
  return x;
}

// kHeadDim and kHeads are template arguments so each lane's run of a row and of each head's state
// lives in registers; a block whose group has fewer than kHeads heads left idles the rest.
template <typename T, int kHeadDim, int kHeads>
__global__ void __launch_bounds__(kAttentionWarps * kWarpSize, 3) attention_kernel(const AttentionParams p) {
  using Layout = KeyLayout<T, kHeadDim>;
  constexpr int kPerLane = Layout::kPerLane;
  constexpr int kLanesPerKey = Layout::kLanesPerKey;
  constexpr int kKeys = kKeysPerStep;
  constexpr int kWarpKeys = Layout::kGroups * kKeys;   // keys a warp takes per step
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
  const int key_group = lane / kLanesPerKey;              // which of the warp's keys
  const int dim = (lane % kLanesPerKey) * kPerLane;       // the first dimension of the lane's run
  const bool in_head = dim < kHeadDim;

  const int seq = find_sequence(p.query_start_loc, p.num_seqs, token);
  const int q_start = p.query_start_loc[seq];
  const int q_len = p.query_start_loc[seq + 1] - q_start;
  // A prompt chunk's tokens (more than one new token) are prompt_attention_kernel's, if it runs.
  if (p.num_prompt_tiles > 0 && q_len > 1) return;
  const int position = p.seq_lens[seq] - q_len + (token - q_start);   // keys 0..position are visible
  const int first_key = p.sliding_window > 0 ? max(0, position - p.sliding_window + 1) : 0;
  // This block's part of [first_key, position]; a part past the end is empty.
  const int per_split = (position - first_key + p.num_splits) / p.num_splits;
  const int begin = first_key + static_cast<int>(blockIdx.z) * per_split;
  const int end = min(begin + per_split, position + 1);
  const int* table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks;
  const CacheBlocks blocks(p.block_size);

  float q_reg[kHeads][kPerLane];
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    const T* q_row = static_cast<const T*>(p.q) + token * p.q_token_stride + (first_head + h) * p.q_head_stride;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      q_reg[h][i] = h < num_heads_here && in_head ? to_float(q_row[dim + i]) * p.scale : 0.f;
    }
  }

  // Each lane group's softmax state over its keys (the same in every lane of the group).
  float running_max[kHeads], running_sum[kHeads], acc[kHeads][kPerLane];
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    running_max[h] = -FLT_MAX;
    running_sum[h] = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[h][i] = 0.f;
  }
  const int64_t kv_row = static_cast<int64_t>(p.num_kv_heads) * kHeadDim;
  // The rows of the group's kKeys keys from `first`; a key past the end reads a row the sequence
  // has (the part's first, or its last visible key's when the part is empty: the lookup before the
  // loop runs even then) and weighs nothing.
  const int stand_in = min(begin, end - 1);
  auto rows_from = [&](int first, int64_t (&row)[kKeys]) {
#pragma unroll
    for (int j = 0; j < kKeys; ++j) {
      const int key = first + j < end ? first + j : stand_in;
      row[j] = blocks.slot(table, key) * kv_row + kv_head * kHeadDim;
    }
  };
  constexpr int kStride = kAttentionWarps * kWarpKeys;
  int64_t row[kKeys];
  rows_from(begin + warp * kWarpKeys + key_group * kKeys, row);
  // The bound is the warp's, not the group's: every lane of the warp takes part in the shuffles.
  for (int warp_first = begin + warp * kWarpKeys; warp_first < end; warp_first += kStride) {
    const int first = warp_first + key_group * kKeys;
    float k_val[kKeys][kPerLane], v_val[kKeys][kPerLane];
    load_runs<T, kPerLane>(k_cache, row, dim, in_head, k_val);
    load_runs<T, kPerLane>(v_cache, row, dim, in_head, v_val);
    // The next step's rows now, from the block table, so that their lookups are not waited for
    // after this step's work: the next step's loads can then leave at once.
    rows_from(first + kStride, row);
    float score[kKeys][kHeads];
#pragma unroll
    for (int j = 0; j < kKeys; ++j)
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        float partial = 0.f;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) partial += q_reg[h][i] * k_val[j][i];
        partial = group_sum<kLanesPerKey>(partial);
        score[j][h] = first + j < end ? partial : -INFINITY;
      }
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      float new_max = running_max[h];
#pragma unroll
      for (int j = 0; j < kKeys; ++j) new_max = fmaxf(new_max, score[j][h]);
      const float correction = __expf(running_max[h] - new_max);
      float weight[kKeys];
      running_sum[h] *= correction;
#pragma unroll
      for (int j = 0; j < kKeys; ++j) {
        weight[j] = __expf(score[j][h] - new_max);   // 0 for a key past the end
        running_sum[h] += weight[j];
      }
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        float sum = acc[h][i] * correction;
#pragma unroll
        for (int j = 0; j < kKeys; ++j) sum += weight[j] * v_val[j][i];
        acc[h][i] = sum;
      }
      running_max[h] = new_max;
    }
  }

  // Merge the warp's lane groups, per head: the lanes of one run position across the groups hold
  // the same dimensions, kLanesPerKey lanes apart.
#pragma unroll
  for (int offset = kLanesPerKey; offset < kWarpSize; offset *= 2) {
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      const float other_max = __shfl_xor_sync(0xffffffff, running_max[h], offset);
      const float other_sum = __shfl_xor_sync(0xffffffff, running_sum[h], offset);
      const float new_max = fmaxf(running_max[h], other_max);
      // A group that saw no key holds sum 0, so its factor does not matter.
      const float mine = __expf(running_max[h] - new_max), theirs = __expf(other_max - new_max);
      running_sum[h] = running_sum[h] * mine + other_sum * theirs;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        acc[h][i] = acc[h][i] * mine + __shfl_xor_sync(0xffffffff, acc[h][i], offset) * theirs;
      }
      running_max[h] = new_max;
    }
  }

  // Merge the warps, per head: rescale each to the block-wide max, then sum.
  __shared__ float warp_max[kAttentionWarps][kHeads];
  __shared__ float warp_sum_exp[kAttentionWarps][kHeads];
  __shared__ float warp_acc[kAttentionWarps][kHeads][kHeadDim];
  if (key_group == 0) {
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      if (lane == 0) {
        warp_max[warp][h] = running_max[h];
        warp_sum_exp[warp][h] = running_sum[h];
      }
      if (in_head) {
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) warp_acc[warp][h][dim + i] = acc[h][i];
      }
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
    const int64_t out_row = static_cast<int64_t>(token) * p.num_heads + first_head + h;
    const float inv_total = p.num_splits == 1 ? 1.f / total : 1.f;
    for (int d = threadIdx.x; d < kHeadDim; d += blockDim.x) {
      float o = 0.f;
#pragma unroll
      for (int w = 0; w < kAttentionWarps; ++w) o += warp_acc[w][h][d] * factors[w];
      store_result<T, kHeadDim>(p, out_row, d, o * inv_total);
    }
    if (p.num_splits > 1 && threadIdx.x == 0) store_part_state(p, out_row, block_max, total);
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

// Prompt chunks on tensor cores: one block per (prompt tile, query head). Each of its warps holds 16
// of the tile's queries as mma operands (sm80.cuh's layouts: a thread has rows g and g + 8, columns
// c and c + 1 of each 8) and keeps their online softmax in registers. The block walks the keys the
// tile may see, kTileKeys at a time: the keys' K and V rows are copied from the blocked cache into
// shared memory once for all warps; each warp computes its scores (Q K^T), masks them (causal, the
// window), rescales its running state and adds P V, P rounded to T as the product's operand.
// Accumulation is fp32. T is __half or __nv_bfloat16; kHeadDim a multiple of 16.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kPromptWarps * kWarpSize) prompt_attention_kernel(const AttentionParams p) {
  constexpr int kDimSteps = kHeadDim / 16;   // k steps of Q K^T
  constexpr int kOutTiles = kHeadDim / 8;    // n tiles of the output
  constexpr int kKeyTiles = kTileKeys / 8;   // n tiles of the scores
  constexpr int kChunks = kHeadDim / 8;      // 16-byte pieces of a row
  // Rows padded by 16 bytes, so the fragment loads of a warp fall in distinct banks.
  constexpr int kRow = kHeadDim + 8;
  alignas(16) __shared__ uint16_t k_tile[kTileKeys * kRow];
  alignas(16) __shared__ uint16_t v_tile[kTileKeys * kRow];

  // Heads vary fastest in launch order: a tile's heads start together, in the tiles' given order.
  const int seq = p.prompt_tiles[2 * blockIdx.y];
  const int tile_start = p.prompt_tiles[2 * blockIdx.y + 1];
  const int head = blockIdx.x;
  const int kv_head = head / (p.num_heads / p.num_kv_heads);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, c = 2 * (lane % 4);

  const int q_start = p.query_start_loc[seq];
  const int q_len = p.query_start_loc[seq + 1] - q_start;
  const int cached = p.seq_lens[seq] - q_len;              // keys before the new tokens
  const int tile_end = min(tile_start + kPromptTileTokens, q_len);
  const bool warp_has_rows = tile_start + warp * 16 < tile_end;
  // This thread's two rows (new-token offsets; a row past the tile's end computes the last's, and
  // is not written) and the positions of their queries, which see keys up to their own.
  int row[2], position[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row[r] = tile_start + warp * 16 + g + 8 * r;
    position[r] = cached + min(row[r], tile_end - 1);
  }
  // The keys the tile sees, [first_key, last_key]; with split-KV this block takes its part of them,
  // [key_begin, key_end), in whole steps of kTileKeys, so no step reaches into the next part (a
  // part past the end is empty).
  const int last_key = cached + tile_end - 1;   // the tile's last query's position
  const int first_key = p.sliding_window > 0 ? max(0, cached + tile_start - p.sliding_window + 1) : 0;
  const int steps = (last_key - first_key + kTileKeys) / kTileKeys;
  const int per_split = (steps + p.num_splits - 1) / p.num_splits * kTileKeys;
  const int key_begin = first_key + static_cast<int>(blockIdx.z) * per_split;
  const int key_end = min(key_begin + per_split, last_key + 1);

  uint32_t q_frag[kDimSteps][4];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const uint16_t* q_row = static_cast<const uint16_t*>(p.q) +
                            (q_start + position[r] - cached) * p.q_token_stride + head * p.q_head_stride;
#pragma unroll
    for (int s = 0; s < kDimSteps; ++s)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int d = s * 16 + half * 8 + c;
        q_frag[s][r + 2 * half] = pack_bits(q_row[d], q_row[d + 1]);
      }
  }

  float out[kOutTiles][4];
#pragma unroll
  for (int t = 0; t < kOutTiles; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) out[t][e] = 0.f;
  float running_max[2] = {-INFINITY, -INFINITY}, running_sum[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * kLog2e;   // softmax in base 2: exp2f
  const int64_t kv_row = static_cast<int64_t>(p.num_kv_heads) * kHeadDim;
  const int* table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks;
  const CacheBlocks blocks(p.block_size);
  const uint16_t* k_cache = static_cast<const uint16_t*>(p.k_cache);
  const uint16_t* v_cache = static_cast<const uint16_t*>(p.v_cache);

  // Keys [first, first + kTileKeys) of a cache into a tile, as one group of asynchronous copies
  // of 16 bytes, kCopies a thread (a fixed count, so a copy's row and dimension within the tile
  // are divisions by constants; kept a loop: unrolled, the copies' addresses took the kernel to
  // 255 registers, one block an SM); keys past the end are zeros, weighed 0.
  constexpr int kThreads = kPromptWarps * kWarpSize;
  static_assert(kTileKeys * kChunks % kThreads == 0, "a tile's copies must share out evenly");
  constexpr int kCopies = kTileKeys * kChunks / kThreads;
  auto copy_keys = [&](uint16_t* tile, const uint16_t* cache, int first) {
#pragma unroll 1
    for (int n = 0; n < kCopies; ++n) {
      const int i = threadIdx.x + n * kThreads;
      const int j = i / kChunks, d = (i % kChunks) * 8, key = first + j;
      int64_t at = 0;
      if (key < key_end) at = blocks.slot(table, key) * kv_row + kv_head * kHeadDim + d;
      copy_async_16(&tile[j * kRow + d], cache + at, key < key_end);
    }
    commit_async();
  };

  // Each step's V lands while its Q K^T runs, and the next step's K while its P V runs.
  if (key_begin < key_end) copy_keys(k_tile, k_cache, key_begin);
  for (int first = key_begin; first < key_end; first += kTileKeys) {
    __syncthreads();   // every warp is done with the previous step's V
    copy_keys(v_tile, v_cache, first);
    wait_async<1>();   // this thread's copies of K are in (V's may not be)
    __syncthreads();   // and every thread's

    // Q K^T: K's rows are B's columns, so the untransposed matrices of 8 keys by 8 dims are B's
    // registers; one load takes 4 of them, two dim steps' worth (an odd last step, 2).
    float score[kKeyTiles][4];
    if (warp_has_rows) {
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) score[n][e] = 0.f;
        const uint16_t* k_rows = &k_tile[(n * 8 + lane % 8) * kRow + (lane / 8) * 8];
#pragma unroll
        for (int s = 0; s + 1 < kDimSteps; s += 2) {
          uint32_t b[4];
          ldmatrix<4, false>(b, k_rows + s * 16);
          mma_16816<T>(score[n], q_frag[s], {b[0], b[1]});
          mma_16816<T>(score[n], q_frag[s + 1], {b[2], b[3]});
        }
        if constexpr (kDimSteps % 2 == 1) {
          uint32_t b[2];
          ldmatrix<2, false>(b, k_rows - (lane / 16) * 16 + (kDimSteps - 1) * 16);
          mma_16816<T>(score[n], q_frag[kDimSteps - 1], b);
        }
      }
    }
    wait_async<0>();   // V is in
    __syncthreads();   // everyone's, and every warp is done with K
    if (first + kTileKeys < key_end) copy_keys(k_tile, k_cache, first + kTileKeys);
    if (!warp_has_rows) continue;

    // Mask; each row's max over this step's keys, across the 4 threads that share it. A step
    // every row of the tile sees whole (up to the tile's first query, past its last query's
    // window start) needs no mask: most steps of a long prompt. Scores stay unscaled here: the
    // scale is positive, so the scaled max is the max scaled, and each score's scale and shift
    // below is one fma.
    const bool whole = first + kTileKeys - 1 <= cached + tile_start &&
                       (p.sliding_window <= 0 || first > last_key - p.sliding_window);
    if (!whole) {   // a branch, not predicates: a whole step issues none of the mask's work
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e / 2, key = first + n * 8 + c + e % 2;
          const bool visible = key <= position[r] &&
                               (p.sliding_window <= 0 || key > position[r] - p.sliding_window);
          if (!visible) score[n][e] = -INFINITY;
        }
    }
    float step_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) step_max[e / 2] = fmaxf(step_max[e / 2], score[n][e]);
    float correction[2], base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      step_max[r] = fmaxf(step_max[r], __shfl_xor_sync(0xffffffff, step_max[r], 1));
      step_max[r] = fmaxf(step_max[r], __shfl_xor_sync(0xffffffff, step_max[r], 2));
      const float new_max = fmaxf(running_max[r], step_max[r] * scale_log2);
      // A row that has seen no visible key yet keeps max -inf; 0 stands in, so exp2f gives 0s.
      base[r] = new_max == -INFINITY ? 0.f : new_max;
      correction[r] = exp2f(running_max[r] - base[r]);
      running_max[r] = new_max;
      running_sum[r] *= correction[r];
    }
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        score[n][e] = exp2f(fmaf(score[n][e], scale_log2, -base[e / 2]));
        running_sum[e / 2] += score[n][e];   // this thread's columns; summed across the 4 at the end
      }
#pragma unroll
    for (int t = 0; t < kOutTiles; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) out[t][e] *= correction[e / 2];

#pragma unroll
    for (int k = 0; k < kTileKeys / 16; ++k) {
      const float* lo = score[2 * k];
      const float* hi = score[2 * k + 1];
      const uint32_t a[4] = {pack_bits(bits_of(from_float<T>(lo[0])), bits_of(from_float<T>(lo[1]))),
                             pack_bits(bits_of(from_float<T>(lo[2])), bits_of(from_float<T>(lo[3]))),
                             pack_bits(bits_of(from_float<T>(hi[0])), bits_of(from_float<T>(hi[1]))),
                             pack_bits(bits_of(from_float<T>(hi[2])), bits_of(from_float<T>(hi[3])))};
      // P V: V's rows are B's rows, so the transposed matrices of 8 keys by 8 dims are B's
      // registers; one load takes 4, two output tiles' worth.
      const uint16_t* v_rows = &v_tile[(k * 16 + (lane / 8) % 2 * 8 + lane % 8) * kRow + (lane / 16) * 8];
#pragma unroll
      for (int t = 0; t < kOutTiles; t += 2) {
        uint32_t b[4];
        ldmatrix<4, true>(b, v_rows + t * 8);
        mma_16816<T>(out[t], a, {b[0], b[1]});
        mma_16816<T>(out[t + 1], a, {b[2], b[3]});
      }
    }
  }
  if (!warp_has_rows) return;

  // Without a split the output is normalised (the query's own key is visible: total >= 1). A
  // part's max goes in natural units, as the per-token kernel's; an empty part leaves sum 0 and
  // max -FLT_MAX, no weight in the merge.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float total = running_sum[r];
    total += __shfl_xor_sync(0xffffffff, total, 1);
    total += __shfl_xor_sync(0xffffffff, total, 2);
    if (row[r] >= tile_end) continue;
    const int64_t out_row = static_cast<int64_t>(q_start + row[r]) * p.num_heads + head;
    const float inv_total = p.num_splits == 1 ? 1.f / total : 1.f;
#pragma unroll
    for (int t = 0; t < kOutTiles; ++t)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        store_result<T, kHeadDim>(p, out_row, t * 8 + c + e, out[t][2 * r + e] * inv_total);
      }
    if (p.num_splits > 1 && c == 0) {
      store_part_state(p, out_row, running_max[r] == -INFINITY ? -FLT_MAX : running_max[r] / kLog2e, total);
    }
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
void launch(const AttentionParams& params, cudaStream_t stream) {
  AttentionParams p = params;
  if constexpr (!std::is_same_v<T, float> && kHeadDim <= kMaxTiledHeadSize) {
    if (p.num_prompt_tiles > 0) {
      const dim3 grid(p.num_heads, p.num_prompt_tiles, p.num_splits);
      prompt_attention_kernel<T, kHeadDim><<<grid, kPromptWarps * kWarpSize, 0, stream>>>(p);
    }
  } else {
    p.num_prompt_tiles = 0;   // no tensor-core kernel for these: every token takes the per-token one
  }
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
