// The sm_80 (and newer) instructions of the tensor-core attention kernel: one warp's
// multiply-accumulate, mma.sync m16n8k16 with fp32 accumulators; the shared-memory loads that feed
// it, ldmatrix; and the asynchronous copies that fill shared memory, cp.async.
//
// mma_16816: D[16x8] += A[16x16] * B[16x8], A and B in fp16 or bf16. Each of the warp's 32 threads
// holds a fixed part of each matrix, as the PTX ISA lays it out; with g = lane / 4 and
// c = 2 * (lane % 4):
//   a[0]: A[g][c, c+1]      a[1]: A[g+8][c, c+1]      a[2]: A[g][c+8, c+9]      a[3]: A[g+8][c+8, c+9]
//   b[0]: B[c, c+1][g]      b[1]: B[c+8, c+9][g]
//   d[0], d[1]: D[g][c, c+1]                          d[2], d[3]: D[g+8][c, c+1]
// two 16-bit values to a register, the first in the low half. So the scores of two neighbouring
// 8-key tiles are, element for element, the A operand of the next product over those 16 keys.
//
// ldmatrix<N, kTranspose>: N (1, 2 or 4) 8x8 matrices of 16-bit values from shared memory, row j of
// matrix m at the address lane 8m + j gives. Lane L receives in r[m] row g, columns c and c + 1 of
// matrix m; transposed, column g, rows c and c + 1: a B operand's register from a matrix whose rows
// are B's columns, or, transposed, B's rows.
//
// copy_async_16: 16 bytes from global to shared memory, copied while the thread goes on (zeros
// where `valid` is false); commit_async closes the thread's group of copies so far, and
// wait_async<N> waits until at most N of its groups are still in flight (groups finish in order).
// Other threads' copies are seen after a __syncthreads that follows their wait.
//
// The CUDA emulator of the tests has its own version of this header (the same function, computed
// across the warp's fibers).
#pragma once

#include <cstdint>

#include "cuda_utils.cuh"

namespace fastgen_cuda {

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <int kMatrices, bool kTranspose>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[kMatrices], const uint16_t* row);

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
__device__ __forceinline__ void copy_async_16(void* shared, const void* global, bool valid) {
  const auto address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
               :: "r"(address), "l"(global), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void commit_async() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int kInFlight>
__device__ __forceinline__ void wait_async() {
  asm volatile("cp.async.wait_group %0;" :: "n"(kInFlight) : "memory");
}
#else
__device__ __forceinline__ void copy_async_16(void*, const void*, bool) { __trap(); }
__device__ __forceinline__ void commit_async() {}
template <int kInFlight>
__device__ __forceinline__ void wait_async() {}
#endif

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
template <>
__device__ __forceinline__ void ldmatrix<4, false>(uint32_t (&r)[4], const uint16_t* row) {
  const auto address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address) : "memory");
}
template <>
__device__ __forceinline__ void ldmatrix<2, false>(uint32_t (&r)[2], const uint16_t* row) {
  const auto address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
               : "=r"(r[0]), "=r"(r[1]) : "r"(address) : "memory");
}
template <>
__device__ __forceinline__ void ldmatrix<4, true>(uint32_t (&r)[4], const uint16_t* row) {
  const auto address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address) : "memory");
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#else
// Older GPUs have no such instructions; the host does not launch the kernels that use them there.
template <>
__device__ __forceinline__ void ldmatrix<4, false>(uint32_t (&)[4], const uint16_t*) {
  __trap();
}
template <>
__device__ __forceinline__ void ldmatrix<2, false>(uint32_t (&)[2], const uint16_t*) {
  __trap();
}
template <>
__device__ __forceinline__ void ldmatrix<4, true>(uint32_t (&)[4], const uint16_t*) {
  __trap();
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&)[4], const uint32_t (&)[4],
                                                         const uint32_t (&)[2]) {
  __trap();
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&)[4], const uint32_t (&)[4], const uint32_t (&)[2]) {
  __trap();
}
#endif

}  // namespace fastgen_cuda
