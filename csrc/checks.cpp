// Argument checks of every operator: loud, naming the argument, never touching the data.
#include "ops.h"

namespace ecoflap {

namespace {
bool is_16bit_float(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}
}  // namespace

void check_pack_24_input(const at::Tensor& dense) {
  TORCH_CHECK_VALUE(dense.dim() == 2, "dense must be 2-D, got ", dense.dim(), "-D");
  TORCH_CHECK_TYPE(is_16bit_float(dense) || dense.scalar_type() == at::kChar,
                   "dense must be float16, bfloat16 or int8 for the CUTLASS 2:4 layout, got ",
                   dense.scalar_type());
  const bool int8 = dense.scalar_type() == at::kChar;
  // The reordered meta interleaves pairs of meta columns, so their count must be even:
  // columns a multiple of 2 * 4 * (nibbles per meta element).
  const int64_t row_mult = int8 ? 16 : 32, col_mult = int8 ? 64 : 32;
  TORCH_CHECK_VALUE(dense.size(0) % row_mult == 0, "dense has ", dense.size(0),
                    " rows; the CUTLASS 2:4 layout needs a multiple of ", row_mult);
  TORCH_CHECK_VALUE(dense.size(1) % col_mult == 0, "dense has ", dense.size(1),
                    " columns; the CUTLASS 2:4 layout needs a multiple of ", col_mult);
}

void check_unpack_24_input(const at::Tensor& values, const at::Tensor& meta) {
  TORCH_CHECK_VALUE(values.dim() == 2, "values must be 2-D, got ", values.dim(), "-D");
  TORCH_CHECK_VALUE(meta.dim() == 2, "meta must be 2-D, got ", meta.dim(), "-D");
  TORCH_CHECK_VALUE(values.device() == meta.device(), "values is on ", values.device(), " but meta is on ",
                    meta.device());
  const bool int8 = values.scalar_type() == at::kChar;
  TORCH_CHECK_TYPE(is_16bit_float(values) || int8, "values must be float16, bfloat16 or int8, got ",
                   values.scalar_type());
  const auto want_meta = int8 ? at::kInt : at::kShort;
  TORCH_CHECK_TYPE(meta.scalar_type() == want_meta, "meta must be ", want_meta, " for ", values.scalar_type(),
                   " values, got ", meta.scalar_type());
  const int64_t per_meta = int8 ? 16 : 8;  // packed values described by one meta element
  TORCH_CHECK_VALUE(meta.size(0) == values.size(0) && meta.size(1) * per_meta == values.size(1),
                    "meta has shape ", meta.sizes(), ", which does not describe values of shape ", values.sizes());
  const int64_t row_mult = int8 ? 16 : 32;
  TORCH_CHECK_VALUE(values.size(0) % row_mult == 0, "values has ", values.size(0),
                    " rows; the CUTLASS 2:4 layout needs a multiple of ", row_mult);
  TORCH_CHECK_VALUE(meta.size(1) % 2 == 0, "meta has ", meta.size(1),
                    " columns; the CUTLASS 2:4 layout needs an even number");
}

void check_pack_bitmask_input(const at::Tensor& dense, int64_t n, int64_t m) {
  TORCH_CHECK_VALUE(dense.dim() == 2, "dense must be 2-D, got ", dense.dim(), "-D");
  const auto st = dense.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kChar ||
                       st == at::kByte || st == at::kFloat8_e4m3fn,
                   "dense has unsupported dtype ", st, " for bitmask packing");
  if (m != 0) {
    TORCH_CHECK_VALUE(n >= 1 && n <= m && m <= 32, "nm must satisfy 1 <= n <= m <= 32, got ", n, ":", m);
    TORCH_CHECK_VALUE(dense.size(1) % m == 0, "nm=", n, ":", m, " needs the width of dense (", dense.size(1),
                      ") to be a multiple of ", m);
  }
}

void check_unpack_bitmask_input(const at::Tensor& values, const at::Tensor& bitmask, int64_t rows,
                                int64_t cols) {
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, "shape must be non-negative, got (", rows, ", ", cols, ")");
  TORCH_CHECK_TYPE(bitmask.scalar_type() == at::kByte, "bitmask must be uint8, got ", bitmask.scalar_type());
  TORCH_CHECK_VALUE(bitmask.dim() == 2 && bitmask.size(0) == rows && bitmask.size(1) == (cols + 7) / 8,
                    "bitmask has shape ", bitmask.sizes(), "; shape (", rows, ", ", cols, ") needs (", rows, ", ",
                    (cols + 7) / 8, ")");
  TORCH_CHECK_VALUE(values.device() == bitmask.device(), "values is on ", values.device(),
                    " but bitmask is on ", bitmask.device());
}

void check_select_input(const at::Tensor& scores, const c10::optional<at::Tensor>& scaler_row, int64_t k,
                        int64_t n, int64_t m, bool per_matrix) {
  TORCH_CHECK_VALUE(scores.dim() == 2, "weight must be 2-D, got ", scores.dim(), "-D");
  const auto st = scores.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                   "weight must be float32, float16 or bfloat16, got ", st);
  if (scaler_row.has_value()) {
    const auto& s = *scaler_row;
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, "scaler_row must be float32, got ", s.scalar_type());
    TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == scores.size(1), "scaler_row must have shape (",
                      scores.size(1), ",), got ", s.sizes());
    TORCH_CHECK_VALUE(s.device() == scores.device(), "scaler_row is on ", s.device(), " but weight is on ",
                      scores.device());
  }
  if (m != 0) {
    TORCH_CHECK_VALUE(n >= 1 && n <= m && m <= 32, "nm must satisfy 1 <= n <= m <= 32, got ", n, ":", m);
    TORCH_CHECK_VALUE(scores.size(1) % m == 0, "nm=", n, ":", m, " needs in_features (", scores.size(1),
                      ") to be a multiple of ", m);
  } else {
    const int64_t limit = per_matrix ? scores.numel() : scores.size(1);
    TORCH_CHECK_VALUE(k >= 0 && k <= limit, "k=", k, " is outside [0, ", limit, "]");
  }
}

}  // namespace ecoflap
