// Stand-in for csrc/sm80.cuh in the CUDA emulator: the same functions, mma.sync and ldmatrix run
// across the warp's fibers (emu::warp_mma and emu::warp_ldmatrix in ../emulator.h), the
// asynchronous copies held back until a wait lets them land (emu::copy_async and the rest), so a
// kernel that reads shared memory before it waits reads what was there before.
#pragma once

#include <cstdint>

#include "cuda_utils.cuh"

namespace fastgen_cuda {

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu::warp_mma<T>(d, a, b);
}

template <int kMatrices, bool kTranspose>
inline void ldmatrix(uint32_t (&r)[kMatrices], const uint16_t* row) {
  emu::warp_ldmatrix<kMatrices, kTranspose>(r, row);
}

inline void copy_async_16(void* shared, const void* global, bool valid) {
  emu::copy_async(shared, global, valid ? 16 : 0);
}
inline void commit_async() { emu::commit_async(); }
template <int kInFlight>
inline void wait_async() {
  emu::wait_async(kInFlight);
}

}  // namespace fastgen_cuda
