// A CUDA emulator for tests: runs the kernels of csrc/cuda/*.cu on the CPU, so that CI, which has
// no GPU, executes them. tests/test_cuda_emulated.py rewrites every `kernel<<<grid, block, smem,
// stream>>>(args)` of a .cu into fastvq_emu::launch(...), adds a fresh_shared call after every
// __shared__ declaration, turns `extern __shared__ T name[];` into a pointer to the block's
// dynamic shared memory, and compiles the file with g++, nvcc's headers on the include path and
// this header force-included (-include).
//
// What it models:
//   - Launches: grid and block checked as the driver checks them (an invalid one sets
//     cudaErrorInvalidConfiguration for cudaGetLastError and runs nothing), and the dynamic
//     shared memory against the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize (48 KiB
//     unless raised by cudaFuncSetAttribute, at most the device's opt-in limit; beyond it,
//     cudaErrorInvalidValue); the blocks run one after another, each to completion, in an order
//     drawn from the seed (set_seed), all before launch returns: a GPU runs them in any order and
//     at once, so a result that hangs on block order (a block reading what another wrote, float
//     atomics from several blocks in a path that claims run-to-run identical bits) changes with
//     the seed here too.
//   - One device, 0, with an H100's SM count and shared-memory limits (set_device changes them),
//     for the attribute and occupancy queries a launch plan makes. Occupancy counts threads and
//     shared memory, not registers.
//   - Threads: every CUDA thread of a block is a fiber (ucontext), all on one OS thread. A fiber
//     runs until it reaches __syncthreads, __syncwarp, a shuffle or a vote, or exits; a barrier
//     opens as soon as the last thread it waits for arrives. The next fiber to run is the first
//     ready one in an order drawn from the seed (set_seed) at the start of the block and at every
//     __syncthreads: the warps shuffled, and the lanes of each warp. One warp thus runs ahead of
//     the others up to the next __syncthreads, and lanes run one after another up to the next
//     warp barrier: a missing barrier lets a thread read a stale or poisoned value, and which one
//     depends on the seed. A run is reproducible.
//   - Barriers: __syncthreads waits for every thread of the block; warp operations for all 32
//     lanes of the warp (full masks only). A barrier that some threads skip by exiting, and a
//     state in which no thread can go on, abort with a message: on a GPU, undefined or a hang.
//   - __shared__ variables become function-local statics, filled with 0xff bytes (NaN, -1) by the
//     first thread of each block to pass their declaration (fresh_shared): shared memory starts
//     every block as undefined as on a GPU, not holding the last block's values. Dynamic shared
//     memory is a fresh allocation of exactly the launch's size per block, 0xff-filled, so that
//     AddressSanitizer catches an access past it.
//   - mma.sync (csrc/cuda/mma_sync.h's functions, which this header defines in place of their
//     PTX): a warp barrier at which each lane computes its elements of d from every lane's operand
//     registers, in the fragment layouts the PTX ISA documents (mma_sync.h restates them), so a
//     kernel that loads a fragment wrongly computes a wrong product here as on a GPU. tf32
//     operands lose their low 13 bits, 16-bit ones are exact; the products are exact in double,
//     added to the accumulator in double and rounded once to float: more accurate than a tensor
//     core, whose fp32 accumulation order and rounding are unspecified, so parity tests here bound
//     the kernel's error from above, not its bits.
//   - Atomics: a plain read-modify-write (fibers never interleave within one). Their order follows
//     the run order, so float sums round differently from one seed to another, as on a GPU.
//   - FMA contraction: nvcc fuses a * b + c by default; the test builds at -O2 with
//     -ffp-contract=fast where the CPU has FMA (else with contraction off), so a kernel whose
//     results hang on where the fusing happens shows, though GCC fuses in places of its own
//     choosing. __fmul_rn is never fused, as on a GPU.
// What it does not model: a memory model (every store is at once visible to every thread: no
// caches, no reordering, no fences); real concurrency (no two threads run at once, so races show
// only through the orders drawn, and atomics never truly collide); memory ordering at shuffles,
// votes, mma.sync and ldmatrix (lanes meet there, so what one lane stored before is seen by the
// others after, where a GPU orders shared memory between lanes only by __syncwarp or
// __syncthreads: deleting leech.cu's __syncwarp after its ballot, or the one ending its row loop,
// still passes the tests); independent thread scheduling,
// partial warp masks and blocks that are not whole warps; streams; constant and texture memory;
// registers; timing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <type_traits>
#include <vector>

// Outside nvcc, the CUDA headers define __shared__ as nothing (an automatic variable of each
// thread) and leave __launch_bounds__ undefined.
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace fastvq_emu {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
// Per thread. The kernels here need a few KiB (leech.cu copies its 3.3 KiB tables argument), and
// AddressSanitizer's redzones grow every frame; its swapcontext clears the shadow of the whole
// stack at every switch, so a larger stack costs time (256 KiB: 1.7x slower).
constexpr size_t kStackBytes = 64 << 10;

struct Fiber {
  enum State { kReady, kAtBlockBarrier, kAtWarpBarrier, kExited };
  ucontext_t context;
  char* stack;  // kStackBytes, above a guard page: an overflow faults instead of corrupting
  uint3 index;  // threadIdx
  State state;
  unsigned exchanges;  // warp exchanges so far: their parity picks the slot (exchange below)
};

// The state of the running launch. One launch at a time, on one OS thread.
inline std::vector<char*> stacks;  // grows to the largest block launched; reused
inline std::vector<Fiber> fibers;  // the threads of the running block
inline std::vector<int> priority;  // fibers, first to run first
inline Fiber* current = nullptr;   // the running fiber; nullptr while the scheduler runs
inline ucontext_t scheduler;
inline uint3 block_index;
inline dim3 grid_size, block_size;
inline const char* kernel_name = "";
inline std::mt19937_64 order_rng;
inline cudaError_t last_error = cudaSuccess;
inline uint64_t lane_values[2][1024];   // two slots per thread: its offer to a shuffle or vote
inline std::vector<const void*> fresh;  // the __shared__ variables poisoned in this block
inline void (*body_call)(void*);        // the kernel call of the running launch, type-erased
inline void* body;
inline void* dynamic_smem = nullptr;  // this block's dynamic shared memory
inline size_t dynamic_smem_bytes = 0;

// The emulated device 0 (an H100 SXM by default) and the kernels' raised shared-memory limits.
struct Device {
  int sms = 132;
  int smem_per_block_optin = 227 << 10;
  int smem_per_sm = 228 << 10;
  int smem_reserved_per_block = 1 << 10;
  int max_threads_per_sm = 2048;
  int max_blocks_per_sm = 32;
};
inline Device device;
constexpr int kDefaultDynamicSmem = 48 << 10;
inline std::vector<std::pair<const void*, int>> max_dynamic_smem;  // per kernel, once raised

inline void set_device(int sms, int smem_per_block_optin) {
  device.sms = sms;
  device.smem_per_block_optin = smem_per_block_optin;
}

inline int dynamic_smem_limit(const void* kernel) {
  for (const auto& [k, bytes] : max_dynamic_smem) {
    if (k == kernel) return bytes;
  }
  return kDefaultDynamicSmem;
}

inline void set_seed(uint64_t seed) { order_rng.seed(seed); }

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "fastvq_emu: %s in kernel %s, block (%u, %u, %u)\n", what, kernel_name,
               block_index.x, block_index.y, block_index.z);
  std::abort();
}

// The block's `extern __shared__ T name[]` (the test's rewrite calls it).
inline void* dynamic_shared() {
  if (dynamic_smem == nullptr) fail("extern __shared__ memory read, but the launch gave 0 bytes");
  return dynamic_smem;
}

inline int linear_index(const Fiber& f) {
  return static_cast<int>(f.index.x + block_size.x * (f.index.y + block_size.y * f.index.z));
}

// The first fiber of f's warp.
inline int warp_first(const Fiber& f) { return linear_index(f) / kWarpSize * kWarpSize; }

inline void fiber_main() {
  body_call(body);
  current->state = Fiber::kExited;  // returning resumes uc_link, the scheduler
}

// Called by a fiber: wait in `state` until the scheduler opens the barrier.
inline void wait_at(Fiber::State state) {
  Fiber* self = current;
  if (self == nullptr) fail("a synchronization outside a kernel");
  self->state = state;
  swapcontext(&self->context, &scheduler);
}

// Called after each __shared__ declaration (the test's rewrite adds the call).
inline void fresh_shared(void* variable, size_t bytes) {
  if (std::find(fresh.begin(), fresh.end(), variable) != fresh.end()) return;
  fresh.push_back(variable);
  std::memset(variable, 0xff, bytes);
}

inline void draw_priority() {
  std::vector<int> warps(fibers.size() / kWarpSize);
  std::iota(warps.begin(), warps.end(), 0);
  std::shuffle(warps.begin(), warps.end(), order_rng);
  priority.clear();
  for (int w : warps) {
    const size_t at = priority.size();
    for (int t = w * kWarpSize; t < (w + 1) * kWarpSize; ++t) priority.push_back(t);
    std::shuffle(priority.begin() + at, priority.end(), order_rng);
  }
}

// After f stopped: open its barrier if f was the last thread it waited for.
inline void open_if_complete(const Fiber& f) {
  const auto open = [](auto first, auto end, Fiber::State state) {
    if (!std::all_of(first, end, [&](const Fiber& g) { return g.state == state; })) return false;
    std::for_each(first, end, [](Fiber& g) { g.state = Fiber::kReady; });
    return true;
  };
  if (f.state == Fiber::kAtWarpBarrier) {
    const int first = warp_first(f);
    open(fibers.begin() + first, fibers.begin() + first + kWarpSize, f.state);
  } else if (f.state == Fiber::kAtBlockBarrier && open(fibers.begin(), fibers.end(), f.state)) {
    draw_priority();
  }
}

// No fiber is ready, and not all have exited: say why the rest wait forever.
[[noreturn]] inline void fail_stuck() {
  int exited = 0, at_block = 0;
  for (const Fiber& f : fibers) {
    exited += f.state == Fiber::kExited;
    at_block += f.state == Fiber::kAtBlockBarrier;
    if (f.state != Fiber::kAtWarpBarrier) continue;
    const int first = warp_first(f);
    for (int t = first; t < first + kWarpSize; ++t) {
      if (fibers[t].state == Fiber::kExited) fail("a warp barrier with lanes that have exited");
    }
  }
  if (at_block + exited == static_cast<int>(fibers.size())) {
    fail("__syncthreads skipped by threads that have exited");
  }
  fail("deadlock: threads at __syncthreads, lanes of their warps at a warp barrier");
}

inline void run_block() {
  for (Fiber& f : fibers) {
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &scheduler;
    makecontext(&f.context, fiber_main, 0);
    f.state = Fiber::kReady;
    f.exchanges = 0;
  }
  fresh.clear();
  if (dynamic_smem_bytes != 0) {
    // Exactly the launch's size, so that AddressSanitizer's redzone starts where it ends.
    if (posix_memalign(&dynamic_smem, 128, dynamic_smem_bytes) != 0) fail("no dynamic smem");
    std::memset(dynamic_smem, 0xff, dynamic_smem_bytes);
  }
  draw_priority();
  for (;;) {
    const auto next = std::find_if(priority.begin(), priority.end(),
                                   [](int t) { return fibers[t].state == Fiber::kReady; });
    if (next == priority.end()) {
      if (std::all_of(fibers.begin(), fibers.end(),
                      [](const Fiber& f) { return f.state == Fiber::kExited; })) {
        std::free(dynamic_smem);  // the block's, now that all its threads have exited
        dynamic_smem = nullptr;
        return;
      }
      fail_stuck();
    }
    current = &fibers[*next];
    swapcontext(&scheduler, &current->context);
    open_if_complete(*current);
    current = nullptr;
  }
}

// Runs `call` (the kernel applied to its arguments) as kernel<<<grid, block, shared_bytes,
// stream>>> would: every block, every thread. `address` is the kernel's, for its attributes.
template <class Call>
void launch(const char* kernel, const void* address, dim3 grid, dim3 block, size_t shared_bytes,
            cudaStream_t stream, Call&& call) {
  (void)stream;  // streams are not modelled: the launch completes here
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535 || threads == 0 || threads > 1024 || block.z > 64) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (shared_bytes > static_cast<size_t>(dynamic_smem_limit(address))) {
    last_error = cudaErrorInvalidValue;
    return;
  }
  kernel_name = kernel;
  dynamic_smem_bytes = shared_bytes;
  if (threads % kWarpSize != 0) fail("a block of a partial warp is not modelled");
  grid_size = grid;
  block_size = block;
  body = &call;
  body_call = [](void* c) { (*static_cast<Call*>(c))(); };
  while (stacks.size() < threads) {
    const size_t page = 4096;
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED || mprotect(p, page, PROT_NONE) != 0) fail("no memory for a stack");
    stacks.push_back(static_cast<char*>(p) + page);
  }
  fibers.assign(threads, {});
  for (uint32_t t = 0; t < threads; ++t) {
    fibers[t].stack = stacks[t];
    fibers[t].index = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
  }
  std::vector<uint3> blocks;
  blocks.reserve(uint64_t{grid.x} * grid.y * grid.z);
  for (uint32_t z = 0; z < grid.z; ++z) {
    for (uint32_t y = 0; y < grid.y; ++y) {
      for (uint32_t x = 0; x < grid.x; ++x) blocks.push_back({x, y, z});
    }
  }
  std::shuffle(blocks.begin(), blocks.end(), order_rng);
  for (const uint3& b : blocks) {
    block_index = b;
    run_block();
  }
}

inline void check_full_mask(unsigned mask, const char* what) {
  if (mask != kFullMask) fail(what);
}

// A warp exchange: every lane offers a value, waits for the others, and reads what it needs.
// Consecutive exchanges use alternate slots: a lane that runs on into the next exchange writes
// the other slot while slower lanes still read this one, and cannot write this one again before
// they have all reached the next barrier, that is, read.
template <class Read>
auto exchange(uint64_t offer, Read&& read) {
  const int self = linear_index(*current);
  uint64_t* slots = lane_values[current->exchanges++ % 2];
  slots[self] = offer;
  wait_at(Fiber::kAtWarpBarrier);
  return read(slots + (self - self % kWarpSize), self % kWarpSize);
}

}  // namespace fastvq_emu

// The built-in variables and device functions the kernels use, by their CUDA names.
#define threadIdx (::fastvq_emu::current->index)
#define blockIdx (::fastvq_emu::block_index)
#define blockDim (::fastvq_emu::block_size)
#define gridDim (::fastvq_emu::grid_size)

extern "C" inline cudaError_t cudaGetLastError() {
  const cudaError_t e = fastvq_emu::last_error;
  fastvq_emu::last_error = cudaSuccess;
  return e;
}

// Device 0 of fastvq_emu::device: the queries and the one function attribute the kernels use.
// Anything else aborts: a kernel needing more needs this emulator extended.
[[noreturn]] inline void host_unmodelled(const char* what) {
  std::fprintf(stderr, "fastvq_emu: %s is not modelled\n", what);
  std::abort();
}

// Every launch has run to completion when it returns, so stream order is program order.
extern "C" inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

extern "C" inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

extern "C" inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  const fastvq_emu::Device& d = fastvq_emu::device;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = d.sms;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = d.smem_per_block_optin;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = d.smem_per_sm;
      return cudaSuccess;
    default:
      host_unmodelled("this cudaDeviceGetAttribute attribute");
  }
}

extern "C" inline cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr,
                                                   int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) {
    host_unmodelled("this cudaFuncSetAttribute attribute");
  }
  if (value < 0 || value > fastvq_emu::device.smem_per_block_optin) return cudaErrorInvalidValue;
  auto& limits = fastvq_emu::max_dynamic_smem;
  std::erase_if(limits, [&](const auto& entry) { return entry.first == func; });
  limits.emplace_back(func, value);
  return cudaSuccess;
}

// Resident blocks per SM as limited by threads, blocks and shared memory (registers unknown).
extern "C" inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks,
                                                                            const void* func,
                                                                            int block_size,
                                                                            size_t dynamic_smem) {
  const fastvq_emu::Device& d = fastvq_emu::device;
  if (block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  *blocks = 0;
  if (dynamic_smem > static_cast<size_t>(fastvq_emu::dynamic_smem_limit(func))) return cudaSuccess;
  const int warps = (block_size + fastvq_emu::kWarpSize - 1) / fastvq_emu::kWarpSize;
  const int by_threads = d.max_threads_per_sm / (warps * fastvq_emu::kWarpSize);
  const int by_smem = static_cast<int>(d.smem_per_sm / (dynamic_smem + d.smem_reserved_per_block));
  *blocks = std::min({by_threads, by_smem, d.max_blocks_per_sm});
  return cudaSuccess;
}

// cuda_runtime.h's C++ overloads for a kernel's address, visible to nvcc only.
template <class T>
cudaError_t cudaFuncSetAttribute(T* func, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(func), attr, value);
}

template <class T>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, T* func, int block_size,
                                                          size_t dynamic_smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, reinterpret_cast<const void*>(func),
                                                       block_size, dynamic_smem);
}

inline void __syncthreads() { fastvq_emu::wait_at(fastvq_emu::Fiber::kAtBlockBarrier); }

inline void __syncwarp(unsigned mask = fastvq_emu::kFullMask) {
  fastvq_emu::check_full_mask(mask, "__syncwarp with a partial mask (not modelled)");
  fastvq_emu::wait_at(fastvq_emu::Fiber::kAtWarpBarrier);
}

template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = fastvq_emu::kWarpSize) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  fastvq_emu::check_full_mask(mask, "__shfl_xor_sync with a partial mask (not modelled)");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = fastvq_emu::exchange(bits, [&](const uint64_t* lanes, int lane) {
    // A source past the lane's own group of `width` lanes yields the lane's own value.
    const int source = lane ^ lane_mask;
    return lanes[source < (lane & -width) + width ? source : lane];
  });
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  fastvq_emu::check_full_mask(mask, "__ballot_sync with a partial mask (not modelled)");
  return fastvq_emu::exchange(predicate != 0, [](const uint64_t* lanes, int) {
    unsigned ballot = 0;
    for (int l = 0; l < fastvq_emu::kWarpSize; ++l) ballot |= static_cast<unsigned>(lanes[l]) << l;
    return ballot;
  });
}

inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
  return __ballot_sync(mask, predicate) == fastvq_emu::kFullMask;
}

template <class T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

template <class T>
T atomicMax(T* address, T value) {
  const T old = *address;
  *address = std::max(old, value);
  return old;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
template <class T>
T __ldg(const T* p) {
  return *p;
}
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
// Never contracted into an FMA: the empty asm hides the product from the optimizer.
inline float __fmul_rn(float a, float b) {
  float p = a * b;
  asm("" : "+m"(p));
  return p;
}
// CUDA's max and min of floating types are fmax and fmin: a NaN operand loses.
inline float max(float a, float b) { return fmaxf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
using std::isfinite;

// --- mma.sync (csrc/cuda/mma_sync.h) ----------------------------------------------------------
// The header's "What it models" says how. mma_sync.h compiles its PTX only without this macro.
#define FASTVQ_EMULATED_PTX 1

namespace fastvq::cuda::ptx {
namespace detail {

// A tensor core's view of a 32-bit operand register: tf32 (S = float) keeps the top 19 bits, a
// 16-bit type is element `half` of the pair (0: the low 16 bits); every product of two is exact
// in double.
template <class S>
double operand(uint32_t reg, int half) {
  if constexpr (std::is_same_v<S, float>) {
    return std::bit_cast<float>(reg & 0xffffe000u);
  } else {
    static_assert(std::is_same_v<S, __half> || std::is_same_v<S, __nv_bfloat16>, "16-bit types");
    const auto bits = static_cast<uint16_t>(reg >> (16 * half));
    if constexpr (std::is_same_v<S, __half>) {
      return __half2float(std::bit_cast<__half>(bits));
    } else {
      return __bfloat162float(std::bit_cast<__nv_bfloat16>(bits));
    }
  }
}

// d += a b over an m16n8kK tile, a warp operation, in mma_sync.h's fragment layouts (K = 16:
// 16-bit pairs; K = 8: tf32). Each lane computes its own 4 elements of d from every lane's a and
// b (read through pointers the lanes exchange) and writes them after all lanes have read.
template <class S, int K>
void mma_m16n8(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct Operands {
    const uint32_t* a;
    const uint32_t* b;
  } mine{a, b};
  float out[4];
  fastvq_emu::exchange(reinterpret_cast<uintptr_t>(&mine), [&](const uint64_t* lanes, int lane) {
    const auto of = [&](int l) { return reinterpret_cast<const Operands*>(lanes[l]); };
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
      double sum = d[e];
      for (int k = 0; k < K; ++k) {
        if constexpr (K == 16) {
          sum += operand<S>(of(row % 8 * 4 + k % 8 / 2)->a[row / 8 + 2 * (k / 8)], k % 2) *
                 operand<S>(of(col * 4 + k % 8 / 2)->b[k / 8], k % 2);
        } else {
          sum += operand<S>(of(row % 8 * 4 + k % 4)->a[row / 8 + 2 * (k / 4)], 0) *
                 operand<S>(of(col * 4 + k % 4)->b[k / 4], 0);
        }
      }
      out[e] = static_cast<float>(sum);
    }
    return 0;
  });
  __syncwarp();
  std::copy(out, out + 4, d);
}

}  // namespace detail

template <class S>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  detail::mma_m16n8<S, 16>(d, a, b);
}

inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  detail::mma_m16n8<float, 8>(d, a, b);
}

// ldmatrix.x4: every lane reads its four words through the row addresses the lanes exchange, all
// before any lane goes on (a warp-synchronous load); a row address off 16 bytes is an error.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) fastvq_emu::fail("ldmatrix: unaligned row");
  uint32_t words[4];
  fastvq_emu::exchange(reinterpret_cast<uintptr_t>(row), [&](const uint64_t* lanes, int lane) {
    for (int j = 0; j < 4; ++j) {
      const auto* p = reinterpret_cast<const unsigned char*>(lanes[8 * j + lane / 4]);
      std::memcpy(&words[j], p + 4 * (lane % 4), 4);
    }
    return 0;
  });
  __syncwarp();
  std::copy(words, words + 4, r);
}

// cvt.rna.tf32.f32: to nearest, ties away from zero; the low 13 bits come out zero.
inline uint32_t to_tf32(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  return std::isfinite(x) ? (bits + 0x1000u) & 0xffffe000u : bits;
}

}  // namespace fastvq::cuda::ptx
