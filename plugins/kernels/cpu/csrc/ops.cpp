// Registers the fastgen CPU kernels as torch.ops.fastgen_cpu.*.
#include <torch/library.h>

#include "cpu_kernels.h"

TORCH_LIBRARY(fastgen_cpu, m) {
  m.def("write_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()",
        &fastgen_cpu::write_kv);
  m.def("paged_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor query_start_loc, "
        "Tensor seq_lens, Tensor block_tables, Tensor seq_ids, float scale, int window) -> ()",
        &fastgen_cpu::paged_attention);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &fastgen_cpu::rms_norm);
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)",
        &fastgen_cpu::add_rms_norm);
  m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor sin, bool is_neox) -> (Tensor, Tensor)",
        &fastgen_cpu::rotary);
  m.def("silu_and_mul(Tensor x) -> Tensor", &fastgen_cpu::silu_and_mul);
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor", &fastgen_cpu::linear);
}
