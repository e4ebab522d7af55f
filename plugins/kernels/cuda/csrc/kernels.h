// The launchers of the CUDA kernels, as plain C++ with no torch and no CUDA types: ops.cpp (torch's
// side: checks, allocation, registration) calls them, and the .cu files that define them compile
// without torch's headers, which is most of a build's time.
#pragma once

#include <cstdint>

namespace fastgen_cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

constexpr int kAttentionHeadSizes[] = {64, 80, 96, 112, 128, 256};
// Split-KV: at most this many parts per key range.
constexpr int kMaxAttentionSplits = 32;
// Prompt chunks (sequences with more than one new token) run on tensor cores where they can (sm_80
// or newer, fp16/bf16, head sizes up to kMaxTiledHeadSize), in tiles of this many new tokens.
constexpr int kPromptTileTokens = 64;
constexpr int kMaxPromptTiles = 65535;
constexpr int kMaxTiledHeadSize = 128;

struct AttentionParams {
  void* out;                    // [T, H, D], contiguous
  const void* q;                // [T, H, D], rows strided, last dim contiguous
  const void* k_cache;          // [num_blocks, block_size, Hkv, D], contiguous
  const void* v_cache;
  const int* query_start_loc;   // [B+1]
  const int* seq_lens;          // [B]
  const int* block_tables;      // [B, max_blocks], contiguous
  int num_tokens, num_seqs, max_blocks, block_size, num_heads, num_kv_heads, head_dim;
  int64_t q_token_stride, q_head_stride;
  float scale;
  int sliding_window;           // <= 0: none
  // Split-KV: each (token, head)'s keys are cut into num_splits parts. With more than one, each
  // part's unnormalised output and softmax state land in these fp32 buffers and a second kernel
  // merges them into out; with one, they are unused.
  int num_splits;
  float* part_out;              // [num_splits, T, H, D]
  float* part_max;              // [num_splits, T, H]
  float* part_sum;              // [num_splits, T, H]
  // The prompt chunks' tiles, [num_prompt_tiles, 2] int32: (sequence, first new token of the tile,
  // counted within the sequence's new tokens, a multiple of kPromptTileTokens), covering every
  // sequence with more than one new token, in the order their blocks should start; at most
  // kMaxPromptTiles (a grid's second dimension). With num_prompt_tiles 0 (or where the tiled kernel
  // does not run: launch_attention decides), every token takes the per-token kernel.
  const int* prompt_tiles;
  int num_prompt_tiles;
};

struct WriteKVParams {
  const void* key;              // [T, Hkv, D], rows strided, last dim contiguous
  const void* value;
  void* k_cache;                // [num_blocks, block_size, Hkv, D], contiguous
  void* v_cache;
  const int64_t* slot_mapping;  // [T]; a negative slot skips its token
  int num_tokens, num_kv_heads, head_dim;
  int64_t key_token_stride, key_head_stride, value_token_stride, value_head_stride;
};

struct RMSNormParams {
  void* out;                    // [T, E], contiguous
  void* residual_out;           // [T, E], contiguous; null for plain RMSNorm
  const void* x;                // [T, E], rows strided
  const void* residual;         // [T, E], rows strided; null for plain RMSNorm
  const void* weight;           // [E]
  int num_tokens, hidden;
  int64_t x_row_stride, residual_row_stride;
  float eps;
};

struct RotaryParams {
  void* q_out;                  // [T, H, D], contiguous
  void* k_out;                  // [T, Hkv, D], contiguous
  const void* q;                // [T, H, D], rows strided, last dim contiguous
  const void* k;                // [T, Hkv, D], rows strided, last dim contiguous
  const float* cos;             // [T, R/2], contiguous, for the first R dims of each head
  const float* sin;
  int num_tokens, num_heads, num_kv_heads, head_dim, rotary_half;   // rotary_half: R/2
  int64_t q_token_stride, q_head_stride, k_token_stride, k_head_stride;
  bool is_neox;                 // pairs (i, i + R/2); else gpt-j's adjacent pairs (2i, 2i + 1)
};

struct SiluAndMulParams {
  void* out;                    // [T, I], contiguous
  const void* x;                // [T, 2I], rows strided, last dim contiguous: gate | up
  int num_tokens, inter;
  int64_t x_row_stride;
};

struct SampleParams {
  int64_t* out;                 // [S]: the next token of each row
  const float* logits;          // [S, V], rows strided, last dim contiguous
  const float* temperatures;    // [S]; <= 0: greedy
  const int64_t* top_k;         // [S]; 0 or >= V: no top-k
  const float* top_p;           // [S]; >= 1: no top-p
  const int64_t* seeds;         // [S]: each row's Philox key
  int num_rows, vocab;
  int64_t row_stride;
  float* cuts;                  // [S] or null: each row's top-k / top-p cut (-inf: none), if asked
  const float* given_cuts;      // [S] or null: each row's cut, found beforehand; then not searched
};

// Each enqueues its kernel on `stream` (a cudaStream_t) and returns the launch's cudaError_t.
int launch_attention(const AttentionParams& p, DType dtype, void* stream);
int launch_write_kv(const WriteKVParams& p, DType dtype, void* stream);
int launch_rms_norm(const RMSNormParams& p, DType dtype, void* stream);
int launch_rotary(const RotaryParams& p, DType dtype, void* stream);
int launch_silu_and_mul(const SiluAndMulParams& p, DType dtype, void* stream);
int launch_sample(const SampleParams& p, void* stream);   // logits in fp32 only

}  // namespace fastgen_cuda
