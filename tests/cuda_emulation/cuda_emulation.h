// Just enough of CUDA to run csrc/lsq_update.cuh on a CPU: one std::thread per CUDA thread, blocks
// one after the other, __syncthreads as a block-wide std::barrier, warp shuffles as a 32-thread
// exchange through memory, __shared__ as function-local statics (shared by the block's threads).
// It checks the kernel's indexing, reductions and barrier placement on machines without a GPU
// (a missing barrier shows up as a wrong or varying result, not reliably: a GPU run still rules).
#pragma once

#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define GTP_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim3 threadIdx;
inline thread_local EmuDim3 blockIdx;

struct EmuWarp {
  std::barrier<> bar{32};
  uint64_t slot[32];
};

struct EmuBlock {
  explicit EmuBlock(int threads) : bar(threads) {
    for (int w = 0; w < threads / 32; ++w) warps.emplace_back(new EmuWarp);
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<EmuWarp>> warps;
};
inline EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->bar.arrive_and_wait(); }

template <typename T>
T emu_exchange(T v, int src, bool take) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a wide type");
  EmuWarp& w = *emu_block->warps[threadIdx.x >> 5];
  const int lane = threadIdx.x & 31;
  std::memcpy(&w.slot[lane], &v, sizeof(T));
  w.bar.arrive_and_wait();
  T out = v;
  if (take) std::memcpy(&out, &w.slot[src], sizeof(T));
  w.bar.arrive_and_wait();
  return out;
}

template <typename T>
T __shfl_sync(unsigned, T v, int src) {
  return emu_exchange(v, src & 31, true);
}

template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned off) {
  const int src = static_cast<int>(threadIdx.x & 31) + static_cast<int>(off);
  return emu_exchange(v, src, src < 32);
}

// kernel<<<grid, threads>>>(args), synchronously.
template <typename Kernel, typename Args>
void emu_launch(int grid, int threads, Kernel kernel, const Args& args) {
  for (int b = 0; b < grid; ++b) {
    EmuBlock block(threads);
    emu_block = &block;
    std::vector<std::thread> team;
    team.reserve(threads);
    for (int i = 0; i < threads; ++i) {
      team.emplace_back([&, i, b] {
        threadIdx.x = static_cast<unsigned>(i);
        blockIdx.x = static_cast<unsigned>(b);
        kernel(args);
      });
    }
    for (auto& t : team) t.join();
    emu_block = nullptr;
  }
}
