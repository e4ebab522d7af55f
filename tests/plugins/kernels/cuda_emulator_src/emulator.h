// Runs kernels.cuda's device code on the CPU, for tests on machines without a GPU.
//
// Every CUDA thread of a block is a fiber on the calling thread (switched by a few instructions of
// assembly on x86-64, by ucontext elsewhere); the blocks of the grid
// run one after another, so `__shared__` arrays (function statics here) hold one block's data at
// a time. __syncthreads is a barrier over the block's fibers and the warp shuffles exchange values
// through a barrier over the warp's 32: a fiber runs until it reaches one, then the next runs. A
// sweep over the fibers in which none arrives anywhere or finishes is a deadlock (threads that
// disagree on their barriers), reported and aborted rather than hung. What this checks is the
// kernels' arithmetic, indexing and synchronisation logic; not what only a GPU shows (memory
// coalescing, races between warps that the fibers' order happens to hide, __expf's approximation).
//
// tests/plugins/kernels/cuda_emulator.py builds csrc/ against this header (through the stand-in
// cuda_*.h headers in include/) after rewriting each `kernel<<<config>>>(args)` launch as
// `emu::Launch(config)(kernel, args)`.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct uint2 {
  unsigned x, y;
};
struct uint4 {
  unsigned x, y, z, w;
};

using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

namespace emu {

struct AsyncCopy {
  void* shared;
  const void* global;
  int bytes;   // read from global; the rest of 16 zero-filled
};

struct Fiber {
  ucontext_t context;   // without the x86-64 switch
  void* stack_top = nullptr;   // with it: the saved stack pointer
  std::unique_ptr<char[]> stack;   // uninitialised: a block of 1024 threads needs 64 MiB
  dim3 thread;
  int linear = 0;
  long shuffles = 0;
  long products = 0;   // warp_mma calls
  long matrix_loads = 0;   // warp_ldmatrix calls
  std::vector<AsyncCopy> open_group;               // cp.async copies not yet committed
  std::vector<std::vector<AsyncCopy>> in_flight;   // committed groups, oldest first
  bool done = false;
};

inline ucontext_t scheduler;
inline void* scheduler_stack_top = nullptr;
inline Fiber* current = nullptr;
inline long progress = 0;               // arrivals at barriers and finished fibers, ever
inline const std::function<void()>* body = nullptr;
inline dim3 block_index, block_dim, grid_dim;
inline std::vector<unsigned char> dynamic_shared_memory;

#if defined(__x86_64__)
// swapcontext also saves and restores the signal mask, a system call each way: ~350 ns a switch,
// against a few ns for this. It saves the callee-saved registers and the SSE and x87 control words
// on the old stack, stores the stack pointer in *save, and resumes the stack at `load` the same way.
// Internal linkage: emulator.h is included by every source of the library.
__attribute__((naked, noinline)) static void switch_stack(void** /*save*/, void* /*load*/) {
  asm volatile(
      "pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "subq $8, %rsp\n\t"
      "stmxcsr (%rsp)\n\t"
      "fnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\t"
      "fldcw 4(%rsp)\n\t"
      "addq $8, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}
inline void yield() { switch_stack(&current->stack_top, scheduler_stack_top); }
#else
inline void yield() { swapcontext(&current->context, &scheduler); }
#endif

// A barrier over `count` fibers, reusable: the last to arrive runs `on_release`, if any, and
// releases the others.
class Barrier {
 public:
  explicit Barrier(int count = 0, void (*on_release)() = nullptr) : count_(count), on_release_(on_release) {}
  void wait() {
    ++progress;
    if (++arrived_ == count_) {
      arrived_ = 0;
      if (on_release_) on_release_();
      ++generation_;
      return;
    }
    const long generation = generation_;
    while (generation_ == generation) yield();
  }

 private:
  int count_, arrived_ = 0;
  long generation_ = 0;
  void (*on_release_)();
};

inline Barrier block_barrier;            // __syncthreads
inline Barrier block_end;                // every thread done with a block: the next one starts
inline std::vector<Barrier> warp_barriers;
inline std::vector<uint64_t> warp_slots;
inline std::vector<uint32_t> warp_operands;   // warp_mma's: per warp, 2 sets of 32 lanes' a and b
inline std::vector<const uint16_t*> warp_rows;   // warp_ldmatrix's: per warp, 2 sets of 32 addresses
inline bool launch_finished = false;

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(dynamic_shared_memory.data());
}

// The last thread to finish a block moves the whole block on to the next, x fastest.
inline void next_block() {
  if (++block_index.x < grid_dim.x) return;
  block_index.x = 0;
  if (++block_index.y < grid_dim.y) return;
  block_index.y = 0;
  if (++block_index.z < grid_dim.z) return;
  launch_finished = true;
}

// A thread's life: its part of every block in turn.
inline void fiber_main() {
  for (;;) {
    (*body)();
    block_end.wait();
    if (launch_finished) break;
  }
  current->done = true;
  ++progress;
}   // uc_link returns to the scheduler

#if defined(__x86_64__)
// A fiber's first frame: fiber_main, then back to the scheduler for good.
[[noreturn]] inline void fiber_entry() {
  fiber_main();
  for (;;) yield();   // done: the scheduler never resumes it
}

// A new fiber's stack, laid out as switch_stack leaves a suspended one: the control words, six
// registers, and fiber_entry as the return address, above which a zero stands for the return
// address of a call, so that fiber_entry starts with the stack aligned as the ABI has it.
inline void start_fiber(Fiber& fiber, size_t stack_bytes) {
  auto top = reinterpret_cast<uintptr_t>(fiber.stack.get() + stack_bytes) & ~uintptr_t(15);
  auto* slot = reinterpret_cast<uint64_t*>(top);
  *--slot = 0;                                                // 16-aligned + 8 once fiber_entry runs
  *--slot = reinterpret_cast<uint64_t>(&fiber_entry);
  for (int i = 0; i < 6; ++i) *--slot = 0;                    // rbp, rbx, r12-r15
  uint32_t mxcsr;
  uint16_t fcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fcw));
  *--slot = static_cast<uint64_t>(mxcsr) | static_cast<uint64_t>(fcw) << 32;
  fiber.stack_top = slot;
}
inline void resume(Fiber& fiber) { switch_stack(&scheduler_stack_top, fiber.stack_top); }
#else
inline void start_fiber(Fiber& fiber, size_t stack_bytes) {
  getcontext(&fiber.context);
  fiber.context.uc_stack.ss_sp = fiber.stack.get();
  fiber.context.uc_stack.ss_size = stack_bytes;
  fiber.context.uc_link = &scheduler;
  makecontext(&fiber.context, fiber_main, 0);
}
inline void resume(Fiber& fiber) { swapcontext(&scheduler, &fiber.context); }
#endif

class Launch {
 public:
  Launch(dim3 grid, dim3 block, size_t shared_bytes = 0, cudaStream_t = nullptr)
      : grid_(grid), block_(block), shared_bytes_(shared_bytes) {}

  template <typename... KernelArgs, typename... Args>
  void operator()(void (*kernel)(KernelArgs...), Args&&... args) {
    const std::function<void()> call = [&] { kernel(args...); };
    if (grid_.x * grid_.y * grid_.z == 0) return;
    body = &call;
    const int threads = static_cast<int>(block_.x * block_.y * block_.z);
    block_dim = block_;
    grid_dim = grid_;
    block_index = dim3(0, 0, 0);
    launch_finished = false;
    dynamic_shared_memory.assign(shared_bytes_ + 16, 0);
    block_barrier = Barrier(threads);
    block_end = Barrier(threads, next_block);
    warp_barriers.clear();
    for (int first = 0; first < threads; first += 32) warp_barriers.emplace_back(std::min(32, threads - first));
    warp_slots.assign(warp_barriers.size() * 2 * 32, 0);
    warp_operands.assign(warp_barriers.size() * 2 * 32 * 6, 0);
    warp_rows.assign(warp_barriers.size() * 2 * 32, nullptr);
    std::vector<Fiber> fibers(threads);
    for (int t = 0; t < threads; ++t) {
      Fiber& fiber = fibers[t];
      fiber.stack.reset(new char[kStackBytes]);
      fiber.linear = t;
      fiber.thread = dim3(t % block_.x, (t / block_.x) % block_.y, t / (block_.x * block_.y));
      start_fiber(fiber, kStackBytes);
    }
    for (;;) {
      const long before = progress;
      bool alive = false;
      for (auto& fiber : fibers) {
        if (fiber.done) continue;
        alive = true;
        current = &fiber;
        resume(fiber);
      }
      if (!alive) break;
      if (progress == before) {
        std::fprintf(stderr, "cuda emulator: deadlock in block (%u, %u, %u): the live threads wait at "
                     "barriers that not all of them reach\n", block_index.x, block_index.y, block_index.z);
        std::abort();
      }
    }
    current = nullptr;
    body = nullptr;
  }

 private:
  static constexpr size_t kStackBytes = 64 * 1024;   // the kernels' frames take a few KiB

  dim3 grid_, block_;
  size_t shared_bytes_;
};

}  // namespace emu

#define threadIdx (emu::current->thread)
#define blockIdx (emu::block_index)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::block_barrier.wait(); }

namespace emu {

// The calling lane's warp's set of `per_warp` slots in `slots` for its next exchange of a kind
// (`exchanges` counts them). A warp's exchanges (shuffles, mma operands, ldmatrix rows) post to its
// slots, wait for the warp, then read the others'. Two sets alternate from one exchange to the
// next, so a lane that moves on cannot overwrite a value a slower lane has still to read: it would
// have to pass the next exchange's barrier first, which waits for that lane.
template <typename T>
T* exchange_set(std::vector<T>& slots, long& exchanges, int per_warp) {
  return slots.data() + (2 * (current->linear / 32) + exchanges++ % 2) * per_warp;
}

}  // namespace emu

// Each lane posts its value, waits for the warp, reads its partner's.
template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask, int = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  emu::Fiber& self = *emu::current;
  const int warp = self.linear / 32, lane = self.linear % 32;
  uint64_t* slots = emu::exchange_set(emu::warp_slots, self.shuffles, 32);
  std::memcpy(&slots[lane], &value, sizeof(T));
  emu::warp_barriers[warp].wait();
  T result;
  std::memcpy(&result, &slots[lane ^ lane_mask], sizeof(T));
  return result;
}

// CUDA's device min and max overloads.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }

inline float __expf(float x) { return std::exp(x); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
// A fiber runs until it reaches a barrier, so an update is never interrupted.
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

// Half and bfloat16 as their bits, converted with round-to-nearest-even as CUDA and torch do.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) { return std::bit_cast<float>(static_cast<uint32_t>(b.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u = std::bit_cast<uint32_t>(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40)};   // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}

inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }

namespace emu {

// mma.sync m16n8k16 (csrc/sm80.cuh's layouts): each lane posts its a and b registers, the warp
// meets, and each lane computes its 4 elements of D from the whole A and B in fp32.
template <typename T>
void warp_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  Fiber& self = *current;
  const int warp = self.linear / 32, lane = self.linear % 32;
  uint32_t* set = exchange_set(warp_operands, self.products, 32 * 6);
  std::copy(a, a + 4, set + lane * 6);
  std::copy(b, b + 2, set + lane * 6 + 4);
  warp_barriers[warp].wait();
  auto value = [](uint32_t reg, int high) {
    T x;
    x.bits = static_cast<uint16_t>(high ? reg >> 16 : reg & 0xffffu);
    if constexpr (sizeof(T) == 2 && std::is_same_v<T, __half>) return __half2float(x);
    else return __bfloat162float(x);
  };
  // A[row][k] lives with lane (row % 8) * 4 + (k % 8) / 2, register row / 8 + 2 * (k / 8);
  // B[k][col] with lane col * 4 + (k % 8) / 2, register k / 8; the low half holds the even k.
  auto a_at = [&](int row, int k) {
    return value(set[((row % 8) * 4 + (k % 8) / 2) * 6 + row / 8 + 2 * (k / 8)], k % 2);
  };
  auto b_at = [&](int k, int col) { return value(set[(col * 4 + (k % 8) / 2) * 6 + 4 + k / 8], k % 2); };
  const int g = lane / 4, c = 2 * (lane % 4);
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = c + e % 2;
    float sum = d[e];
    for (int k = 0; k < 16; ++k) sum += a_at(row, k) * b_at(k, col);
    d[e] = sum;
  }
}

// ldmatrix (csrc/sm80.cuh): each lane posts its row address, the warp meets, and each lane reads
// its two values of each matrix from the rows the others gave.
template <int kMatrices, bool kTranspose>
void warp_ldmatrix(uint32_t (&r)[kMatrices], const uint16_t* row) {
  Fiber& self = *current;
  const int warp = self.linear / 32, lane = self.linear % 32;
  const uint16_t** rows = exchange_set(warp_rows, self.matrix_loads, 32);
  rows[lane] = row;
  warp_barriers[warp].wait();
  const int g = lane / 4, c = 2 * (lane % 4);
  for (int m = 0; m < kMatrices; ++m) {
    const uint16_t* const* matrix = rows + 8 * m;
    const uint16_t low = kTranspose ? matrix[c][g] : matrix[g][c];
    const uint16_t high = kTranspose ? matrix[c + 1][g] : matrix[g][c + 1];
    r[m] = static_cast<uint32_t>(low) | static_cast<uint32_t>(high) << 16;
  }
}

// cp.async (csrc/sm80.cuh): a copy lands when a wait lets its group go, not when it is issued.
inline void copy_async(void* shared, const void* global, int bytes) {
  current->open_group.push_back({shared, global, bytes});
}
inline void commit_async() {
  current->in_flight.push_back(std::move(current->open_group));
  current->open_group.clear();
}
inline void wait_async(int keep) {
  auto& groups = current->in_flight;
  while (static_cast<int>(groups.size()) > keep) {
    for (const AsyncCopy& copy : groups.front()) {
      std::memcpy(copy.shared, copy.global, copy.bytes);
      std::memset(static_cast<char*>(copy.shared) + copy.bytes, 0, 16 - copy.bytes);
    }
    groups.erase(groups.begin());
  }
}

}  // namespace emu
