// Paged attention over a ragged batch: decodes and prompt chunks in one launch.
//
// One thread block per (query token, query head). Its warps stride over the keys the token may see
// (causal within its sequence, optionally a sliding window), each warp keeping an online softmax
// (running max, running sum, weighted value sum) for its share; the block merges the warps' states
// at the end. Every query token finds its sequence from query_start_loc, so no per-step plan is
// needed and decodes and chunks mix freely. Accumulation is fp32 whatever the cache dtype.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cfloat>
#include <iterator>
#include <vector>

#include "common.h"

namespace fastgen_cuda {
namespace {

constexpr int kAttentionWarps = 4;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffff, x, offset);
  return x;
}

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

// kHeadDim is a template argument so each lane's share of a head (kPerLane values) lives in
// registers; lanes past the head size (80, 96) sit idle for the last element.
template <typename scalar_t>
struct AttentionArgs {
  scalar_t* out;                 // [T, H, D], contiguous
  const scalar_t* q;             // [T, H, D], rows strided
  const scalar_t* k_cache;       // [num_blocks, block_size, Hkv, D]
  const scalar_t* v_cache;
  const int* query_start_loc;    // [B+1]
  const int* seq_lens;           // [B]
  const int* block_tables;       // [B, max_blocks]
  int num_seqs, max_blocks, block_size, num_heads, num_kv_heads;
  int64_t q_token_stride, q_head_stride;
  float scale;
  int sliding_window;            // 0: none
};

template <typename scalar_t, int kHeadDim>
__global__ void attention_kernel(const AttentionArgs<scalar_t> a) {
  const scalar_t* __restrict__ k_cache = a.k_cache;
  const scalar_t* __restrict__ v_cache = a.v_cache;
  const int num_heads = a.num_heads, block_size = a.block_size;
  constexpr int kPerLane = (kHeadDim + kWarpSize - 1) / kWarpSize;
  const int token = blockIdx.x;
  const int head = blockIdx.y;
  const int kv_head = head / (num_heads / a.num_kv_heads);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;

  const int seq = find_sequence(a.query_start_loc, a.num_seqs, token);
  const int q_start = a.query_start_loc[seq];
  const int q_len = a.query_start_loc[seq + 1] - q_start;
  const int seq_len = a.seq_lens[seq];
  const int position = seq_len - q_len + (token - q_start);   // keys 0..position are visible
  const int first_key = a.sliding_window > 0 ? max(0, position - a.sliding_window + 1) : 0;
  const int* table = a.block_tables + static_cast<int64_t>(seq) * a.max_blocks;

  float q_reg[kPerLane];
  const scalar_t* q_row = a.q + token * a.q_token_stride + head * a.q_head_stride;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + i * kWarpSize;
    q_reg[i] = d < kHeadDim ? static_cast<float>(q_row[d]) * a.scale : 0.f;
  }

  float running_max = -FLT_MAX;
  float running_sum = 0.f;
  float acc[kPerLane] = {};
  const int64_t kv_row = static_cast<int64_t>(a.num_kv_heads) * kHeadDim;
  for (int key = first_key + warp; key <= position; key += kAttentionWarps) {
    const int64_t slot = static_cast<int64_t>(table[key / block_size]) * block_size + key % block_size;
    const scalar_t* k_row = k_cache + slot * kv_row + kv_head * kHeadDim;
    const scalar_t* v_row = v_cache + slot * kv_row + kv_head * kHeadDim;
    float partial = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + i * kWarpSize;
      if (d < kHeadDim) partial += q_reg[i] * static_cast<float>(k_row[d]);
    }
    const float score = warp_sum(partial);
    const float new_max = fmaxf(running_max, score);
    const float correction = __expf(running_max - new_max);
    const float weight = __expf(score - new_max);
    running_sum = running_sum * correction + weight;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + i * kWarpSize;
      const float v = d < kHeadDim ? static_cast<float>(v_row[d]) : 0.f;
      acc[i] = acc[i] * correction + weight * v;
    }
    running_max = new_max;
  }

  // Merge the warps: rescale each to the block-wide max, then sum.
  __shared__ float warp_max[kAttentionWarps];
  __shared__ float warp_sum_exp[kAttentionWarps];
  __shared__ float warp_acc[kAttentionWarps][kHeadDim];
  if (lane == 0) {
    warp_max[warp] = running_max;
    warp_sum_exp[warp] = running_sum;
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + i * kWarpSize;
    if (d < kHeadDim) warp_acc[warp][d] = acc[i];
  }
  __syncthreads();
  float block_max = -FLT_MAX;
#pragma unroll
  for (int w = 0; w < kAttentionWarps; ++w) block_max = fmaxf(block_max, warp_max[w]);
  float total = 0.f;
  float factors[kAttentionWarps];
#pragma unroll
  for (int w = 0; w < kAttentionWarps; ++w) {
    // A warp that saw no key holds sum 0, so its factor does not matter.
    factors[w] = __expf(warp_max[w] - block_max);
    total += warp_sum_exp[w] * factors[w];
  }
  const float inv_total = 1.f / total;   // the token's own key is always visible: total > 0
  scalar_t* out_row = a.out + (static_cast<int64_t>(token) * num_heads + head) * kHeadDim;
  for (int d = threadIdx.x; d < kHeadDim; d += blockDim.x) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kAttentionWarps; ++w) o += warp_acc[w][d] * factors[w];
    out_row[d] = static_cast<scalar_t>(o * inv_total);
  }
}

#define FASTGEN_HEAD_SIZES(X) X(64) X(80) X(96) X(112) X(128) X(256)

// The caller has checked head_dim is one of FASTGEN_HEAD_SIZES.
template <typename scalar_t>
void launch_attention(const AttentionArgs<scalar_t>& args, int head_dim, dim3 grid, cudaStream_t stream) {
  switch (head_dim) {
#define FASTGEN_LAUNCH(D)                                                                  \
  case D:                                                                                  \
    attention_kernel<scalar_t, D><<<grid, kAttentionWarps * kWarpSize, 0, stream>>>(args); \
    break;
    FASTGEN_HEAD_SIZES(FASTGEN_LAUNCH)
#undef FASTGEN_LAUNCH
  }
}
#define FASTGEN_LIST_ITEM(D) D,
constexpr int64_t kHeadSizes[] = {FASTGEN_HEAD_SIZES(FASTGEN_LIST_ITEM)};
#undef FASTGEN_LIST_ITEM

// The backend asks this before calling attention, to send other head sizes to the reference.
std::vector<int64_t> attention_head_sizes() { return {std::begin(kHeadSizes), std::end(kHeadSizes)}; }

at::Tensor attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                     const at::Tensor& block_tables, double scale, int64_t sliding_window) {
  constexpr const char* op = "fastgen_cuda::attention";
  for (const auto* t : {&q, &k_cache, &v_cache, &query_start_loc, &seq_lens, &block_tables}) {
    TORCH_CHECK(t->is_cuda(), op, ": every argument must be on a CUDA device, got ", t->device());
    TORCH_CHECK(t->device() == q.device(), op, ": every argument must be on one device, got ",
                t->device(), " and ", q.device());
  }
  FASTGEN_CHECK_DIM(op, q, 3);
  FASTGEN_CHECK_DIM(op, k_cache, 4);
  FASTGEN_CHECK_DIM(op, query_start_loc, 1);
  FASTGEN_CHECK_DIM(op, seq_lens, 1);
  FASTGEN_CHECK_DIM(op, block_tables, 2);
  FASTGEN_CHECK_DTYPE(op, query_start_loc, at::kInt);
  FASTGEN_CHECK_DTYPE(op, seq_lens, at::kInt);
  FASTGEN_CHECK_DTYPE(op, block_tables, at::kInt);
  FASTGEN_CHECK_LAST_DIM_CONTIGUOUS(op, q);
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              op, ": q and the caches must share one dtype, got ", q.scalar_type(), ", ",
              k_cache.scalar_type(), " and ", v_cache.scalar_type());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have k_cache's shape ",
              k_cache.sizes(), ", got ", v_cache.sizes());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op, ": the caches must be contiguous");
  const int num_seqs = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) == num_seqs + 1, op, ": query_start_loc must hold B+1 = ",
              num_seqs + 1, " offsets, got ", query_start_loc.size(0));
  TORCH_CHECK(block_tables.size(0) == num_seqs, op, ": block_tables must hold one row per sequence (",
              num_seqs, "), got ", block_tables.size(0));
  const int num_heads = q.size(1);
  const int head_dim = q.size(2);
  const int num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim, op, ": the caches' head size ", k_cache.size(3),
              " must match q's ", head_dim);
  TORCH_CHECK(num_heads % num_kv_heads == 0, op, ": query heads (", num_heads,
              ") must be a multiple of key/value heads (", num_kv_heads, ")");
  TORCH_CHECK(std::find(std::begin(kHeadSizes), std::end(kHeadSizes), head_dim) != std::end(kHeadSizes),
              op, ": head size ", head_dim, " has no kernel; supported: ", c10::IntArrayRef(kHeadSizes));

  auto out = at::empty({q.size(0), num_heads, head_dim}, q.options());
  if (q.size(0) == 0 || num_seqs == 0) return out;
  const auto qsl = query_start_loc.contiguous();
  const auto lens = seq_lens.contiguous();
  const auto tables = block_tables.contiguous();
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(q.size(0), num_heads);
  const int window = sliding_window > 0 ? static_cast<int>(sliding_window) : 0;
  FASTGEN_DISPATCH_FLOATING(q.scalar_type(), "fastgen_cuda::attention", [&] {
    const AttentionArgs<scalar_t> args{
        out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
        v_cache.data_ptr<scalar_t>(), qsl.data_ptr<int>(), lens.data_ptr<int>(),
        tables.data_ptr<int>(), num_seqs, static_cast<int>(tables.size(1)),
        static_cast<int>(k_cache.size(1)), num_heads, num_kv_heads, q.stride(0), q.stride(1),
        static_cast<float>(scale), window};
    launch_attention(args, head_dim, grid, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen_cuda, CUDA, m) { m.impl("attention", &attention); }

// No tensor arguments, so no dispatch key: a catch-all kernel, defined here next to the list.
TORCH_LIBRARY_FRAGMENT(fastgen_cuda, m) { m.def("attention_head_sizes() -> int[]", &attention_head_sizes); }

}  // namespace fastgen_cuda
