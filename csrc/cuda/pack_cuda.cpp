// CUDA registrations of the packing operators: checks (shared with the CPU path), the current
// stream, raw-pointer launchers from pack_kernels.cu, and a check of every launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../ops.h"
#include "pack_kernels.cuh"

namespace ecoflap {
namespace {

#define ECOFLAP_CHECK_LAUNCH(expr)                                                               \
  do {                                                                                           \
    const cudaError_t err_ = (expr);                                                             \
    TORCH_CHECK(err_ == cudaSuccess, #expr " failed: ", cudaGetErrorString(err_));              \
  } while (0)

uint32_t magnitude_mask(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0x7fffffffu;
    case at::kHalf:
    case at::kBFloat16: return 0x7fffu;
    case at::kFloat8_e4m3fn: return 0x7fu;
    default: return 0xffffffffu;  // integers: every bit counts
  }
}

at::Tensor no_failure(const at::Tensor& like) {
  return at::full({1}, std::numeric_limits<int64_t>::max(), like.options().dtype(at::kLong));
}

std::tuple<at::Tensor, at::Tensor> pack_24_cutlass_cuda(const at::Tensor& dense_in) {
  check_pack_24_input(dense_in);
  const c10::cuda::CUDAGuard guard(dense_in.device());
  const auto dense = dense_in.contiguous();
  const int64_t m = dense.size(0), k = dense.size(1);
  const bool int8 = dense.scalar_type() == at::kChar;
  auto values = at::empty({m, k / 2}, dense.options());
  auto meta = at::empty({m, k / (int8 ? 32 : 16)}, dense.options().dtype(int8 ? at::kInt : at::kShort));
  auto bad = no_failure(dense);
  ECOFLAP_CHECK_LAUNCH(cuda::pack_24_cutlass(dense.data_ptr(), values.data_ptr(), meta.data_ptr(), m, k,
                                             int8 ? 1 : 2, bad.data_ptr<int64_t>(),
                                             c10::cuda::getCurrentCUDAStream()));
  const int64_t p = bad.item<int64_t>();
  TORCH_CHECK_VALUE(p == std::numeric_limits<int64_t>::max(), "dense is not 2:4 sparse: row ", p / k, ", columns ",
                    p % k, "..", p % k + 3, " hold more than 2 non-zeros (prune it first; nothing is dropped silently)");
  return {values, meta};
}

at::Tensor unpack_24_cutlass_cuda(const at::Tensor& values_in, const at::Tensor& meta_in) {
  check_unpack_24_input(values_in, meta_in);
  const c10::cuda::CUDAGuard guard(values_in.device());
  const auto values = values_in.contiguous();
  const auto meta = meta_in.contiguous();
  const int64_t m = values.size(0), k = values.size(1) * 2;
  auto dense = at::empty({m, k}, values.options());
  ECOFLAP_CHECK_LAUNCH(cuda::unpack_24_cutlass(values.data_ptr(), meta.data_ptr(), dense.data_ptr(), m, k,
                                               values.element_size(), c10::cuda::getCurrentCUDAStream()));
  return dense;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_bitmask_cuda(const at::Tensor& dense_in, int64_t n, int64_t m) {
  check_pack_bitmask_input(dense_in, n, m);
  const c10::cuda::CUDAGuard guard(dense_in.device());
  const auto dense = dense_in.contiguous();
  const int64_t rows = dense.size(0), cols = dense.size(1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto keep = at::empty({rows, cols}, dense.options().dtype(at::kByte));
  auto bad = no_failure(dense);
  ECOFLAP_CHECK_LAUNCH(cuda::bitmask_keep(dense.data_ptr(), keep.data_ptr<uint8_t>(), rows, cols,
                                          dense.element_size(), magnitude_mask(dense), n, m,
                                          bad.data_ptr<int64_t>(), stream));
  const int64_t p = bad.item<int64_t>();
  TORCH_CHECK_VALUE(p == std::numeric_limits<int64_t>::max(), "dense is not ", n, ":", m, " sparse: row ",
                    p / cols, ", columns ", p % cols, "..", p % cols + m - 1, " hold more than ", n, " non-zeros");
  auto bitmask = at::empty({rows, (cols + 7) / 8}, keep.options());
  auto counts = at::zeros({rows}, dense.options().dtype(at::kLong));
  ECOFLAP_CHECK_LAUNCH(cuda::bitmask_pack_bits(keep.data_ptr<uint8_t>(), bitmask.data_ptr<uint8_t>(),
                                               counts.data_ptr<int64_t>(), rows, cols, stream));
  auto row_offsets = counts.cumsum(0) - counts;
  const int64_t total = rows ? (row_offsets[rows - 1] + counts[rows - 1]).item<int64_t>() : 0;
  auto values = m == 0 ? at::empty({total}, dense.options()) : at::empty({rows, cols / m * n}, dense.options());
  ECOFLAP_CHECK_LAUNCH(cuda::bitmask_gather(dense.data_ptr(), bitmask.data_ptr<uint8_t>(),
                                            row_offsets.data_ptr<int64_t>(), values.data_ptr(), rows, cols,
                                            dense.element_size(), stream));
  return {values, bitmask, row_offsets};
}

at::Tensor unpack_bitmask_cuda(const at::Tensor& values_in, const at::Tensor& bitmask_in, int64_t rows,
                               int64_t cols) {
  check_unpack_bitmask_input(values_in, bitmask_in, rows, cols);
  const c10::cuda::CUDAGuard guard(values_in.device());
  const auto values = values_in.contiguous();
  const auto bitmask = bitmask_in.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto counts = at::empty({rows}, values.options().dtype(at::kLong));
  ECOFLAP_CHECK_LAUNCH(cuda::bitmask_row_counts(bitmask.data_ptr<uint8_t>(), counts.data_ptr<int64_t>(), rows,
                                                bitmask.size(1), stream));
  auto row_offsets = counts.cumsum(0) - counts;
  const int64_t total = rows ? counts.sum().item<int64_t>() : 0;
  TORCH_CHECK_VALUE(total == values.numel(), "values holds ", values.numel(), " elements but bitmask marks ", total,
                    " kept positions");
  auto dense = at::empty({rows, cols}, values.options());
  ECOFLAP_CHECK_LAUNCH(cuda::bitmask_scatter(values.data_ptr(), bitmask.data_ptr<uint8_t>(),
                                             row_offsets.data_ptr<int64_t>(), dense.data_ptr(), rows, cols,
                                             values.element_size(), stream));
  return dense;
}

}  // namespace
}  // namespace ecoflap

TORCH_LIBRARY_IMPL(ecoflap_fast, CUDA, m) {
  m.impl("pack_24_cutlass", &ecoflap::pack_24_cutlass_cuda);
  m.impl("unpack_24_cutlass", &ecoflap::unpack_24_cutlass_cuda);
  m.impl("pack_bitmask", &ecoflap::pack_bitmask_cuda);
  m.impl("unpack_bitmask", &ecoflap::unpack_bitmask_cuda);
}
