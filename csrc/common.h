// Shared helpers for the CPU and CUDA sources of ecoflap_fast._C.
// Kept free of torch headers so that device code can include it.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ECOFLAP_HD __host__ __device__ __forceinline__
#else
#define ECOFLAP_HD inline
#endif

namespace ecoflap {

// Map an fp32 score to a uint32 whose unsigned order is the float order, with -0.0 folded
// onto +0.0 so that the two zeros tie exactly as they do in torch.sort.
ECOFLAP_HD uint32_t score_key(uint32_t bits) {
  if (bits == 0x80000000u) bits = 0u;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// CUTLASS 2:4 metadata nibble for a group of four values, indexed by the group's non-zero
// pattern (bit i set = value i is non-zero). Low two bits: index of the first kept value,
// high two bits: index of the second. Groups with fewer than two non-zeros keep the zero
// positions PyTorch's converter keeps. Entries with more than two non-zeros are invalid (0xFF).
// This is the encoding documented in torch/sparse/_semi_structured_conversions.py.
ECOFLAP_HD uint8_t cutlass_nibble(unsigned pattern) {
  // pattern:        0     1     2     3     4     5     6     7
  //                 8     9    10    11    12    13    14    15
  constexpr uint8_t kInvalid = 0xFF;
  switch (pattern & 0xF) {
    case 0x0: return 0xE;  // ----      -> (2, 3)
    case 0x1: return 0x8;  // x---      -> (0, 2)
    case 0x2: return 0x9;  // -x--      -> (1, 2)
    case 0x3: return 0x4;  // xx--      -> (0, 1)
    case 0x4: return 0xE;  // --x-      -> (2, 3)
    case 0x5: return 0x8;  // x-x-      -> (0, 2)
    case 0x6: return 0x9;  // -xx-      -> (1, 2)
    case 0x8: return 0xE;  // ---x      -> (2, 3)
    case 0x9: return 0xC;  // x--x      -> (0, 3)
    case 0xA: return 0xD;  // -x-x      -> (1, 3)
    case 0xC: return 0xE;  // --xx      -> (2, 3)
    default: return kInvalid;
  }
}

// Flat offset of meta element (row, col) of an m x meta_ncols metadata matrix inside the
// reordered (ColumnMajorInterleaved<2>, 2x2-swizzled) layout CUTLASS's sparse GEMM reads.
// meta_bytes is 2 (int16 meta, fp16/bf16 values) or 4 (int32 meta, int8 values).
ECOFLAP_HD int64_t cutlass_meta_offset(int64_t row, int64_t col, int64_t m, int meta_bytes) {
  const int64_t group = meta_bytes == 2 ? 32 : 16;
  const int64_t interweave = meta_bytes == 2 ? 4 : 2;
  int64_t r = row / group * group + (row % 8) * interweave + (row % group) / 8;
  int64_t c = col;
  if ((r % 2 == 0) && (c % 2 == 1)) {
    ++r;
    --c;
  } else if ((r % 2 == 1) && (c % 2 == 0)) {
    --r;
    ++c;
  }
  return (c / 2) * m * 2 + r * 2 + (c % 2);
}

}  // namespace ecoflap
