// C entry points into kernels.cuda's launchers, for ctypes (tests/plugins/kernels/cuda_emulator.py).
// Each takes the launcher's params struct as kernels.h lays it out and the DType as an int.
#include "kernels.h"

using namespace fastgen_cuda;

extern "C" {
int emu_attention(const AttentionParams* p, int dtype) { return launch_attention(*p, DType(dtype), nullptr); }
int emu_write_kv(const WriteKVParams* p, int dtype) { return launch_write_kv(*p, DType(dtype), nullptr); }
int emu_rms_norm(const RMSNormParams* p, int dtype) { return launch_rms_norm(*p, DType(dtype), nullptr); }
int emu_rotary(const RotaryParams* p, int dtype) { return launch_rotary(*p, DType(dtype), nullptr); }
int emu_silu_and_mul(const SiluAndMulParams* p, int dtype) {
  return launch_silu_and_mul(*p, DType(dtype), nullptr);
}
int emu_sample(const SampleParams* p, int) { return launch_sample(*p, nullptr); }
int emu_prompt_tile_tokens() { return kPromptTileTokens; }
// The structs' sizes, so the Python side can check its copy of their layouts.
size_t emu_sizeof(int which) {
  switch (which) {
    case 0: return sizeof(AttentionParams);
    case 1: return sizeof(WriteKVParams);
    case 2: return sizeof(RMSNormParams);
    case 3: return sizeof(RotaryParams);
    case 4: return sizeof(SiluAndMulParams);
    case 5: return sizeof(SampleParams);
  }
  return 0;
}
}
