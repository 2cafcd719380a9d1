// CPU selection: exact per-row / per-matrix k-smallest and n:m masks over fp32 scores
// s_ij = f(W_ij) * sqrt(scaler_row_j), f = |.| (Wanda, magnitude) or identity (caller's scores).
//
// Every rule equals "the first k of a stable ascending sort": each score is mapped to a 64-bit key
// (order-preserving bits of the fp32 score << 32 | index), so keys are unique and ties fall to the
// smaller index. Per row: std::nth_element (O(in), no sort). Per matrix: two-pass radix select on
// the 32-bit score keys, then ties resolved in flat-index order. n:m: rank inside each group.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "../ops.h"

namespace ecoflap {
namespace {

template <typename scalar_t, bool ABS, bool SCALED>
struct ScoreRow {
  const scalar_t* w;
  const float* sqrt_scaler;  // used when SCALED
  // fp32 score, computed exactly like the reference: fp32(|W|), correctly rounded sqrt, one multiply.
  inline float score(int64_t j) const {
    float v = static_cast<float>(w[j]);
    if constexpr (ABS) v = std::fabs(v);
    if constexpr (SCALED) v = v * sqrt_scaler[j];
    return v;
  }
  inline uint32_t key32(int64_t j) const {
    const float s = score(j);
    uint32_t bits;
    std::memcpy(&bits, &s, 4);
    return score_key(bits);
  }
  inline uint64_t key64(int64_t j) const { return (uint64_t(key32(j)) << 32) | uint64_t(j); }
};

// n:m: in each group, an element is selected when fewer than m - n keys of its group are smaller.
template <int M, typename Row, typename Emit>
inline void select_groups(const Row& row, int64_t r, int64_t cols, int64_t m_rt, int64_t drop, Emit& emit) {
  const int64_t m = M > 0 ? M : m_rt;
  uint64_t keys[M > 0 ? M : 32];
  for (int64_t g = 0; g < cols; g += m) {
    for (int64_t i = 0; i < m; ++i) keys[i] = row.key64(g + i);
    for (int64_t i = 0; i < m; ++i) {
      int64_t rank = 0;
      for (int64_t j = 0; j < m; ++j) rank += keys[j] < keys[i];
      if (rank < drop) emit(r, g + i);
    }
  }
}

// Calls emit(row, col) for every selected (pruned) element. Returns how many were selected.
template <typename scalar_t, bool ABS, bool SCALED, typename Emit>
int64_t select(const scalar_t* w, int64_t rows, int64_t cols, const float* sqrt_scaler, int64_t k, int64_t n,
               int64_t m, bool per_matrix, Emit emit) {
  using Row = ScoreRow<scalar_t, ABS, SCALED>;
  auto row_of = [&](int64_t r) { return Row{w + r * cols, sqrt_scaler}; };
  if (m != 0) {
    const int64_t drop = m - n;
    at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const auto row = row_of(r);
        if (m == 4) {
          select_groups<4>(row, r, cols, m, drop, emit);
        } else if (m == 8) {
          select_groups<8>(row, r, cols, m, drop, emit);
        } else {
          select_groups<0>(row, r, cols, m, drop, emit);
        }
      }
    });
    return rows * (cols / m) * drop;
  }
  if (k == 0) return 0;
  if (!per_matrix) {
    // A histogram of the top 11 key bits finds the bucket holding the k-th smallest key; only that
    // bucket's candidates go through nth_element on (key, index) pairs.
    constexpr int kShift = 21, kBins = 1 << (32 - kShift);
    at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
      std::vector<uint32_t> keys(cols);
      std::vector<uint64_t> cand;
      cand.reserve(cols);
      std::vector<int32_t> hist(kBins);
      for (int64_t r = r0; r < r1; ++r) {
        const auto row = row_of(r);
        std::fill(hist.begin(), hist.end(), 0);
        for (int64_t j = 0; j < cols; ++j) {
          keys[j] = row.key32(j);
          ++hist[keys[j] >> kShift];
        }
        int64_t below = 0;
        uint32_t bucket = 0;
        while (below + hist[bucket] < k) below += hist[bucket++];
        cand.clear();
        for (int64_t j = 0; j < cols; ++j)
          if ((keys[j] >> kShift) == bucket) cand.push_back((uint64_t(keys[j]) << 32) | uint64_t(j));
        const int64_t need = k - below;  // 1 <= need <= hist[bucket]
        std::nth_element(cand.begin(), cand.begin() + (need - 1), cand.end());
        const uint64_t kth = cand[need - 1];
        for (int64_t j = 0; j < cols; ++j) {
          const uint32_t b = keys[j] >> kShift;
          if (b < bucket || (b == bucket && ((uint64_t(keys[j]) << 32) | uint64_t(j)) <= kth)) emit(r, j);
        }
      }
    });
    return rows * k;
  }
  // Per matrix: find the k-th smallest 32-bit key T by two 16-bit radix passes.
  const int nthreads = at::get_num_threads();
  auto histogram = [&](auto bucket_of) {
    std::vector<std::vector<int64_t>> local(nthreads, std::vector<int64_t>(65536, 0));
    at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
      auto& h = local[at::get_thread_num()];
      for (int64_t r = r0; r < r1; ++r) {
        const auto row = row_of(r);
        for (int64_t j = 0; j < cols; ++j) {
          const int b = bucket_of(row.key32(j));
          if (b >= 0) ++h[b];
        }
      }
    });
    std::vector<int64_t> h(65536, 0);
    for (const auto& l : local)
      for (int i = 0; i < 65536; ++i) h[i] += l[i];
    return h;
  };
  // Returns the bucket holding the target-th (1-based) element and the count below it.
  auto locate = [](const std::vector<int64_t>& h, int64_t target, int64_t* below) {
    int64_t cum = 0;
    for (int b = 0; b < 65536; ++b) {
      if (cum + h[b] >= target) {
        *below = cum;
        return b;
      }
      cum += h[b];
    }
    *below = cum;
    return 65535;
  };
  int64_t below_hi = 0, below_lo = 0;
  const auto h_hi = histogram([](uint32_t key) { return int(key >> 16); });
  const uint32_t hi = locate(h_hi, k, &below_hi);
  const auto h_lo = histogram([hi](uint32_t key) { return (key >> 16) == hi ? int(key & 0xFFFF) : -1; });
  const uint32_t lo = locate(h_lo, k - below_hi, &below_lo);
  const uint32_t T = (hi << 16) | lo;
  const int64_t ties_needed = k - below_hi - below_lo;  // >= 1 elements equal to T, by flat index
  std::vector<int64_t> eq_before(rows + 1, 0);
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const auto row = row_of(r);
      int64_t c = 0;
      for (int64_t j = 0; j < cols; ++j) c += row.key32(j) == T;
      eq_before[r + 1] = c;
    }
  });
  for (int64_t r = 0; r < rows; ++r) eq_before[r + 1] += eq_before[r];
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const auto row = row_of(r);
      int64_t seen = eq_before[r];
      for (int64_t j = 0; j < cols; ++j) {
        const uint32_t key = row.key32(j);
        if (key < T) {
          emit(r, j);
        } else if (key == T) {
          if (seen < ties_needed) emit(r, j);
          ++seen;
        }
      }
    }
  });
  return k;
}

// Raises ValueError if any element is NaN or Inf: one parallel scan of the exponent bits, done
// before anything is written so a rejected call leaves its inputs untouched.
void check_finite(const at::Tensor& t, const char* name) {
  const int64_t n = t.numel();
  bool bad = false;
  auto scan = [&](auto* p, auto exp_mask) {
    bad = at::parallel_reduce(
        0, n, 1 << 16, false,
        [&](int64_t a, int64_t b, bool acc) {
          bool hit = false;
          for (int64_t i = a; i < b; ++i) hit |= (p[i] & exp_mask) == exp_mask;
          return acc || hit;
        },
        [](bool x, bool y) { return x || y; });
  };
  if (t.element_size() == 4) scan(reinterpret_cast<const uint32_t*>(t.data_ptr()), uint32_t(0x7f800000u));
  else if (t.scalar_type() == at::kHalf) scan(reinterpret_cast<const uint16_t*>(t.data_ptr()), uint16_t(0x7c00u));
  else scan(reinterpret_cast<const uint16_t*>(t.data_ptr()), uint16_t(0x7f80u));
  TORCH_CHECK_VALUE(!bad, name, " contains NaN or Inf");
}

// Calls f(std::integral_constant<bool, use_abs>, std::integral_constant<bool, scaled>).
template <typename F>
void with_score_flags(bool use_abs, bool scaled, F&& f) {
  using T = std::true_type;
  using N = std::false_type;
  if (use_abs && scaled) f(T{}, T{});
  else if (use_abs) f(T{}, N{});
  else if (scaled) f(N{}, T{});
  else f(N{}, N{});
}

std::vector<float> sqrt_of(const c10::optional<at::Tensor>& scaler_row) {
  if (!scaler_row.has_value()) return {};
  const auto s = scaler_row->contiguous();
  const float* p = s.data_ptr<float>();
  std::vector<float> out(s.numel());
  for (int64_t j = 0; j < s.numel(); ++j) out[j] = std::sqrt(p[j]);
  return out;
}

}  // namespace

at::Tensor select_mask_cpu(const at::Tensor& scores_in, const c10::optional<at::Tensor>& scaler_row, bool use_abs,
                           int64_t k, int64_t n, int64_t m, bool per_matrix) {
  check_select_input(scores_in, scaler_row, k, n, m, per_matrix);
  const auto scores = scores_in.contiguous();
  check_finite(scores, use_abs ? "weight" : "scores");
  const int64_t rows = scores.size(0), cols = scores.size(1);
  auto mask = at::zeros({rows, cols}, scores.options().dtype(at::kBool));
  bool* out = mask.data_ptr<bool>();
  const auto sq = sqrt_of(scaler_row);
  const float* sqp = sq.empty() ? nullptr : sq.data();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "select_mask_cpu", [&] {
    auto emit = [&](int64_t r, int64_t j) { out[r * cols + j] = true; };
    with_score_flags(use_abs, sqp != nullptr, [&](auto abs_c, auto scaled_c) {
      select<scalar_t, decltype(abs_c)::value, decltype(scaled_c)::value>(scores.data_ptr<scalar_t>(), rows, cols, sqp,
                                                                          k, n, m, per_matrix, emit);
    });
  });
  return mask;
}

int64_t select_prune_cpu(at::Tensor& weight, const c10::optional<at::Tensor>& scaler_row, int64_t k, int64_t n,
                         int64_t m, bool per_matrix) {
  check_select_input(weight, scaler_row, k, n, m, per_matrix);
  TORCH_CHECK_VALUE(weight.is_contiguous(), "weight must be contiguous for in-place pruning");
  check_finite(weight, "weight");
  const int64_t rows = weight.size(0), cols = weight.size(1);
  const auto sq = sqrt_of(scaler_row);
  const float* sqp = sq.empty() ? nullptr : sq.data();
  int64_t count = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "select_prune_cpu", [&] {
    scalar_t* w = weight.data_ptr<scalar_t>();
    // Safe in place: every path emits only in its last pass over a row (or group), and each
    // element's score is read before that element is written.
    auto emit = [&](int64_t r, int64_t j) { w[r * cols + j] = scalar_t(0); };
    with_score_flags(true, sqp != nullptr, [&](auto abs_c, auto scaled_c) {
      count = select<scalar_t, decltype(abs_c)::value, decltype(scaled_c)::value>(w, rows, cols, sqp, k, n, m,
                                                                                  per_matrix, emit);
    });
  });
  return count;
}

}  // namespace ecoflap
