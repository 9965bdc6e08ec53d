// A small SIMT emulation of the CUDA execution model, enough to run csrc/cuda/mira_kernels.cuh as
// host C++ (g++ -std=c++20 -pthread). Include it before the kernel header.
//
// Model:
//   * a launch creates blockDim.x std::threads, one per CUDA thread; they run every block of the
//     grid in turn (block 0, then 1, ...), so blocks never overlap;
//   * __syncthreads() is a std::barrier over the block's threads;
//   * `__shared__` is `static`: one instance per kernel instantiation, shared by the block's threads
//     (blocks run one after another, so per-block storage is exactly that); dynamic shared memory is
//     a per-launch buffer, filled with 0xFF bytes (a NaN pattern) before every block so reads of
//     never-written shared memory show up as NaN in the results;
//   * threadIdx/blockIdx/blockDim/gridDim are thread_local.
// Checked at run time (abort with a message): a __syncthreads that not every thread of the block
// executes (divergent barrier: some thread returned, or synchronised a different number of times);
// reads and writes past the requested dynamic shared memory, or past any global buffer, are caught by
// AddressSanitizer when the driver is built with it (the tests do).
// Built with -fsanitize=thread, races between a block's threads (a missing __syncthreads) are
// reported: the barrier is the only happens-before edge between them.
// Not modelled: warp-synchronous execution (the kernels use no warp intrinsics), races between
// blocks (blocks run in turn), performance, CUDA's math-library ulp errors (host libm is used),
// inline PTX and tensor cores (the kernels use neither).
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <math.h>  // sqrtf, expf, tanhf, sqrt, exp, tanh in the global namespace, as in device code
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

using cudaStream_t = void*;

// 16-bit storage types with the conversions the kernels use (round to nearest even).
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
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);  // IEEE conversion, round to nearest even
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  __nv_bfloat16 h;
  if (std::isnan(v)) {
    h.bits = 0x7FC0;
  } else {
    u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even on the dropped 16 bits
    h.bits = static_cast<uint16_t>(u >> 16);
  }
  return h;
}


namespace emu {

struct BlockState {
  std::barrier<>* barrier = nullptr;
  unsigned char* dyn_smem = nullptr;
  // Fewest __syncthreads any thread of the current block had passed when it left the kernel.
  std::atomic<long> min_exit_syncs{0};
};

inline thread_local BlockState* tl_block = nullptr;
inline thread_local long tl_syncs = 0;

inline unsigned char* dynamic_smem() { return tl_block->dyn_smem; }

inline std::atomic<long> launches{0};
inline std::atomic<long> blocks_run{0};

// Every launch, in order: kernel name, blocks, dynamic shared memory (what the driver reports).
struct LaunchRecord {
  const char* name;
  long blocks, smem;
};
inline std::vector<LaunchRecord> launch_log;
// Plan-only runs record the launches and execute nothing (any problem size, no data).
inline bool plan_only = false;

// Runs kernel(args) over `blocks` blocks of `threads` threads, blocks in turn.
template <typename Arg>
void launch(const char* name, void (*kernel)(Arg), long blocks, unsigned threads, long smem_bytes, const Arg& arg) {
  if (blocks <= 0 || blocks > 0x7fffffffL) {
    std::fprintf(stderr, "emu: launch of %s with %ld blocks (CUDA accepts 1 to 2^31 - 1)\n", name, blocks);
    std::abort();
  }
  if (smem_bytes < 0 || smem_bytes > 48 * 1024) {
    std::fprintf(stderr, "emu: %ld bytes of dynamic shared memory (CUDA default limit is 48 KiB)\n", smem_bytes);
    std::abort();
  }
  launch_log.push_back(LaunchRecord{name, blocks, smem_bytes});
  launches++;
  if (plan_only) return;
  std::barrier<> barrier(threads);
  // Exactly the requested size (ASan sees reads past it); at least one byte so the pointer is valid.
  std::vector<unsigned char> dyn(static_cast<size_t>(smem_bytes > 0 ? smem_bytes : 1));
  BlockState state;
  state.barrier = &barrier;
  state.dyn_smem = dyn.data();
  std::vector<long> syncs(threads, 0);
  auto body = [&](unsigned tid) {
    tl_block = &state;
    threadIdx = dim3(tid);
    blockDim = dim3(threads);
    gridDim = dim3(static_cast<unsigned>(blocks));
    for (long blk = 0; blk < blocks; ++blk) {
      if (tid == 0) {
        std::memset(dyn.data(), 0xFF, dyn.size());
        state.min_exit_syncs = std::numeric_limits<long>::max();
      }
      barrier.arrive_and_wait();  // poison and counters are reset before any thread of the block starts
      blockIdx = dim3(static_cast<unsigned>(blk));
      tl_syncs = 0;
      kernel(arg);
      syncs[tid] = tl_syncs;
      // Published before arriving: a thread released from a barrier phase this arrival completed sees it.
      long seen = state.min_exit_syncs.load();
      while (tl_syncs < seen && !state.min_exit_syncs.compare_exchange_weak(seen, tl_syncs)) {
      }
      barrier.arrive_and_wait();  // block done
      if (tid == 0) {
        for (unsigned i = 1; i < threads; ++i) {
          if (syncs[i] != syncs[0]) {
            std::fprintf(stderr, "emu: divergent __syncthreads in block %ld: thread 0 passed %ld, thread %u %ld\n",
                         blk, syncs[0], i, syncs[i]);
            std::abort();
          }
        }
        blocks_run++;
      }
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) pool.emplace_back(body, t);
  for (auto& th : pool) th.join();
}

}  // namespace emu

// This is the thread's k-th barrier. If some thread left the kernel after fewer than k barriers, its
// exit completed this phase: the block's threads did not all execute this __syncthreads (undefined
// behaviour on a GPU, a hang or a race there). Report it and stop.
inline void __syncthreads() {
  const long k = ++emu::tl_syncs;
  emu::tl_block->barrier->arrive_and_wait();
  const long exited_after = emu::tl_block->min_exit_syncs.load();
  if (exited_after < k) {
    std::fprintf(stderr,
                 "emu: divergent __syncthreads in block %u: thread %u is at barrier %ld, another thread returned "
                 "after %ld\n",
                 blockIdx.x, threadIdx.x, k, exited_after);
    std::abort();
  }
}
