// CUDA packers: 2:4 CUTLASS layout and compressed-tensors bitmasks, byte-identical to the CPU path
// (csrc/cpu/pack_cpu.cpp) and to the pure-torch twins.
#include "../common.h"
#include "pack_kernels.cuh"

#include <type_traits>

namespace ecoflap {
namespace cuda {
namespace {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

__device__ __forceinline__ void note_bad(int64_t* first_bad, int64_t pos) {
  atomicMin(reinterpret_cast<unsigned long long*>(first_bad), static_cast<unsigned long long>(pos));
}

// One thread per meta element: QUAD groups of four columns (16 or 32 values).
template <typename T, typename MetaT, int QUAD>
__global__ void pack_24_kernel(const T* __restrict__ dense, T* __restrict__ values, MetaT* __restrict__ meta,
                               int64_t m, int64_t k, T magnitude_mask, int64_t* first_bad) {
  const int64_t meta_ncols = k / (4 * QUAD);
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= m * meta_ncols) return;
  const int64_t r = idx / meta_ncols, c = idx % meta_ncols;
  const T* row = dense + r * k;
  T* vrow = values + r * (k / 2);
  uint32_t word = 0;
#pragma unroll
  for (int j = 0; j < QUAD; ++j) {
    const int64_t g = c * QUAD + j;
    const T* q = row + 4 * g;
    T v[4];
    unsigned pattern = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[i] = q[i];
      pattern |= unsigned((v[i] & magnitude_mask) != 0) << i;
    }
    uint8_t nib = cutlass_nibble(pattern);
    if (nib == 0xFF) {
      note_bad(first_bad, r * k + 4 * g);
      nib = 0xE;
    }
    vrow[2 * g] = v[nib & 3];
    vrow[2 * g + 1] = v[nib >> 2];
    word |= uint32_t(nib) << (4 * j);
  }
  meta[cutlass_meta_offset(r, c, m, sizeof(MetaT))] = static_cast<MetaT>(word);
}

template <typename T, typename MetaT, int QUAD>
__global__ void unpack_24_kernel(const T* __restrict__ values, const MetaT* __restrict__ meta, T* __restrict__ dense,
                                 int64_t m, int64_t k) {
  const int64_t meta_ncols = k / (4 * QUAD);
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= m * meta_ncols) return;
  const int64_t r = idx / meta_ncols, c = idx % meta_ncols;
  using UMeta = typename std::conditional<sizeof(MetaT) == 2, uint16_t, uint32_t>::type;
  const uint32_t word = static_cast<UMeta>(meta[cutlass_meta_offset(r, c, m, sizeof(MetaT))]);
  const T* vrow = values + r * (k / 2);
  T* row = dense + r * k;
#pragma unroll
  for (int j = 0; j < QUAD; ++j) {
    const int64_t g = c * QUAD + j;
    const unsigned nib = (word >> (4 * j)) & 0xF;
    T out[4] = {T(0), T(0), T(0), T(0)};
    out[nib & 3] = vrow[2 * g];
    out[nib >> 2] = vrow[2 * g + 1];
#pragma unroll
    for (int i = 0; i < 4; ++i) row[4 * g + i] = out[i];
  }
}

// keep flags: unstructured (m == 0) one thread per element, n:m one thread per group.
template <typename T>
__global__ void keep_kernel(const T* __restrict__ dense, uint8_t* __restrict__ keep, int64_t rows, int64_t cols,
                            T magnitude_mask, int n, int m, int64_t* first_bad) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (m == 0) {
    if (idx < rows * cols) keep[idx] = (dense[idx] & magnitude_mask) != 0;
    return;
  }
  const int64_t groups_per_row = cols / m;
  if (idx >= rows * groups_per_row) return;
  const int64_t r = idx / groups_per_row, g = idx % groups_per_row;
  const int64_t base = r * cols + g * m;
  int nz = 0;
  for (int i = 0; i < m; ++i) nz += (dense[base + i] & magnitude_mask) != 0;
  if (nz > n) note_bad(first_bad, base);
  int fill = n - nz;
  for (int i = 0; i < m; ++i) {
    bool k = (dense[base + i] & magnitude_mask) != 0;
    if (!k && fill > 0) {
      k = true;
      --fill;
    }
    keep[base + i] = k;
  }
}

__global__ void pack_bits_kernel(const uint8_t* __restrict__ keep, uint8_t* __restrict__ bitmask,
                                 int64_t* __restrict__ row_counts, int64_t rows, int64_t cols) {
  const int64_t nbytes = (cols + 7) / 8;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= rows * nbytes) return;
  const int64_t r = idx / nbytes, b = idx % nbytes;
  uint8_t byte = 0;
  for (int i = 0; i < 8; ++i) {
    const int64_t c = b * 8 + i;
    if (c < cols && keep[r * cols + c]) byte |= uint8_t(1u << i);
  }
  bitmask[idx] = byte;
  if (byte) atomicAdd(reinterpret_cast<unsigned long long*>(row_counts + r), (unsigned long long)__popc(byte));
}

// One warp per row, 32 mask bytes at a time; a warp prefix sum of the popcounts places each value.
template <typename T, bool GATHER>
__global__ void rowwise_kernel(const T* __restrict__ src, const uint8_t* __restrict__ bitmask,
                               const int64_t* __restrict__ row_offsets, T* __restrict__ dst, int64_t rows,
                               int64_t cols) {
  const int warps_per_block = blockDim.x / 32;
  const int64_t r = blockIdx.x * static_cast<int64_t>(warps_per_block) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const int64_t nbytes = (cols + 7) / 8;
  const uint8_t* mrow = bitmask + r * nbytes;
  int64_t running = row_offsets[r];
  for (int64_t b0 = 0; b0 < nbytes; b0 += 32) {
    const int64_t b = b0 + lane;
    const uint8_t byte = b < nbytes ? mrow[b] : 0;
    const int cnt = __popc(byte);
    int incl = cnt;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += v;
    }
    int64_t pos = running + incl - cnt;
    if (b < nbytes) {
      for (int i = 0; i < 8; ++i) {
        const int64_t c = b * 8 + i;
        if (c >= cols) break;
        const bool set = (byte >> i) & 1;
        if (GATHER) {
          if (set) dst[pos++] = src[r * cols + c];
        } else {
          dst[r * cols + c] = set ? src[pos++] : T(0);
        }
      }
    }
    running += __shfl_sync(0xffffffffu, incl, 31);
  }
}

__global__ void row_counts_kernel(const uint8_t* __restrict__ bitmask, int64_t* __restrict__ counts, int64_t rows,
                                  int64_t nbytes) {
  const int warps_per_block = blockDim.x / 32;
  const int64_t r = blockIdx.x * static_cast<int64_t>(warps_per_block) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  int64_t c = 0;
  for (int64_t b = lane; b < nbytes; b += 32) c += __popc(bitmask[r * nbytes + b]);
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) c += __shfl_down_sync(0xffffffffu, c, d);
  if (lane == 0) counts[r] = c;
}

template <typename F>
cudaError_t by_width(int elem_bytes, F&& f) {
  switch (elem_bytes) {
    case 1: f(uint8_t{}); break;
    case 2: f(uint16_t{}); break;
    case 4: f(uint32_t{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t pack_24_cutlass(const void* dense, void* values, void* meta, int64_t m, int64_t k, int elem_bytes,
                            int64_t* first_bad, cudaStream_t stream) {
  if (elem_bytes == 2) {
    const int64_t n = m * (k / 16);
    if (n) pack_24_kernel<uint16_t, int16_t, 4><<<blocks_for(n), kThreads, 0, stream>>>(
        static_cast<const uint16_t*>(dense), static_cast<uint16_t*>(values), static_cast<int16_t*>(meta), m, k,
        uint16_t(0x7fff), first_bad);
  } else if (elem_bytes == 1) {
    const int64_t n = m * (k / 32);
    if (n) pack_24_kernel<uint8_t, int32_t, 8><<<blocks_for(n), kThreads, 0, stream>>>(
        static_cast<const uint8_t*>(dense), static_cast<uint8_t*>(values), static_cast<int32_t*>(meta), m, k,
        uint8_t(0xff), first_bad);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t unpack_24_cutlass(const void* values, const void* meta, void* dense, int64_t m, int64_t k,
                              int elem_bytes, cudaStream_t stream) {
  if (elem_bytes == 2) {
    const int64_t n = m * (k / 16);
    if (n) unpack_24_kernel<uint16_t, int16_t, 4><<<blocks_for(n), kThreads, 0, stream>>>(
        static_cast<const uint16_t*>(values), static_cast<const int16_t*>(meta), static_cast<uint16_t*>(dense), m, k);
  } else if (elem_bytes == 1) {
    const int64_t n = m * (k / 32);
    if (n) unpack_24_kernel<uint8_t, int32_t, 8><<<blocks_for(n), kThreads, 0, stream>>>(
        static_cast<const uint8_t*>(values), static_cast<const int32_t*>(meta), static_cast<uint8_t*>(dense), m, k);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t bitmask_keep(const void* dense, uint8_t* keep, int64_t rows, int64_t cols, int elem_bytes,
                         uint32_t magnitude_mask, int n, int m, int64_t* first_bad, cudaStream_t stream) {
  const int64_t work = m == 0 ? rows * cols : rows * (cols / m);
  if (work == 0) return cudaSuccess;
  return by_width(elem_bytes, [&](auto tag) {
    using T = decltype(tag);
    keep_kernel<T><<<blocks_for(work), kThreads, 0, stream>>>(static_cast<const T*>(dense), keep, rows, cols,
                                                               static_cast<T>(magnitude_mask), n, m, first_bad);
  });
}

cudaError_t bitmask_pack_bits(const uint8_t* keep, uint8_t* bitmask, int64_t* row_counts, int64_t rows,
                              int64_t cols, cudaStream_t stream) {
  const int64_t n = rows * ((cols + 7) / 8);
  if (n) pack_bits_kernel<<<blocks_for(n), kThreads, 0, stream>>>(keep, bitmask, row_counts, rows, cols);
  return cudaGetLastError();
}

cudaError_t bitmask_gather(const void* dense, const uint8_t* bitmask, const int64_t* row_offsets, void* values,
                           int64_t rows, int64_t cols, int elem_bytes, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return by_width(elem_bytes, [&](auto tag) {
    using T = decltype(tag);
    rowwise_kernel<T, true><<<blocks_for(rows, kThreads / 32), kThreads, 0, stream>>>(
        static_cast<const T*>(dense), bitmask, row_offsets, static_cast<T*>(values), rows, cols);
  });
}

cudaError_t bitmask_row_counts(const uint8_t* bitmask, int64_t* row_counts, int64_t rows, int64_t nbytes,
                               cudaStream_t stream) {
  if (rows) row_counts_kernel<<<blocks_for(rows, kThreads / 32), kThreads, 0, stream>>>(bitmask, row_counts, rows,
                                                                                         nbytes);
  return cudaGetLastError();
}

cudaError_t bitmask_scatter(const void* values, const uint8_t* bitmask, const int64_t* row_offsets, void* dense,
                            int64_t rows, int64_t cols, int elem_bytes, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return by_width(elem_bytes, [&](auto tag) {
    using T = decltype(tag);
    rowwise_kernel<T, false><<<blocks_for(rows, kThreads / 32), kThreads, 0, stream>>>(
        static_cast<const T*>(values), bitmask, row_offsets, static_cast<T*>(dense), rows, cols);
  });
}

}  // namespace cuda
}  // namespace ecoflap
