// Paged attention over a ragged batch, reading keys and values straight from the blocked KV cache
// through each sequence's block table (no gather copy), and the KV cache write.
//
// One work item is (sequence, KV head, tile of up to kQueryTile new tokens): the item's query
// rows are its tokens times the KV head's query group, so each key and value row is read once
// per group and tile. Keys are visited a cache block at a time with an online softmax in fp32.
// When a step has too few items to keep every thread busy to its end (one long decode on many
// threads: a model with 3 KV heads has 3 items), long decodes are split along their keys, flash-
// decoding style: each part leaves an unnormalised result and its softmax max and sum, and the
// parts are combined once all have run.
// Rows are read from the cache in place, bf16 and fp16 widened to fp32 in registers: widening a
// block into a buffer first, which the query rows then share, measured 1.7x slower (bf16, 16
// decodes of 1024 keys, SmolLM2's heads).
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "dot_tiles.h"

namespace fastgen_cpu {
namespace {

constexpr int64_t kQueryTile = 16;
// A step is split so that it has about this many items per thread (dynamic scheduling evens out
// the rest), and no split part has fewer keys than kSplitMinKeys: shorter parts cost more in
// setup and combining than their thread saves.
constexpr int64_t kItemsPerThread = 4;
constexpr int64_t kSplitMinKeys = 256;

struct WorkItem {
  int32_t seq;
  int32_t kv_head;
  int32_t token_begin;   // flat token indices [token_begin, token_end) of this tile
  int32_t token_end;
  int64_t cost;
  int64_t key_begin = 0;   // a split decode's part: its keys [key_begin, key_end) and its slot
  int64_t key_end = 0;     // among the partial results; part -1: not split
  int64_t part = -1;
};

// A decode split into `parts` work items, whose partial results are slots [first_part,
// first_part + parts).
struct SplitDecode {
  int32_t token;
  int32_t kv_head;
  int64_t first_part;
  int64_t parts;
};

struct Plan {
  std::vector<WorkItem> items;
  std::vector<SplitDecode> splits;
  int64_t parts = 0;
};

// The keys [begin, end) that query positions [first_pos, last_pos] attend to, causally and within
// a sliding window of `window` keys (0: none).
inline std::pair<int64_t, int64_t> key_range(int64_t first_pos, int64_t last_pos, int64_t window) {
  return {window > 0 ? std::max<int64_t>(0, first_pos - window + 1) : 0, last_pos + 1};
}

// Split decodes' unnormalised results: per part and query row of the KV head's group, the
// softmax-weighted value sum [D], the scores' max and the sum of their exponentials.
struct Partials {
  std::vector<float> acc, max, sum;
};

// out[j] = q . k_j for `count` key rows k_j = k + j * stride of n dims, read (and widened) in
// place, eight keys at a time with one accumulator each (dot_tiles.h).
template <typename scalar_t>
inline void score_keys(const float* q, const scalar_t* k, int64_t stride, int64_t count, int64_t n, float* out) {
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) dot_tile<1, 8>(q, n, k + j * stride, stride, n, out + j, 1);
  for (; j + 4 <= count; j += 4) dot_tile<1, 4>(q, n, k + j * stride, stride, n, out + j, 1);
  for (; j < count; ++j) dot_tile<1, 1>(q, n, k + j * stride, stride, n, out + j, 1);
}

// acc[0, kVecs * lanes) += sum_j p[j] * v_j over `count` rows v_j = v + j * stride, the
// accumulators held in registers across all the rows.
template <int kVecs, typename scalar_t>
inline void accumulate_span(float* acc, const float* p, const scalar_t* v, int64_t stride, int64_t count) {
  constexpr int64_t kLanes = Vec::size();
  Vec a[kVecs];
  for (int i = 0; i < kVecs; ++i) a[i] = Vec::loadu(acc + i * kLanes);
  for (int64_t j = 0; j < count; ++j) {
    const Vec pj(p[j]);
    const scalar_t* row = v + j * stride;
    for (int i = 0; i < kVecs; ++i) a[i] = at::vec::fmadd(pj, load_vec(row + i * kLanes), a[i]);
  }
  for (int i = 0; i < kVecs; ++i) a[i].store(acc + i * kLanes);
}

// acc[0, n) += sum_j p[j] * v_j over `count` value rows v_j = v + j * stride of n dims, in spans
// of the head wide enough to keep the registers busy and few enough to fit them.
template <typename scalar_t>
inline void accumulate(float* acc, const float* p, const scalar_t* v, int64_t stride, int64_t count, int64_t n) {
  constexpr int64_t kLanes = Vec::size();
  int64_t d = 0;
  for (; d + 8 * kLanes <= n; d += 8 * kLanes) accumulate_span<8>(acc + d, p, v + d, stride, count);
  for (; d + 4 * kLanes <= n; d += 4 * kLanes) accumulate_span<4>(acc + d, p, v + d, stride, count);
  for (; d + kLanes <= n; d += kLanes) accumulate_span<1>(acc + d, p, v + d, stride, count);
  for (; d < n; ++d) {
    float sum = acc[d];
    for (int64_t j = 0; j < count; ++j) sum += p[j] * static_cast<float>(v[j * stride + d]);
    acc[d] = sum;
  }
}

// exp(x) in place over n floats (n a multiple of Vec::size()); 1-ulp Sleef exp, exp(-inf) = 0.
inline void exp_inplace(float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += Vec::size()) Vec::loadu(x + i).exp().store(x + i);
}

struct Geometry {
  int64_t heads, kv_heads, group, dim, block_size;
  int64_t q_token_stride, q_head_stride;
  int64_t cache_block_stride, cache_slot_stride;
  int64_t table_stride;
};

template <typename scalar_t>
class AttentionItem {
 public:
  AttentionItem(const Geometry& g, int64_t max_rows)
      : g_(g),
        padded_block_((g.block_size + Vec::size() - 1) / Vec::size() * Vec::size()),
        q_(max_rows * g.dim),
        acc_(max_rows * g.dim),
        max_(max_rows),
        sum_(max_rows),
        scores_(padded_block_) {}

  void run(const WorkItem& item, const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache,
           const int32_t* query_start_loc, const int32_t* seq_lens, const int32_t* block_tables,
           float scale, int64_t window, scalar_t* out, Partials& partials) {
    const int64_t D = g_.dim, G = g_.group, bs = g_.block_size;
    const int64_t seq = item.seq, h = item.kv_head;
    const int64_t q_len = query_start_loc[seq + 1] - query_start_loc[seq];
    const int64_t context = seq_lens[seq] - q_len;
    const int64_t first_pos = context + (item.token_begin - query_start_loc[seq]);
    const int64_t tokens = item.token_end - item.token_begin;
    const int64_t rows = tokens * G;   // row r: token r / G, query head h * G + r % G

    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* src = q + (item.token_begin + r / G) * g_.q_token_stride + (h * G + r % G) * g_.q_head_stride;
      float* dst = q_.data() + r * D;
      load_floats(src, dst, D);
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) dst[i] *= scale;
    }
    std::fill(acc_.begin(), acc_.begin() + rows * D, 0.f);
    std::fill(max_.begin(), max_.begin() + rows, -std::numeric_limits<float>::infinity());
    std::fill(sum_.begin(), sum_.begin() + rows, 0.f);

    const int64_t last_pos = first_pos + tokens - 1;
    const auto [key_begin, key_end] = key_range(first_pos, last_pos, window);
    const int32_t* table = block_tables + seq * g_.table_stride;
    if (item.part >= 0) {
      run_decode(item, k_cache, v_cache, table, item.key_begin, item.key_end, out, &partials);
      return;
    }
    if (tokens == 1) {
      run_decode(item, k_cache, v_cache, table, key_begin, key_end, out, nullptr);
      return;
    }

    for (int64_t blk = key_begin / bs; blk * bs < key_end; ++blk) {
      const int64_t j0 = std::max(key_begin, blk * bs), j1 = std::min(key_end, (blk + 1) * bs);
      const int64_t base = row_offset(table, blk, j0, h), row_stride = g_.cache_slot_stride;
      const scalar_t* keys = k_cache + base;
      const scalar_t* values = v_cache + base;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t pos = first_pos + r / G;
        const int64_t lo = window > 0 ? std::max(j0, pos - window + 1) : j0;
        const int64_t hi = std::min(j1, pos + 1);
        if (hi <= lo) continue;
        const float* qr = q_.data() + r * D;
        float block_max = -std::numeric_limits<float>::infinity();
        std::fill(scores_.begin(), scores_.end(), -std::numeric_limits<float>::infinity());
        score_keys(qr, keys + (lo - j0) * row_stride, row_stride, hi - lo, D, scores_.data() + (lo - j0));
        for (int64_t j = lo; j < hi; ++j) block_max = std::max(block_max, scores_[j - j0]);
        const float new_max = std::max(max_[r], block_max);
        const float correction = std::exp(max_[r] - new_max);   // 0 on the first block
        for (int64_t j = 0; j < padded_block_; ++j) scores_[j] -= new_max;
        exp_inplace(scores_.data(), padded_block_);
        float* acc = acc_.data() + r * D;
        float block_sum = 0.f;
        if (correction != 1.f) {
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) acc[i] *= correction;
        }
        for (int64_t j = lo; j < hi; ++j) block_sum += scores_[j - j0];
        accumulate(acc, scores_.data() + (lo - j0), values + (lo - j0) * row_stride, row_stride, hi - lo, D);
        sum_[r] = sum_[r] * correction + block_sum;
        max_[r] = new_max;
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      scalar_t* dst = out + ((item.token_begin + r / G) * g_.heads + h * G + r % G) * D;
      const float inv = 1.f / sum_[r];
      float* acc = acc_.data() + r * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) acc[i] *= inv;
      store_floats(acc, dst, D);
    }
  }

 private:
  // Where key j0's row of head h starts in a cache, j0 in the sequence's block `blk`.
  int64_t row_offset(const int32_t* table, int64_t blk, int64_t j0, int64_t h) const {
    return table[blk] * g_.cache_block_stride + (j0 - blk * g_.block_size) * g_.cache_slot_stride + h * g_.dim;
  }

  // A decode: every row sees the same keys, so all scores are computed first and the softmax runs
  // once over them, without the per-block rescaling of the online softmax. A split decode's part
  // leaves its unnormalised result in `partials`.
  void run_decode(const WorkItem& item, const scalar_t* k_cache, const scalar_t* v_cache, const int32_t* table,
                  int64_t key_begin, int64_t key_end, scalar_t* out, Partials* partials) {
    const int64_t D = g_.dim, G = g_.group, bs = g_.block_size;
    const int64_t h = item.kv_head, length = key_end - key_begin;
    const int64_t padded = (length + Vec::size() - 1) / Vec::size() * Vec::size();
    if (static_cast<int64_t>(all_scores_.size()) < G * padded) all_scores_.resize(G * padded);
    std::fill(all_scores_.begin(), all_scores_.begin() + G * padded, -std::numeric_limits<float>::infinity());
    const int64_t stride = g_.cache_slot_stride;
    for (int64_t blk = key_begin / bs; blk * bs < key_end; ++blk) {
      const int64_t j0 = std::max(key_begin, blk * bs), j1 = std::min(key_end, (blk + 1) * bs);
      const scalar_t* keys = k_cache + row_offset(table, blk, j0, h);
      for (int64_t r = 0; r < G; ++r) {
        score_keys(q_.data() + r * D, keys, stride, j1 - j0, D, all_scores_.data() + r * padded + (j0 - key_begin));
      }
    }
    for (int64_t r = 0; r < G; ++r) {
      float* scores = all_scores_.data() + r * padded;
      Vec vmax(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < padded; j += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(scores + j));
      const float row_max = at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, vmax);
      Vec vsum(0.f);
      for (int64_t j = 0; j < padded; j += Vec::size()) {
        const Vec e = (Vec::loadu(scores + j) - Vec(row_max)).exp();
        e.store(scores + j);
        vsum = vsum + e;
      }
      sum_[r] = at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, vsum);
      max_[r] = row_max;
    }
    std::fill(acc_.begin(), acc_.begin() + G * D, 0.f);
    for (int64_t blk = key_begin / bs; blk * bs < key_end; ++blk) {
      const int64_t j0 = std::max(key_begin, blk * bs), j1 = std::min(key_end, (blk + 1) * bs);
      const scalar_t* values = v_cache + row_offset(table, blk, j0, h);
      for (int64_t r = 0; r < G; ++r) {
        accumulate(acc_.data() + r * D, all_scores_.data() + r * padded + (j0 - key_begin), values, stride, j1 - j0, D);
      }
    }
    if (partials != nullptr) {
      std::copy(acc_.begin(), acc_.begin() + G * D, partials->acc.begin() + item.part * G * D);
      std::copy(max_.begin(), max_.begin() + G, partials->max.begin() + item.part * G);
      std::copy(sum_.begin(), sum_.begin() + G, partials->sum.begin() + item.part * G);
      return;
    }
    for (int64_t r = 0; r < G; ++r) {
      float* acc = acc_.data() + r * D;
      const float inv = 1.f / sum_[r];
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) acc[i] *= inv;
      store_floats(acc, out + (item.token_begin * g_.heads + h * G + r) * D, D);
    }
  }

  std::vector<float> all_scores_;
  const Geometry& g_;
  int64_t padded_block_;
  std::vector<float> q_, acc_, max_, sum_, scores_;
};

Plan plan_items(const int32_t* query_start_loc, const int32_t* seq_lens, const int32_t* seq_ids, int64_t num_ids,
                int64_t kv_heads, int64_t window, int64_t threads) {
  Plan plan;
  auto& items = plan.items;
  int64_t total = 0;
  for (int64_t n = 0; n < num_ids; ++n) {
    const int32_t s = seq_ids[n];
    const int32_t begin = query_start_loc[s], end = query_start_loc[s + 1];
    const int64_t context = seq_lens[s] - (end - begin);
    for (int32_t t = begin; t < end; t += kQueryTile) {
      const int32_t t_end = std::min<int32_t>(end, t + kQueryTile);
      const auto [key_begin, key_end] = key_range(context + (t - begin), context + (t_end - begin) - 1, window);
      const int64_t cost = (key_end - key_begin) * (t_end - t);
      for (int32_t h = 0; h < kv_heads; ++h) items.push_back({s, h, t, t_end, cost});
      total += cost * kv_heads;
    }
  }
  if (threads > 1) {
    // A decode costing more than a thread's share of the step is split into parts of about that
    // share, so that no thread is left running one long item while the others wait.
    const int64_t share = std::max<int64_t>(kSplitMinKeys, total / (kItemsPerThread * threads));
    const int64_t whole = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < whole; ++i) {
      const WorkItem item = items[i];   // a copy: the parts are appended to `items`
      const int64_t parts = item.cost / share;   // a decode's cost: its keys
      if (item.token_end - item.token_begin != 1 || parts < 2) continue;
      const int64_t pos = seq_lens[item.seq] - 1;
      const auto [key_begin, key_end] = key_range(pos, pos, window);
      const int64_t keys = key_end - key_begin;
      plan.splits.push_back({item.token_begin, item.kv_head, plan.parts, parts});
      for (int64_t p = 0; p < parts; ++p) {
        WorkItem part = item;
        part.key_begin = key_begin + keys * p / parts;
        part.key_end = key_begin + keys * (p + 1) / parts;
        part.cost = part.key_end - part.key_begin;
        part.part = plan.parts + p;
        if (p == 0) items[i] = part; else items.push_back(part);
      }
      plan.parts += parts;
    }
  }
  // Longest first, so the last items handed out are short and the threads finish together.
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  return plan;
}

// Each split decode's output rows from its parts: the parts' sums rescaled to the largest max.
// A few hundred flops per part and row: a step's splits are combined on one thread unless there
// are many of them.
template <typename scalar_t>
void combine_parts(const Plan& plan, const Partials& partials, const Geometry& g, scalar_t* out) {
  const int64_t G = g.group, D = g.dim;
  constexpr int64_t kSplitsPerThread = 16;
  at::parallel_for(0, static_cast<int64_t>(plan.splits.size()), kSplitsPerThread, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t i = begin; i < end; ++i) {
      const SplitDecode& split = plan.splits[i];
      for (int64_t r = 0; r < G; ++r) {
        float row_max = -std::numeric_limits<float>::infinity();
        for (int64_t p = split.first_part; p < split.first_part + split.parts; ++p) {
          row_max = std::max(row_max, partials.max[p * G + r]);
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        float sum = 0.f;
        for (int64_t p = split.first_part; p < split.first_part + split.parts; ++p) {
          const float weight = std::exp(partials.max[p * G + r] - row_max);
          const float* part = partials.acc.data() + (p * G + r) * D;
          sum += weight * partials.sum[p * G + r];
#pragma omp simd
          for (int64_t e = 0; e < D; ++e) acc[e] += weight * part[e];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t e = 0; e < D; ++e) acc[e] *= inv;
        store_floats(acc.data(), out + (split.token * g.heads + split.kv_head * G + r) * D, D);
      }
    }
  });
}

}  // namespace

void paged_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& query_start_loc, const at::Tensor& seq_lens, const at::Tensor& block_tables,
                     const at::Tensor& seq_ids, double scale, int64_t window) {
  const char* op = "fastgen_cpu.paged_attention";
  check_cpu(op, {&out, &q, &k_cache, &v_cache, &query_start_loc, &seq_lens, &block_tables, &seq_ids});
  check_float_dtype(op, q);
  check_same_dtype(op, {&out, &q, &k_cache, &v_cache});
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), op,
              ": q must be [T, H, D] and the caches [num_blocks, block_size, Hkv, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && out.is_contiguous(), op,
              ": the caches and out must be contiguous");
  TORCH_CHECK(out.sizes() == q.sizes(), op, ": out must have q's shape ", q.sizes());
  check_rows(op, "q", q);
  for (const auto* t : {&query_start_loc, &seq_lens, &block_tables, &seq_ids}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), op,
                ": query_start_loc, seq_lens, block_tables and seq_ids must be contiguous int32");
  }
  Geometry g;
  g.heads = q.size(1);
  g.dim = q.size(2);
  g.kv_heads = k_cache.size(2);
  g.block_size = k_cache.size(1);
  TORCH_CHECK(k_cache.size(3) == g.dim && g.heads % g.kv_heads == 0, op,
              ": the caches' head size must be q's and q's heads a multiple of the caches' heads");
  g.group = g.heads / g.kv_heads;
  g.q_token_stride = q.stride(0);
  g.q_head_stride = q.stride(1);
  g.cache_block_stride = k_cache.stride(0);
  g.cache_slot_stride = k_cache.stride(1);
  g.table_stride = block_tables.size(1);

  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const Plan plan = plan_items(query_start_loc.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(),
                               seq_ids.data_ptr<int32_t>(), seq_ids.numel(), g.kv_heads, window, threads);
  Partials partials;
  partials.acc.resize(plan.parts * g.group * g.dim);
  partials.max.resize(plan.parts * g.group);
  partials.sum.resize(plan.parts * g.group);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastgen_cpu_paged_attention", [&] {
    const auto* q_ptr = q.data_ptr<scalar_t>();
    const auto* k_ptr = k_cache.data_ptr<scalar_t>();
    const auto* v_ptr = v_cache.data_ptr<scalar_t>();
    auto* out_ptr = out.data_ptr<scalar_t>();
    const auto* qsl = query_start_loc.data_ptr<int32_t>();
    const auto* lens = seq_lens.data_ptr<int32_t>();
    const auto* tables = block_tables.data_ptr<int32_t>();
    std::vector<std::unique_ptr<AttentionItem<scalar_t>>> workers(threads);
    parallel_dynamic(static_cast<int64_t>(plan.items.size()), [&](int64_t i) {
      auto& worker = workers[at::get_thread_num() % threads];
      if (!worker) worker = std::make_unique<AttentionItem<scalar_t>>(g, kQueryTile * g.group);
      worker->run(plan.items[i], q_ptr, k_ptr, v_ptr, qsl, lens, tables, static_cast<float>(scale), window, out_ptr,
                  partials);
    });
    combine_parts(plan, partials, g, out_ptr);
  });
}

void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  const char* op = "fastgen_cpu.write_kv";
  check_cpu(op, {&key, &value, &k_cache, &v_cache, &slot_mapping});
  check_float_dtype(op, key);
  check_same_dtype(op, {&key, &value, &k_cache, &v_cache});
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes(), op, ": key and value must be [T, Hkv, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op, ": the caches must be contiguous");
  TORCH_CHECK(k_cache.size(2) == key.size(1) && k_cache.size(3) == key.size(2), op,
              ": the caches' [Hkv, D] must match key's, got ", k_cache.sizes(), " and ", key.sizes());
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == key.size(0), op,
              ": slot_mapping must be int64 with one slot per token");
  check_rows(op, "key", key);
  check_rows(op, "value", value);
  const int64_t tokens = key.size(0), heads = key.size(1), dim = key.size(2);
  const int64_t slots = k_cache.size(0) * k_cache.size(1);
  const auto mapping = slot_mapping.contiguous();
  const int64_t* slot = mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < slots, op, ": slot ", slot[t], " is outside the cache's ", slots, " slots");
  }
  const int64_t bytes = dim * key.element_size();
  char* k_dst = static_cast<char*>(k_cache.data_ptr());
  char* v_dst = static_cast<char*>(v_cache.data_ptr());
  const char* k_src = static_cast<const char*>(key.data_ptr());
  const char* v_src = static_cast<const char*>(value.data_ptr());
  const int64_t es = key.element_size();
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t dst = (slot[t] * heads + h) * bytes;
        std::memcpy(k_dst + dst, k_src + (t * key.stride(0) + h * key.stride(1)) * es, bytes);
        std::memcpy(v_dst + dst, v_src + (t * value.stride(0) + h * value.stride(1)) * es, bytes);
      }
    }
  });
}

}  // namespace fastgen_cpu
