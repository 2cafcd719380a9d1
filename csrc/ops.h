// Declarations of the ecoflap_fast._C operators and their argument checks.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace ecoflap {

// Argument checks shared by the CPU and CUDA implementations. Each raises a ValueError or
// TypeError whose message names the offending argument; none modifies its inputs.
void check_pack_24_input(const at::Tensor& dense);
void check_unpack_24_input(const at::Tensor& values, const at::Tensor& meta);
void check_pack_bitmask_input(const at::Tensor& dense, int64_t n, int64_t m);
void check_unpack_bitmask_input(const at::Tensor& values, const at::Tensor& bitmask, int64_t rows,
                                int64_t cols);
void check_select_input(const at::Tensor& scores, const c10::optional<at::Tensor>& scaler_row, int64_t k,
                        int64_t n, int64_t m, bool per_matrix);

std::tuple<at::Tensor, at::Tensor> pack_24_cutlass_cpu(const at::Tensor& dense);
at::Tensor unpack_24_cutlass_cpu(const at::Tensor& values, const at::Tensor& meta);
std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_bitmask_cpu(const at::Tensor& dense, int64_t n, int64_t m);
at::Tensor unpack_bitmask_cpu(const at::Tensor& values, const at::Tensor& bitmask, int64_t rows, int64_t cols);
at::Tensor select_mask_cpu(const at::Tensor& scores, const c10::optional<at::Tensor>& scaler_row, bool use_abs,
                           int64_t k, int64_t n, int64_t m, bool per_matrix);
int64_t select_prune_cpu(at::Tensor& weight, const c10::optional<at::Tensor>& scaler_row, int64_t k, int64_t n,
                         int64_t m, bool per_matrix);

}  // namespace ecoflap
