// Raw-pointer launchers of the CUDA packers. No torch headers: `nvcc -c pack_kernels.cu` compiles
// standalone. Element storage is passed as its byte width (1, 2 or 4); every launcher returns the
// launch status (cudaGetLastError) and runs on the given stream.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace ecoflap {
namespace cuda {

// dense [m, k] (2-byte or int8 values) -> values [m, k/2], reordered meta (int16 or int32).
// first_bad: device int64 initialised to INT64_MAX; receives the smallest flat index of a group of
// four holding more than two non-zeros.
cudaError_t pack_24_cutlass(const void* dense, void* values, void* meta, int64_t m, int64_t k, int elem_bytes,
                            int64_t* first_bad, cudaStream_t stream);
cudaError_t unpack_24_cutlass(const void* values, const void* meta, void* dense, int64_t m, int64_t k,
                              int elem_bytes, cudaStream_t stream);

// Bitmask layout of compressed-tensors. keep: [rows, cols] bytes (1 = kept). n:m when m > 0.
cudaError_t bitmask_keep(const void* dense, uint8_t* keep, int64_t rows, int64_t cols, int elem_bytes,
                         uint32_t magnitude_mask, int n, int m, int64_t* first_bad, cudaStream_t stream);
// keep -> bitmask [rows, ceil(cols/8)] and per-row kept counts (row_counts zero-initialised).
cudaError_t bitmask_pack_bits(const uint8_t* keep, uint8_t* bitmask, int64_t* row_counts, int64_t rows,
                              int64_t cols, cudaStream_t stream);
// kept values of each row, left to right, at values + row_offsets[row].
cudaError_t bitmask_gather(const void* dense, const uint8_t* bitmask, const int64_t* row_offsets, void* values,
                           int64_t rows, int64_t cols, int elem_bytes, cudaStream_t stream);
cudaError_t bitmask_row_counts(const uint8_t* bitmask, int64_t* row_counts, int64_t rows, int64_t nbytes,
                               cudaStream_t stream);
// inverse of bitmask_gather: every element of dense is written (zero where the bit is clear).
cudaError_t bitmask_scatter(const void* values, const uint8_t* bitmask, const int64_t* row_offsets, void* dense,
                            int64_t rows, int64_t cols, int elem_bytes, cudaStream_t stream);

}  // namespace cuda
}  // namespace ecoflap
