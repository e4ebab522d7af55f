// torch's side of the torch.ops.fastgen_cuda ops: the schemas, the argument checks (each a
// RuntimeError naming the op and the argument), output allocation, and the call to the kernel's
// launcher on the current stream. The kernels themselves are in the .cu files.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace fastgen_cuda {
namespace {

// Argument errors: each message is built here as one std::string, the only argument handed to
// TORCH_CHECK, so no iostream code is compiled into this library. On the GPU machines (gcc 13.3,
// torch 2.11.0+cu130) c10::str's ostream, instantiated here to print a number, crashed the process
// (SIGSEGV in std::ostream::_M_insert<long>, cuda-gdb) where torch's own errors raised;
// tests/plugins/kernels/test_cuda_compile.py keeps the object free of it.
void append(std::string& s, const char* x) { s += x; }
void append(std::string& s, const std::string& x) { s += x; }
void append(std::string& s, at::ScalarType x) { s += c10::toString(x); }
void append(std::string& s, const c10::Device& x) { s += x.str(); }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
void append(std::string& s, T x) { s += std::to_string(x); }
template <typename T>
void append(std::string& s, c10::ArrayRef<T> xs) {   // as torch prints sizes: [4, 64]
  s += '[';
  for (size_t i = 0; i < xs.size(); ++i) {
    if (i) s += ", ";
    append(s, xs[i]);
  }
  s += ']';
}

template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}

#define FASTGEN_CHECK(cond, ...) TORCH_CHECK(cond, message(__VA_ARGS__))

DType dtype_of(const char* op, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: FASTGEN_CHECK(false, op, ": dtype ", t.scalar_type(), " is not supported; use float32, float16 or bfloat16");
  }
}

void check_cuda_on_one_device(const char* op, std::initializer_list<const at::Tensor*> tensors) {
  const auto device = (*tensors.begin())->device();
  for (const auto* t : tensors) {
    FASTGEN_CHECK(t->is_cuda(), op, ": every tensor must be on a CUDA device, got one on ", t->device());
    FASTGEN_CHECK(t->device() == device, op, ": every tensor must be on one device, got ", device, " and ",
                  t->device());
  }
}

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  FASTGEN_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

void check_same_dtype(const char* op, const char* what, std::initializer_list<const at::Tensor*> tensors) {
  const auto dtype = (*tensors.begin())->scalar_type();
  for (const auto* t : tensors) {
    FASTGEN_CHECK(t->scalar_type() == dtype, op, ": ", what, " must share one dtype, got ", dtype, " and ",
                  t->scalar_type());
  }
}

void check_int32(const char* op, const char* name, const at::Tensor& t) {
  FASTGEN_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
}

void check_rows(const char* op, const char* name, const at::Tensor& t) {
  FASTGEN_CHECK(t.stride(-1) == 1, op, ": ", name, " must be contiguous in its last dimension, got strides ",
                t.strides());
}

void check_launch(int error) { C10_CUDA_CHECK(static_cast<cudaError_t>(error)); }

// Whether t's GPU has the tensor-core instruction the prompt kernel uses (sm_80 or newer).
bool tensor_cores(const at::Tensor& t) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.device().index()));
  return major >= 8;
}

void* current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

void write_kv(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
              const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  constexpr const char* op = "fastgen_cuda::write_kv";
  check_cuda_on_one_device(op, {&key, &value, &k_cache, &v_cache, &slot_mapping});
  check_dim(op, "key", key, 3);
  check_dim(op, "k_cache", k_cache, 4);
  check_dim(op, "slot_mapping", slot_mapping, 1);
  FASTGEN_CHECK(slot_mapping.scalar_type() == at::kLong, op, ": slot_mapping must be int64, got ",
                slot_mapping.scalar_type());
  FASTGEN_CHECK(value.sizes() == key.sizes(), op, ": value must have key's shape ", key.sizes(), ", got ",
                value.sizes());
  FASTGEN_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have k_cache's shape ", k_cache.sizes(),
                ", got ", v_cache.sizes());
  FASTGEN_CHECK(slot_mapping.size(0) == key.size(0), op, ": slot_mapping must hold one slot per token (",
                key.size(0), "), got ", slot_mapping.size(0));
  FASTGEN_CHECK(key.size(1) == k_cache.size(2) && key.size(2) == k_cache.size(3), op,
                ": key's heads and head size ", key.sizes().slice(1), " must match the cache's ",
                k_cache.sizes().slice(2));
  check_same_dtype(op, "key, value and the caches", {&key, &value, &k_cache, &v_cache});
  FASTGEN_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op, ": the caches must be contiguous");
  check_rows(op, "key", key);
  check_rows(op, "value", value);

  const auto slots = slot_mapping.contiguous();
  const c10::cuda::CUDAGuard guard(key.device());
  const WriteKVParams p{key.data_ptr(), value.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                        slots.data_ptr<int64_t>(), static_cast<int>(key.size(0)),
                        static_cast<int>(key.size(1)), static_cast<int>(key.size(2)), key.stride(0),
                        key.stride(1), value.stride(0), value.stride(1)};
  check_launch(launch_write_kv(p, dtype_of(op, key), current_stream(key)));
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                     const at::Tensor& block_tables, double scale, int64_t sliding_window,
                     int64_t num_splits, const std::optional<at::Tensor>& prompt_tiles) {
  constexpr const char* op = "fastgen_cuda::attention";
  check_cuda_on_one_device(op, {&q, &k_cache, &v_cache, &query_start_loc, &seq_lens, &block_tables});
  check_dim(op, "q", q, 3);
  check_dim(op, "k_cache", k_cache, 4);
  check_dim(op, "query_start_loc", query_start_loc, 1);
  check_dim(op, "seq_lens", seq_lens, 1);
  check_dim(op, "block_tables", block_tables, 2);
  check_int32(op, "query_start_loc", query_start_loc);
  check_int32(op, "seq_lens", seq_lens);
  check_int32(op, "block_tables", block_tables);
  check_rows(op, "q", q);
  check_same_dtype(op, "q and the caches", {&q, &k_cache, &v_cache});
  FASTGEN_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have k_cache's shape ", k_cache.sizes(),
                ", got ", v_cache.sizes());
  FASTGEN_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op, ": the caches must be contiguous");
  const int64_t num_seqs = seq_lens.size(0);
  FASTGEN_CHECK(query_start_loc.size(0) == num_seqs + 1, op, ": query_start_loc must hold B+1 = ", num_seqs + 1,
                " offsets, got ", query_start_loc.size(0));
  FASTGEN_CHECK(block_tables.size(0) == num_seqs, op, ": block_tables must hold one row per sequence (",
                num_seqs, "), got ", block_tables.size(0));
  const int64_t num_heads = q.size(1), head_dim = q.size(2), num_kv_heads = k_cache.size(2);
  FASTGEN_CHECK(k_cache.size(3) == head_dim, op, ": the caches' head size ", k_cache.size(3),
                " must match q's ", head_dim);
  FASTGEN_CHECK(num_heads % num_kv_heads == 0, op, ": query heads (", num_heads,
                ") must be a multiple of key/value heads (", num_kv_heads, ")");
  const auto* sizes_end = std::end(kAttentionHeadSizes);
  FASTGEN_CHECK(std::find(std::begin(kAttentionHeadSizes), sizes_end, head_dim) != sizes_end, op,
                ": head size ", head_dim, " has no kernel; supported: ",
                c10::ArrayRef<int>(kAttentionHeadSizes));

  FASTGEN_CHECK(num_splits >= 1 && num_splits <= kMaxAttentionSplits, op, ": num_splits must be in [1, ",
                kMaxAttentionSplits, "], got ", num_splits);

  // Prompt tiles run on tensor cores, which the kernel's instruction needs from sm_80 on, and copy
  // cache rows 16 bytes at a time; older GPUs, and caches that do not start on 16 bytes (views at
  // odd offsets), run every token through the per-token kernel.
  at::Tensor tiles;
  if (prompt_tiles.has_value()) {
    check_cuda_on_one_device(op, {&q, &*prompt_tiles});
    check_dim(op, "prompt_tiles", *prompt_tiles, 2);
    check_int32(op, "prompt_tiles", *prompt_tiles);
    FASTGEN_CHECK(prompt_tiles->size(1) == 2, op, ": prompt_tiles must hold (sequence, first token) pairs, got shape ",
                  prompt_tiles->sizes());
    FASTGEN_CHECK(prompt_tiles->size(0) <= kMaxPromptTiles, op, ": at most ", kMaxPromptTiles,
                  " prompt tiles in one call, got ", prompt_tiles->size(0));
    const bool aligned = reinterpret_cast<uintptr_t>(k_cache.data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(v_cache.data_ptr()) % 16 == 0;
    if (prompt_tiles->size(0) > 0 && aligned && tensor_cores(q)) tiles = prompt_tiles->contiguous();
  }

  auto out = at::empty({q.size(0), num_heads, head_dim}, q.options());
  // Split-KV partials, fp32; unused (and not allocated) without a split.
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor part_out, part_max, part_sum;
  if (num_splits > 1) {
    part_out = at::empty({num_splits, q.size(0), num_heads, head_dim}, f32);
    part_max = at::empty({num_splits, q.size(0), num_heads}, f32);
    part_sum = at::empty({num_splits, q.size(0), num_heads}, f32);
  }
  const auto qsl = query_start_loc.contiguous();
  const auto lens = seq_lens.contiguous();
  const auto tables = block_tables.contiguous();
  const c10::cuda::CUDAGuard guard(q.device());
  const AttentionParams p{out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                          qsl.data_ptr<int>(), lens.data_ptr<int>(), tables.data_ptr<int>(),
                          static_cast<int>(q.size(0)), static_cast<int>(num_seqs),
                          static_cast<int>(tables.size(1)), static_cast<int>(k_cache.size(1)),
                          static_cast<int>(num_heads), static_cast<int>(num_kv_heads),
                          static_cast<int>(head_dim), q.stride(0), q.stride(1), static_cast<float>(scale),
                          static_cast<int>(std::max<int64_t>(sliding_window, 0)),
                          static_cast<int>(num_splits),
                          num_splits > 1 ? part_out.data_ptr<float>() : nullptr,
                          num_splits > 1 ? part_max.data_ptr<float>() : nullptr,
                          num_splits > 1 ? part_sum.data_ptr<float>() : nullptr,
                          tiles.defined() ? tiles.data_ptr<int>() : nullptr,
                          tiles.defined() ? static_cast<int>(tiles.size(0)) : 0};
  check_launch(launch_attention(p, dtype_of(op, q), current_stream(q)));
  return out;
}

// The backend asks this before calling attention, to send other head sizes to the reference.
std::vector<int64_t> attention_head_sizes() {
  return {std::begin(kAttentionHeadSizes), std::end(kAttentionHeadSizes)};
}

// The backend cuts prompt chunks into tiles of this many new tokens.
int64_t attention_prompt_tile_tokens() { return kPromptTileTokens; }

void check_rms_norm_args(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  check_cuda_on_one_device(op, {&x, &weight});
  check_dim(op, "x", x, 2);
  check_dim(op, "weight", weight, 1);
  check_rows(op, "x", x);
  FASTGEN_CHECK(weight.size(0) == x.size(1), op, ": weight must hold one value per feature (", x.size(1),
                "), got ", weight.size(0));
  check_same_dtype(op, "x and weight", {&x, &weight});
}

// residual: undefined for plain RMSNorm; then residual_out is too.
void run_rms_norm(const char* op, const at::Tensor& out, const at::Tensor& residual_out, const at::Tensor& x,
                  const at::Tensor& residual, const at::Tensor& weight, double eps) {
  const auto w = weight.contiguous();
  const bool fused = residual.defined();
  const c10::cuda::CUDAGuard guard(x.device());
  const RMSNormParams p{out.data_ptr(), fused ? residual_out.data_ptr() : nullptr, x.data_ptr(),
                        fused ? residual.data_ptr() : nullptr, w.data_ptr(), static_cast<int>(x.size(0)),
                        static_cast<int>(x.size(1)), x.stride(0), fused ? residual.stride(0) : 0,
                        static_cast<float>(eps)};
  check_launch(launch_rms_norm(p, dtype_of(op, x), current_stream(x)));
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  constexpr const char* op = "fastgen_cuda::rms_norm";
  check_rms_norm_args(op, x, weight);
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  run_rms_norm(op, out, at::Tensor(), x, at::Tensor(), weight, eps);
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  constexpr const char* op = "fastgen_cuda::add_rms_norm";
  check_rms_norm_args(op, x, weight);
  check_cuda_on_one_device(op, {&x, &residual});
  check_rows(op, "residual", residual);
  FASTGEN_CHECK(residual.sizes() == x.sizes(), op, ": residual must have x's shape ", x.sizes(), ", got ",
                residual.sizes());
  check_same_dtype(op, "x and residual", {&x, &residual});
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto residual_out = at::empty_like(x, at::MemoryFormat::Contiguous);
  run_rms_norm(op, out, residual_out, x, residual, weight, eps);
  return {out, residual_out};
}

// New contiguous q and k; the inputs are left as they are, as the reference leaves them.
std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                          const at::Tensor& sin, bool is_neox) {
  constexpr const char* op = "fastgen_cuda::rotary";
  check_cuda_on_one_device(op, {&q, &k, &cos, &sin});
  check_dim(op, "q", q, 3);
  check_dim(op, "k", k, 3);
  check_dim(op, "cos", cos, 2);
  check_rows(op, "q", q);
  check_rows(op, "k", k);
  check_same_dtype(op, "q and k", {&q, &k});
  FASTGEN_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2), op, ": k must be [T, Hkv, D] with q's T and D ",
                "(q has shape ", q.sizes(), "), got ", k.sizes());
  FASTGEN_CHECK(sin.sizes() == cos.sizes(), op, ": sin must have cos's shape ", cos.sizes(), ", got ",
                sin.sizes());
  FASTGEN_CHECK(cos.size(0) == q.size(0), op, ": cos and sin must hold one row per token (", q.size(0), "), got ",
                cos.size(0));
  FASTGEN_CHECK(2 * cos.size(1) <= q.size(2), op, ": cos and sin cover ", 2 * cos.size(1),
                " rotary dims, more than the head size ", q.size(2));

  const auto dtype = dtype_of(op, q);
  const auto c = cos.to(at::kFloat).contiguous();
  const auto s = sin.to(at::kFloat).contiguous();
  auto q_out = at::empty(q.sizes(), q.options());
  auto k_out = at::empty(k.sizes(), k.options());
  const c10::cuda::CUDAGuard guard(q.device());
  const RotaryParams p{q_out.data_ptr(), k_out.data_ptr(), q.data_ptr(), k.data_ptr(), c.data_ptr<float>(),
                       s.data_ptr<float>(), static_cast<int>(q.size(0)), static_cast<int>(q.size(1)),
                       static_cast<int>(k.size(1)), static_cast<int>(q.size(2)), static_cast<int>(c.size(1)),
                       q.stride(0), q.stride(1), k.stride(0), k.stride(1), is_neox};
  check_launch(launch_rotary(p, dtype, current_stream(q)));
  return {q_out, k_out};
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  constexpr const char* op = "fastgen_cuda::silu_and_mul";
  check_cuda_on_one_device(op, {&x});
  check_dim(op, "x", x, 2);
  check_rows(op, "x", x);
  FASTGEN_CHECK(x.size(1) % 2 == 0, op, ": x must be [T, 2I], got an odd width ", x.size(1));

  const auto dtype = dtype_of(op, x);
  auto out = at::empty({x.size(0), x.size(1) / 2}, x.options());
  const c10::cuda::CUDAGuard guard(x.device());
  const SiluAndMulParams p{out.data_ptr(), x.data_ptr(), static_cast<int>(x.size(0)),
                           static_cast<int>(out.size(1)), x.stride(0)};
  check_launch(launch_silu_and_mul(p, dtype, current_stream(x)));
  return out;
}

void check_per_row(const char* op, const char* name, const at::Tensor& t, int64_t rows, at::ScalarType dtype) {
  check_dim(op, name, t, 1);
  FASTGEN_CHECK(t.size(0) == rows, op, ": ", name, " must hold one value per row (", rows, "), got ", t.size(0));
  FASTGEN_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

// The sample kernel over the rows; `cuts`, if defined, also receives each row's top-k / top-p cut;
// `given_cuts`, if defined, are the rows' cuts, found beforehand (the kernel then searches none).
at::Tensor run_sample(const char* op, const at::Tensor& logits, const at::Tensor& temperatures,
                      const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& seeds,
                      const at::Tensor& cuts, const at::Tensor& given_cuts) {
  check_cuda_on_one_device(op, {&logits, &temperatures, &top_k, &top_p, &seeds});
  check_dim(op, "logits", logits, 2);
  check_rows(op, "logits", logits);
  FASTGEN_CHECK(logits.scalar_type() == at::kFloat, op, ": logits must be float32, got ", logits.scalar_type());
  const int64_t rows = logits.size(0);
  check_per_row(op, "temperatures", temperatures, rows, at::kFloat);
  check_per_row(op, "top_k", top_k, rows, at::kLong);
  check_per_row(op, "top_p", top_p, rows, at::kFloat);
  check_per_row(op, "seeds", seeds, rows, at::kLong);
  if (given_cuts.defined()) {
    check_cuda_on_one_device(op, {&logits, &given_cuts});
    check_per_row(op, "cuts", given_cuts, rows, at::kFloat);
  }

  auto out = at::empty({rows}, logits.options().dtype(at::kLong));
  const auto temps = temperatures.contiguous(), ks = top_k.contiguous(), ps = top_p.contiguous(),
             keys = seeds.contiguous(), given = given_cuts.defined() ? given_cuts.contiguous() : at::Tensor();
  const c10::cuda::CUDAGuard guard(logits.device());
  const SampleParams p{out.data_ptr<int64_t>(), logits.data_ptr<float>(), temps.data_ptr<float>(),
                       ks.data_ptr<int64_t>(), ps.data_ptr<float>(), keys.data_ptr<int64_t>(),
                       static_cast<int>(rows), static_cast<int>(logits.size(1)), logits.stride(0),
                       cuts.defined() ? cuts.data_ptr<float>() : nullptr,
                       given.defined() ? given.data_ptr<float>() : nullptr};
  check_launch(launch_sample(p, current_stream(logits)));
  return out;
}

at::Tensor sample(const at::Tensor& logits, const at::Tensor& temperatures, const at::Tensor& top_k,
                  const at::Tensor& top_p, const at::Tensor& seeds, const std::optional<at::Tensor>& cuts) {
  return run_sample("fastgen_cuda::sample", logits, temperatures, top_k, top_p, seeds, at::Tensor(),
                    cuts.has_value() ? *cuts : at::Tensor());
}

at::Tensor sample_cuts(const at::Tensor& logits, const at::Tensor& temperatures, const at::Tensor& top_k,
                       const at::Tensor& top_p) {
  check_dim("fastgen_cuda::sample_cuts", "logits", logits, 2);
  auto cuts = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  const auto seeds = at::zeros({logits.size(0)}, logits.options().dtype(at::kLong));
  run_sample("fastgen_cuda::sample_cuts", logits, temperatures, top_k, top_p, seeds, cuts, at::Tensor());
  return cuts;
}

}  // namespace

TORCH_LIBRARY(fastgen_cuda, m) {
  // key, value: [T, Hkv, D]; caches: [num_blocks, block_size, Hkv, D]; slot_mapping: [T] int64,
  // a negative slot skips its token.
  m.def("write_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping) -> ()");
  // q: [T, H, D] -> [T, H, D] over the ragged batch (query_start_loc [B+1], seq_lens [B],
  // block_tables [B, max_blocks], all int32). sliding_window <= 0: no window. num_splits: split-KV
  // parts per key range, 1 to kMaxAttentionSplits. prompt_tiles: [W, 2] int32 (sequence, first new
  // token) tiles of attention_prompt_tile_tokens() new tokens covering every sequence with more
  // than one; None: every token takes the per-token kernel.
  m.def("attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor query_start_loc, "
        "Tensor seq_lens, Tensor block_tables, float scale, int sliding_window, int num_splits=1, "
        "Tensor? prompt_tiles=None) -> Tensor");
  // No tensor arguments, so no dispatch key: catch-all kernels.
  m.def("attention_head_sizes() -> int[]", &attention_head_sizes);
  m.def("attention_prompt_tile_tokens() -> int", &attention_prompt_tile_tokens);
  // x: [T, E], weight: [E] -> [T, E]
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // x, residual: [T, E], weight: [E] -> (rms_norm(x + residual) [T, E], x + residual [T, E])
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  // q: [T, H, D], k: [T, Hkv, D], cos/sin: [T, R/2] for the first R dims of each head
  // -> (rotated q, rotated k), new and contiguous. is_neox: halves; else gpt-j's adjacent pairs.
  m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor sin, bool is_neox) -> (Tensor, Tensor)");
  // x: [T, 2I] -> silu(x[:, :I]) * x[:, I:]: [T, I]
  m.def("silu_and_mul(Tensor x) -> Tensor");
  // logits: [S, V] float32, temperatures [S] float32 (<= 0: greedy), top_k [S] int64 (0: none),
  // top_p [S] float32 (1: none), seeds [S] int64 (Philox keys) -> next tokens [S] int64; cuts
  // [S] float32, if given: each row's cut found beforehand (sample_cuts on its top-k candidates)
  m.def("sample(Tensor logits, Tensor temperatures, Tensor top_k, Tensor top_p, Tensor seeds, "
        "Tensor? cuts=None) -> Tensor");
  // The same rows -> each row's top-k / top-p cut [S] float32: the smallest scaled logit sample
  // keeps; -inf where nothing is cut (greedy rows too). For tests and kernel authors.
  m.def("sample_cuts(Tensor logits, Tensor temperatures, Tensor top_k, Tensor top_p) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastgen_cuda, CUDA, m) {
  m.impl("write_kv", &write_kv);
  m.impl("attention", &attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary", &rotary);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("sample", &sample);
  m.impl("sample_cuts", &sample_cuts);
}

}  // namespace fastgen_cuda
