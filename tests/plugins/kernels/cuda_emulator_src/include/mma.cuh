// Stand-in for csrc/mma.cuh in the CUDA emulator: the same function, run across the warp's fibers
// (emu::warp_mma and emu::warp_ldmatrix in ../emulator.h).
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

}  // namespace fastgen_cuda
