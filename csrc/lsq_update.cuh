// CUDA side of the K3 least-squares update: one thread block per pursuit, free of torch headers.
//
// The control flow is gtp::update_pursuit (lsq_update_core.h), shared with the CPU op; this file
// provides the block team: barriers, all-reduces through shared memory, and tiled triangular solves
// (32-row tiles: the off-diagonal part of each tile is a coalesced block-wide GEMV, the 32x32
// diagonal triangle is solved by one warp with shuffles, two barriers per tile).
#pragma once

// GTP_CUDA_EMULATION: tests/cuda_emulation/ compiles this file with a host compiler, threads standing in
// for the block (see there); everything else builds it with nvcc.
#if !defined(GTP_CUDA_EMULATION)
#include <cuda_runtime.h>
#endif

#include "lsq_update_core.h"

namespace gtp {

#ifndef GTP_LSQ_THREADS
#define GTP_LSQ_THREADS 512  // 16 warps per pursuit; the CPU emulation test also builds it with 64
#endif
constexpr int kLsqThreads = GTP_LSQ_THREADS;
static_assert(kLsqThreads % 32 == 0 && kLsqThreads >= 64 && kLsqThreads <= 1024, "whole warps");
constexpr int kTile = 32;
constexpr int kWarps = kLsqThreads / 32;

template <typename T>
struct BlockShared {
  T red[kWarps];
  int64_t red_idx[kWarps];
  T red_out;
  int64_t idx_out;
  T tile[kTile][kTile + 1];  // diagonal block of the current tile (padded against bank conflicts)
  T part[kWarps][kTile];     // per-warp partial sums of the transposed solve
  T acc0[kTile];
  T acc1[kTile];
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

template <typename T>
struct BlockTeam {
  BlockShared<T>* sh;

  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return kLsqThreads; }
  __device__ void sync() { __syncthreads(); }

  __device__ T sum(T v) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) sh->red[warp] = v;
    __syncthreads();
    if (warp == 0) {
      T s = lane < kWarps ? sh->red[lane] : T(0);
      s = warp_sum(s);
      if (lane == 0) sh->red_out = s;
    }
    __syncthreads();
    const T out = sh->red_out;
    __syncthreads();  // red_out may be rewritten by the next reduction
    return out;
  }

  // Smallest value, ties to the smallest index; every thread gets the result.
  __device__ void argmin(T& v, int64_t& i) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const T ov = __shfl_down_sync(0xffffffffu, v, off);
      const int64_t oi = __shfl_down_sync(0xffffffffu, i, off);
      if (ov < v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
      }
    }
    if (lane == 0) {
      sh->red[warp] = v;
      sh->red_idx[warp] = i;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      T bv = sh->red[0];
      int64_t bi = sh->red_idx[0];
      for (int k = 1; k < kWarps; ++k) {
        if (sh->red[k] < bv || (sh->red[k] == bv && sh->red_idx[k] < bi)) {
          bv = sh->red[k];
          bi = sh->red_idx[k];
        }
      }
      sh->red_out = bv;
      sh->idx_out = bi;
    }
    __syncthreads();
    v = sh->red_out;
    i = sh->idx_out;
    __syncthreads();
  }

  __device__ int64_t max_index(int64_t i) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const int64_t o = __shfl_down_sync(0xffffffffu, i, off);
      i = o > i ? o : i;
    }
    if (lane == 0) sh->red_idx[warp] = i;
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t b = sh->red_idx[0];
      for (int k = 1; k < kWarps; ++k) b = sh->red_idx[k] > b ? sh->red_idx[k] : b;
      sh->idx_out = b;
    }
    __syncthreads();
    const int64_t out = sh->idx_out;
    __syncthreads();
    return out;
  }

  // out[r] = ||L[r, :r+1]|| for r < n: one warp per row, lanes along it. Team synchronised on exit.
  __device__ void row_norms(const T* L, int64_t ld, int64_t n, T* out) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int64_t r = warp; r < n; r += kWarps) {
      const T* row = L + r * ld;
      T acc = T(0);
      for (int64_t q = lane; q <= r; q += 32) acc += row[q] * row[q];
      acc = warp_sum(acc);
      if (lane == 0) out[r] = sqrt(acc);
    }
    __syncthreads();
  }

  // Loads the lower triangle of the diagonal block L[s:s+rows, s:s+rows] into shared memory.
  __device__ void load_tile(const T* L, int64_t ld, int64_t s, int rows) {
    for (int e = threadIdx.x; e < kTile * kTile; e += kLsqThreads) {
      const int r = e / kTile, q = e % kTile;
      if (r < rows && q <= r) sh->tile[r][q] = L[(s + r) * ld + s + q];
    }
  }

  // In place: x0 <- L[:n,:n]^{-1} x0 (and x1 when not null). Team synchronised on entry and exit.
  __device__ void lower_solve(const T* L, int64_t ld, int64_t n, T* x0, T* x1) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int64_t s = 0; s < n; s += kTile) {
      const int rows = static_cast<int>(n - s < kTile ? n - s : kTile);
      load_tile(L, ld, s, rows);
      // acc[r] = x[s+r] - L[s+r, :s] . x[:s]; one warp per row, lanes along the row (coalesced),
      // four independent accumulators to keep loads in flight.
      for (int r = warp; r < rows; r += kWarps) {
        const T* row = L + (s + r) * ld;
        T a0[4] = {T(0), T(0), T(0), T(0)};
        T a1[4] = {T(0), T(0), T(0), T(0)};
        int64_t q = lane;
        for (; q + 96 < s; q += 128) {
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const T l = row[q + 32 * k];
            a0[k] += l * x0[q + 32 * k];
            if (x1) a1[k] += l * x1[q + 32 * k];
          }
        }
        for (; q < s; q += 32) {
          const T l = row[q];
          a0[0] += l * x0[q];
          if (x1) a1[0] += l * x1[q];
        }
        T d0 = warp_sum((a0[0] + a0[1]) + (a0[2] + a0[3]));
        T d1 = x1 ? warp_sum((a1[0] + a1[1]) + (a1[2] + a1[3])) : T(0);
        if (lane == 0) {
          sh->acc0[r] = x0[s + r] - d0;
          sh->acc1[r] = x1 ? x1[s + r] - d1 : T(0);
        }
      }
      __syncthreads();
      if (warp == 0) {
        T v0 = lane < rows ? sh->acc0[lane] : T(0);
        T v1 = lane < rows ? sh->acc1[lane] : T(0);
        for (int q = 0; q < rows; ++q) {
          const T d = sh->tile[q][q];
          const T y0 = __shfl_sync(0xffffffffu, v0, q) / d;
          const T y1 = __shfl_sync(0xffffffffu, v1, q) / d;
          if (lane > q && lane < rows) {
            const T l = sh->tile[lane][q];
            v0 -= l * y0;
            v1 -= l * y1;
          }
          if (lane == q) {
            v0 = y0;
            v1 = y1;
          }
        }
        if (lane < rows) {
          x0[s + lane] = v0;
          if (x1) x1[s + lane] = v1;
        }
      }
      __syncthreads();
    }
  }

  // In place: x <- L[:n,:n]^{-T} x, tiles from the bottom. Team synchronised on entry and exit.
  __device__ void upper_t_solve(const T* L, int64_t ld, int64_t n, T* x) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (n <= 0) return;
    const int64_t last_start = ((n - 1) / kTile) * kTile;
    for (int64_t s = last_start; s >= 0; s -= kTile) {
      const int rows = static_cast<int>(n - s < kTile ? n - s : kTile);
      const int64_t e = s + rows;
      load_tile(L, ld, s, rows);
      // part[warp][lane] = sum over rows j >= e (strided by warps) of L[j, s+lane] * x[j]; a row
      // segment L[j, s:s+32] is one coalesced load.
      T a[4] = {T(0), T(0), T(0), T(0)};
      if (lane < rows) {
        int64_t j = e + warp;
        for (; j + 3 * kWarps < n; j += 4 * kWarps) {
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const int64_t jj = j + k * kWarps;
            a[k] += L[jj * ld + s + lane] * x[jj];
          }
        }
        for (; j < n; j += kWarps) a[0] += L[j * ld + s + lane] * x[j];
      }
      sh->part[warp][lane] = (a[0] + a[1]) + (a[2] + a[3]);
      __syncthreads();
      if (warp == 0) {
        T v = T(0);
        if (lane < rows) {
          T p = T(0);
#pragma unroll
          for (int k = 0; k < kWarps; ++k) p += sh->part[k][lane];
          v = x[s + lane] - p;
        }
        for (int q = rows - 1; q >= 0; --q) {
          const T zq = __shfl_sync(0xffffffffu, v, q) / sh->tile[q][q];
          if (lane < q) v -= sh->tile[q][lane] * zq;
          if (lane == q) v = zq;
        }
        if (lane < rows) x[s + lane] = v;
      }
      __syncthreads();
    }
  }
};

template <typename T, typename SizeT>
__global__ void __launch_bounds__(kLsqThreads, 1) lsq_update_kernel(LsqArgs<T, SizeT> args) {
  __shared__ BlockShared<T> shared;
  BlockTeam<T> team{&shared};
  update_pursuit(team, args, static_cast<int64_t>(blockIdx.x));
}

}  // namespace gtp
