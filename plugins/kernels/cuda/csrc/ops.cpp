// The op schemas of the torch.ops.fastgen_cuda namespace. Implementations register for the CUDA
// dispatch key next to their kernels (attention.cu, kv_cache.cu, rms_norm.cu).
#include <torch/library.h>

TORCH_LIBRARY(fastgen_cuda, m) {
  // key, value: [T, Hkv, D]; caches: [num_blocks, block_size, Hkv, D]; slot_mapping: [T] int64,
  // a negative slot skips its token.
  m.def("write_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping) -> ()");
  // q: [T, H, D] -> [T, H, D] over the ragged batch (query_start_loc [B+1], seq_lens [B],
  // block_tables [B, max_blocks], all int32). sliding_window <= 0: no window.
  m.def("attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor query_start_loc, "
        "Tensor seq_lens, Tensor block_tables, float scale, int sliding_window) -> Tensor");
  // x: [T, E], weight: [E] -> [T, E]
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // x, residual: [T, E], weight: [E] -> (rms_norm(x + residual) [T, E], x + residual [T, E])
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
}
