// CPU packers: 2:4 CUTLASS (values + reordered meta) and compressed-tensors bitmasks.
// Every packer is multithreaded over rows with at::parallel_for and byte-identical to the
// pure-torch twins in ecoflap_fast/reference/.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <limits>
#include <tuple>
#include <vector>

#include "../common.h"
#include "../ops.h"

namespace ecoflap {
namespace {

// Zero test on raw storage: floats treat -0.0 as zero (as `x != 0` does), integers compare bits.
template <typename bits_t>
inline bool nonzero_bits(bits_t v, bits_t magnitude_mask) {
  return (v & magnitude_mask) != 0;
}

struct StorageInfo {
  int bytes;
  uint32_t magnitude_mask;
};

StorageInfo storage_info(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return {4, 0x7fffffffu};
    case at::kHalf: return {2, 0x7fffu};
    case at::kBFloat16: return {2, 0x7fffu};
    case at::kChar: return {1, 0xffu};
    case at::kByte: return {1, 0xffu};
    case at::kFloat8_e4m3fn: return {1, 0x7fu};
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", t.scalar_type());
  }
  return {0, 0};
}

// Records the smallest failing flat position seen by any thread.
struct FirstFailure {
  std::atomic<int64_t> pos{std::numeric_limits<int64_t>::max()};
  void note(int64_t p) {
    int64_t cur = pos.load();
    while (p < cur && !pos.compare_exchange_weak(cur, p)) {
    }
  }
  bool failed() const { return pos.load() != std::numeric_limits<int64_t>::max(); }
};

template <typename bits_t, typename meta_t, int QUAD>
void pack_24_cutlass_impl(const at::Tensor& dense, at::Tensor& values, at::Tensor& meta,
                          FirstFailure& bad, bits_t mag) {
  const int64_t m = dense.size(0), k = dense.size(1);
  const int64_t meta_ncols = k / (4 * QUAD);
  const bits_t* src = reinterpret_cast<const bits_t*>(dense.data_ptr());
  bits_t* dst = reinterpret_cast<bits_t*>(values.data_ptr());
  meta_t* out_meta = reinterpret_cast<meta_t*>(meta.data_ptr());
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const bits_t* row = src + r * k;
      bits_t* vrow = dst + r * (k / 2);
      for (int64_t c = 0; c < meta_ncols; ++c) {
        uint32_t word = 0;
        for (int j = 0; j < QUAD; ++j) {
          const int64_t g = c * QUAD + j;
          const bits_t* q = row + 4 * g;
          unsigned pattern = 0;
          for (int i = 0; i < 4; ++i) pattern |= unsigned(nonzero_bits<bits_t>(q[i], mag)) << i;
          uint8_t nib = cutlass_nibble(pattern);
          if (nib == 0xFF) {
            bad.note(r * k + 4 * g);
            nib = 0xE;
          }
          vrow[2 * g] = q[nib & 3];
          vrow[2 * g + 1] = q[nib >> 2];
          word |= uint32_t(nib) << (4 * j);
        }
        out_meta[cutlass_meta_offset(r, c, m, sizeof(meta_t))] = static_cast<meta_t>(word);
      }
    }
  });
}

template <typename bits_t, typename meta_t, int QUAD>
void unpack_24_cutlass_impl(const at::Tensor& values, const at::Tensor& meta, at::Tensor& dense) {
  const int64_t m = values.size(0), k = values.size(1) * 2;
  const int64_t meta_ncols = meta.size(1);
  const bits_t* src = reinterpret_cast<const bits_t*>(values.data_ptr());
  const meta_t* in_meta = reinterpret_cast<const meta_t*>(meta.data_ptr());
  bits_t* dst = reinterpret_cast<bits_t*>(dense.data_ptr());
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      bits_t* row = dst + r * k;
      const bits_t* vrow = src + r * (k / 2);
      for (int64_t c = 0; c < meta_ncols; ++c) {
        const uint32_t word = static_cast<uint32_t>(
            static_cast<std::make_unsigned_t<meta_t>>(in_meta[cutlass_meta_offset(r, c, m, sizeof(meta_t))]));
        for (int j = 0; j < QUAD; ++j) {
          const int64_t g = c * QUAD + j;
          const unsigned nib = (word >> (4 * j)) & 0xF;
          row[4 * g + (nib & 3)] = vrow[2 * g];
          row[4 * g + (nib >> 2)] = vrow[2 * g + 1];
        }
      }
    }
  });
}

// Which positions of a row the bitmask keeps: every non-zero (unstructured), or for n:m the
// non-zeros of each group of m plus its lowest-index zeros until exactly n are kept.
template <typename bits_t>
int64_t row_keep_mask(const bits_t* row, int64_t cols, int64_t n, int64_t m, bits_t mag,
                      uint8_t* keep, int64_t* bad_col) {
  int64_t kept = 0;
  if (m == 0) {
    for (int64_t c = 0; c < cols; ++c) {
      keep[c] = nonzero_bits<bits_t>(row[c], mag);
      kept += keep[c];
    }
    return kept;
  }
  for (int64_t g = 0; g < cols; g += m) {
    int64_t nz = 0;
    for (int64_t i = 0; i < m; ++i) nz += nonzero_bits<bits_t>(row[g + i], mag);
    if (nz > n && *bad_col < 0) *bad_col = g;
    int64_t fill = n - nz;
    for (int64_t i = 0; i < m; ++i) {
      const bool is_nz = nonzero_bits<bits_t>(row[g + i], mag);
      bool k = is_nz;
      if (!is_nz && fill > 0) {
        k = true;
        --fill;
      }
      keep[g + i] = k;
      kept += k;
    }
  }
  return kept;
}

template <typename bits_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_bitmask_impl(const at::Tensor& dense, int64_t n,
                                                                  int64_t m, bits_t mag) {
  const int64_t rows = dense.size(0), cols = dense.size(1);
  const int64_t nbytes = (cols + 7) / 8;
  const bits_t* src = reinterpret_cast<const bits_t*>(dense.data_ptr());
  auto bitmask = at::empty({rows, nbytes}, dense.options().dtype(at::kByte));
  auto counts = at::empty({rows}, dense.options().dtype(at::kLong));
  uint8_t* bm = bitmask.data_ptr<uint8_t>();
  int64_t* cnt = counts.data_ptr<int64_t>();
  FirstFailure bad;
  // Pass 1: keep flags -> bitmask bytes and per-row counts.
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> keep(cols);
    for (int64_t r = r0; r < r1; ++r) {
      int64_t bad_col = -1;
      cnt[r] = row_keep_mask<bits_t>(src + r * cols, cols, n, m, mag, keep.data(), &bad_col);
      if (bad_col >= 0) bad.note(r * cols + bad_col);
      uint8_t* out = bm + r * nbytes;
      for (int64_t b = 0; b < nbytes; ++b) {
        uint8_t byte = 0;
        const int64_t c0 = b * 8;
        const int64_t c1 = std::min<int64_t>(c0 + 8, cols);
        for (int64_t c = c0; c < c1; ++c) byte |= uint8_t(keep[c]) << (c - c0);
        out[b] = byte;
      }
    }
  });
  if (bad.failed()) {
    const int64_t p = bad.pos.load();
    TORCH_CHECK_VALUE(false, "dense is not ", n, ":", m, " sparse: row ", p / cols, ", columns ",
                      p % cols, "..", p % cols + m - 1, " hold more than ", n, " non-zeros");
  }
  auto row_offsets = at::empty({rows}, counts.options());
  int64_t* off = row_offsets.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    off[r] = total;
    total += cnt[r];
  }
  at::Tensor values;
  if (m == 0) {
    values = at::empty({total}, dense.options());
  } else {
    values = at::empty({rows, cols / m * n}, dense.options());
  }
  bits_t* dst = reinterpret_cast<bits_t*>(values.data_ptr());
  // Pass 2: gather kept values row by row, left to right.
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const bits_t* row = src + r * cols;
      const uint8_t* mrow = bm + r * nbytes;
      bits_t* out = dst + off[r];
      for (int64_t c = 0; c < cols; ++c) {
        if ((mrow[c >> 3] >> (c & 7)) & 1) *out++ = row[c];
      }
    }
  });
  return {values, bitmask, row_offsets};
}

template <typename bits_t>
void unpack_bitmask_impl(const at::Tensor& values, const at::Tensor& bitmask, at::Tensor& dense,
                         FirstFailure& overflow) {
  const int64_t rows = dense.size(0), cols = dense.size(1);
  const int64_t nbytes = bitmask.size(1);
  const uint8_t* bm = bitmask.data_ptr<uint8_t>();
  const int64_t nvalues = values.numel();
  // Row offsets from the popcount of each row's mask.
  std::vector<int64_t> off(rows + 1, 0);
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t c = 0;
      const uint8_t* mrow = bm + r * nbytes;
      for (int64_t b = 0; b < nbytes; ++b) c += __builtin_popcount(mrow[b]);
      off[r + 1] = c;
    }
  });
  for (int64_t r = 0; r < rows; ++r) off[r + 1] += off[r];
  if (off[rows] != nvalues) {
    overflow.note(off[rows]);
    return;
  }
  const bits_t* src = reinterpret_cast<const bits_t*>(values.data_ptr());
  bits_t* dst = reinterpret_cast<bits_t*>(dense.data_ptr());
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* mrow = bm + r * nbytes;
      const bits_t* in = src + off[r];
      bits_t* out = dst + r * cols;
      for (int64_t c = 0; c < cols; ++c) {
        out[c] = ((mrow[c >> 3] >> (c & 7)) & 1) ? *in++ : bits_t(0);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pack_24_cutlass_cpu(const at::Tensor& dense_in) {
  check_pack_24_input(dense_in);
  const auto dense = dense_in.contiguous();
  const int64_t m = dense.size(0), k = dense.size(1);
  const bool int8 = dense.scalar_type() == at::kChar;
  auto values = at::empty({m, k / 2}, dense.options());
  FirstFailure bad;
  at::Tensor meta;
  if (int8) {
    meta = at::empty({m, k / 32}, dense.options().dtype(at::kInt));
    pack_24_cutlass_impl<uint8_t, int32_t, 8>(dense, values, meta, bad, 0xff);
  } else {
    meta = at::empty({m, k / 16}, dense.options().dtype(at::kShort));
    pack_24_cutlass_impl<uint16_t, int16_t, 4>(dense, values, meta, bad, 0x7fff);
  }
  if (bad.failed()) {
    const int64_t p = bad.pos.load();
    TORCH_CHECK_VALUE(false, "dense is not 2:4 sparse: row ", p / k, ", columns ", p % k, "..",
                      p % k + 3, " hold more than 2 non-zeros (prune it first; nothing is dropped silently)");
  }
  return {values, meta};
}

at::Tensor unpack_24_cutlass_cpu(const at::Tensor& values_in, const at::Tensor& meta_in) {
  check_unpack_24_input(values_in, meta_in);
  const auto values = values_in.contiguous();
  const auto meta = meta_in.contiguous();
  auto dense = at::zeros({values.size(0), values.size(1) * 2}, values.options());
  if (values.scalar_type() == at::kChar) {
    unpack_24_cutlass_impl<uint8_t, int32_t, 8>(values, meta, dense);
  } else {
    unpack_24_cutlass_impl<uint16_t, int16_t, 4>(values, meta, dense);
  }
  return dense;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_bitmask_cpu(const at::Tensor& dense_in, int64_t n,
                                                                int64_t m) {
  check_pack_bitmask_input(dense_in, n, m);
  const auto dense = dense_in.contiguous();
  const auto info = storage_info(dense);
  switch (info.bytes) {
    case 4: return pack_bitmask_impl<uint32_t>(dense, n, m, info.magnitude_mask);
    case 2: return pack_bitmask_impl<uint16_t>(dense, n, m, static_cast<uint16_t>(info.magnitude_mask));
    default: return pack_bitmask_impl<uint8_t>(dense, n, m, static_cast<uint8_t>(info.magnitude_mask));
  }
}

at::Tensor unpack_bitmask_cpu(const at::Tensor& values_in, const at::Tensor& bitmask_in, int64_t rows,
                              int64_t cols) {
  check_unpack_bitmask_input(values_in, bitmask_in, rows, cols);
  const auto values = values_in.contiguous();
  const auto bitmask = bitmask_in.contiguous();
  auto dense = at::empty({rows, cols}, values.options());
  FirstFailure overflow;
  switch (storage_info(values).bytes) {
    case 4: unpack_bitmask_impl<uint32_t>(values, bitmask, dense, overflow); break;
    case 2: unpack_bitmask_impl<uint16_t>(values, bitmask, dense, overflow); break;
    default: unpack_bitmask_impl<uint8_t>(values, bitmask, dense, overflow); break;
  }
  TORCH_CHECK_VALUE(!overflow.failed(), "values holds ", values.numel(), " elements but bitmask marks ",
                    overflow.pos.load(), " kept positions");
  return dense;
}

}  // namespace ecoflap
