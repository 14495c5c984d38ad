// Fused CPU passes of CBAM over NCHW-contiguous float32/float64 tensors (see smp_cbam/kernels.py).
//
// x is (N, C, HW); g the channel gate (N, C); s the spatial gate (N, HW). Each pass reads its
// full-size operands once; every max returns the first maximal element, NaN counting as maximal,
// as torch.max(dim) does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

namespace {

constexpr int64_t kLanes = 16;    // independent accumulators, so that reductions vectorize
constexpr int64_t kChunk = 1024;  // elements summed in scalar_t before adding to a double
constexpr int64_t kTile = 1024;   // pixels per task in the passes that loop over channels

template <typename T>
inline bool beats(T v, T m) {
  return v > m || (v != v && m == m);
}

void check(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Mean and max of each of the n rows of x (n, len), and the max's first index when Index.
template <typename T, bool Index>
void row_mean_max(const T* x, int64_t n, int64_t len, T* mean, T* max, int64_t* idx) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * len;
      T m[kLanes];
      int64_t at[kLanes] = {};
      std::fill(m, m + kLanes, -std::numeric_limits<T>::infinity());
      double total = 0;
      for (int64_t start = 0; start < len; start += kChunk) {
        const int64_t stop = std::min(start + kChunk, len);
        T s[kLanes] = {};
        int64_t i = start;
        for (; i + kLanes <= stop; i += kLanes) {
          for (int64_t j = 0; j < kLanes; ++j) {
            const T v = row[i + j];
            s[j] += v;
            if (Index) at[j] = v > m[j] ? i + j : at[j];
            m[j] = v > m[j] ? v : m[j];
          }
        }
        for (; i < stop; ++i) {
          s[0] += row[i];
          if (Index) at[0] = row[i] > m[0] ? i : at[0];
          m[0] = row[i] > m[0] ? row[i] : m[0];
        }
        for (int64_t j = 0; j < kLanes; ++j) total += s[j];
      }
      mean[r] = static_cast<T>(total / len);
      // a NaN element makes the sum NaN (so does inf - inf): only then look for one
      const T* nan = total != total ? std::find_if(row, row + len, [](T v) { return v != v; })
                                    : row + len;
      int64_t best = 0;
      for (int64_t j = 1; j < kLanes; ++j) {
        if (m[j] > m[best] || (m[j] == m[best] && at[j] < at[best])) best = j;
      }
      max[r] = nan != row + len ? *nan : m[best];
      if (Index) idx[r] = nan != row + len ? nan - row : at[best];
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_pool(const at::Tensor& x, bool with_index) {
  check(x, "x", 3);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2);
  auto mean = at::empty({n, c}, x.options());
  auto max = at::empty({n, c}, x.options());
  auto idx = with_index ? at::empty({n, c}, x.options().dtype(at::kLong)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_pool", [&] {
    if (with_index) {
      row_mean_max<scalar_t, true>(x.data_ptr<scalar_t>(), n * c, hw, mean.data_ptr<scalar_t>(),
                                   max.data_ptr<scalar_t>(), idx.data_ptr<int64_t>());
    } else {
      row_mean_max<scalar_t, false>(x.data_ptr<scalar_t>(), n * c, hw, mean.data_ptr<scalar_t>(),
                                    max.data_ptr<scalar_t>(), nullptr);
    }
  });
  return {mean, max, idx};
}

// Calls f(b, p0, p1) for every batch item b and tile [p0, p1) of its hw pixels, in parallel.
template <typename F>
void for_tiles(int64_t n, int64_t hw, const F& f) {
  const int64_t tiles = (hw + kTile - 1) / kTile;
  at::parallel_for(0, n * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p0 = (t % tiles) * kTile;
      f(t / tiles, t % tiles, p0, std::min(p0 + kTile, hw));
    }
  });
}

// pooled (N, 2, HW): mean and max over channels of y = x * g; idx (N, HW): the max's channel.
std::tuple<at::Tensor, at::Tensor> spatial_pool(const at::Tensor& x, const at::Tensor& g,
                                                bool with_index) {
  check(x, "x", 3);
  check(g, "g", 2);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2);
  auto pooled = at::empty({n, 2, hw}, x.options());
  auto idx = with_index ? at::empty({n, hw}, x.options().dtype(at::kLong)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spatial_pool", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* out = pooled.data_ptr<scalar_t>();
    int64_t* ip = with_index ? idx.data_ptr<int64_t>() : nullptr;
    for_tiles(n, hw, [&](int64_t b, int64_t, int64_t p0, int64_t p1) {
      scalar_t sum[kTile], max[kTile];
      int64_t arg[kTile];
      const int64_t len = p1 - p0;
      std::fill(sum, sum + len, scalar_t(0));
      std::fill(max, max + len, -std::numeric_limits<scalar_t>::infinity());
      std::fill(arg, arg + len, int64_t(0));
      for (int64_t ch = 0; ch < c; ++ch) {
        const scalar_t w = gp[b * c + ch];
        const scalar_t* row = xp + (b * c + ch) * hw + p0;
        for (int64_t i = 0; i < len; ++i) {
          const scalar_t v = row[i] * w;
          sum[i] += v;
          const bool up = beats(v, max[i]);
          max[i] = up ? v : max[i];
          arg[i] = up ? ch : arg[i];
        }
      }
      scalar_t* mean_out = out + b * 2 * hw + p0;
      scalar_t* max_out = mean_out + hw;
      for (int64_t i = 0; i < len; ++i) {
        mean_out[i] = sum[i] / static_cast<scalar_t>(c);
        max_out[i] = max[i];
      }
      if (ip) std::copy(arg, arg + len, ip + b * hw + p0);
    });
  });
  return {pooled, idx};
}

// out = x * g * s (+ x), rounded as (x * g) * s like the plain formula.
at::Tensor scale(const at::Tensor& x, const at::Tensor& g, const at::Tensor& s, bool residual) {
  check(x, "x", 3);
  check(g, "g", 2);
  check(s, "s", 2);
  const int64_t c = x.size(1), hw = x.size(2);
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scale", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, x.size(0) * c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t w = gp[r];
        const scalar_t* row = xp + r * hw;
        const scalar_t* srow = sp + (r / c) * hw;
        scalar_t* orow = op + r * hw;
        if (residual) {
          for (int64_t i = 0; i < hw; ++i) orow[i] = row[i] * w * srow[i] + row[i];
        } else {
          for (int64_t i = 0; i < hw; ++i) orow[i] = row[i] * w * srow[i];
        }
      }
    });
  });
  return out;
}

// With G = dL/dout: d_s = sum_c G x g (N, HW), d_g = sum_hw G x s (N, C), and the channel of
// max_c x g (N, HW) with x there (N, HW), recomputed here rather than kept from the forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_grads(const at::Tensor& grad,
                                                          const at::Tensor& x, const at::Tensor& g,
                                                          const at::Tensor& s) {
  check(grad, "grad", 3);
  check(x, "x", 3);
  check(g, "g", 2);
  check(s, "s", 2);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2);
  const int64_t tiles = (hw + kTile - 1) / kTile;
  auto d_s = at::empty({n, hw}, x.options());
  auto idx = at::empty({n, hw}, x.options().dtype(at::kLong));
  auto x_at = at::empty({n, hw}, x.options());
  auto d_g_tiles = at::empty({n, tiles, c}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gate_grads", [&] {
    const scalar_t* gr = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* dsp = d_s.data_ptr<scalar_t>();
    int64_t* ip = idx.data_ptr<int64_t>();
    scalar_t* xap = x_at.data_ptr<scalar_t>();
    double* dgp = d_g_tiles.data_ptr<double>();
    for_tiles(n, hw, [&](int64_t b, int64_t tile, int64_t p0, int64_t p1) {
      scalar_t acc[kTile], max[kTile], at[kTile];
      int64_t arg[kTile];
      const int64_t len = p1 - p0;
      std::fill(acc, acc + len, scalar_t(0));
      std::fill(at, at + len, scalar_t(0));
      std::fill(max, max + len, -std::numeric_limits<scalar_t>::infinity());
      std::fill(arg, arg + len, int64_t(0));
      const scalar_t* srow = sp + b * hw + p0;
      for (int64_t ch = 0; ch < c; ++ch) {
        const scalar_t w = gp[b * c + ch];
        const scalar_t* row = xp + (b * c + ch) * hw + p0;
        const scalar_t* grow = gr + (b * c + ch) * hw + p0;
        scalar_t lanes[kLanes] = {};
        int64_t i = 0;
        for (; i + kLanes <= len; i += kLanes) {
          for (int64_t j = 0; j < kLanes; ++j) {
            const scalar_t gx = grow[i + j] * row[i + j];
            lanes[j] += gx * srow[i + j];
            acc[i + j] += gx * w;
            const scalar_t v = row[i + j] * w;
            const bool up = beats(v, max[i + j]);
            max[i + j] = up ? v : max[i + j];
            arg[i + j] = up ? ch : arg[i + j];
            at[i + j] = up ? row[i + j] : at[i + j];
          }
        }
        for (; i < len; ++i) {
          const scalar_t gx = grow[i] * row[i];
          lanes[0] += gx * srow[i];
          acc[i] += gx * w;
          const scalar_t v = row[i] * w;
          const bool up = beats(v, max[i]);
          max[i] = up ? v : max[i];
          arg[i] = up ? ch : arg[i];
          at[i] = up ? row[i] : at[i];
        }
        double total = 0;
        for (int64_t j = 0; j < kLanes; ++j) total += lanes[j];
        dgp[(b * tiles + tile) * c + ch] = total;
      }
      std::copy(acc, acc + len, dsp + b * hw + p0);
      std::copy(arg, arg + len, ip + b * hw + p0);
      std::copy(at, at + len, xap + b * hw + p0);
    });
  });
  return {d_s, d_g_tiles.sum(1).to(x.scalar_type()), idx, x_at};
}

// dL/dg through the pooled map: sum_hw x d_avg / C, plus x_at d_max at each pixel's max channel.
at::Tensor pool_gate_grad(const at::Tensor& x, const at::Tensor& d_pooled, const at::Tensor& idx,
                          const at::Tensor& x_at) {
  check(x, "x", 3);
  check(d_pooled, "d_pooled", 3);
  check(idx, "idx", 2);
  check(x_at, "x_at", 2);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2);
  auto d_g = at::empty({n, c}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pool_gate_grad", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dp = d_pooled.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const scalar_t* xap = x_at.data_ptr<scalar_t>();
    scalar_t* out = d_g.data_ptr<scalar_t>();
    at::parallel_for(0, n * c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * hw;
        const scalar_t* d_avg = dp + (r / c) * 2 * hw;
        double total = 0;
        for (int64_t start = 0; start < hw; start += kChunk) {
          const int64_t stop = std::min(start + kChunk, hw);
          scalar_t lanes[kLanes] = {};
          int64_t i = start;
          for (; i + kLanes <= stop; i += kLanes) {
            for (int64_t j = 0; j < kLanes; ++j) lanes[j] += row[i + j] * d_avg[i + j];
          }
          for (; i < stop; ++i) lanes[0] += row[i] * d_avg[i];
          for (int64_t j = 0; j < kLanes; ++j) total += lanes[j];
        }
        out[r] = static_cast<scalar_t>(total / c);
      }
    });
    for (int64_t b = 0; b < n; ++b) {
      const scalar_t* d_max = dp + (b * 2 + 1) * hw;
      for (int64_t p = 0; p < hw; ++p) {
        out[b * c + ip[b * hw + p]] += xap[b * hw + p] * d_max[p];
      }
    }
  });
  return d_g;
}

// dL/dx = g (G s + d_avg_s / C) + d_avg_c / HW (+ G), then g d_max_s added at each pixel's max
// channel idx_s and d_max_c at each channel's max pixel idx_c.
at::Tensor input_grad(const at::Tensor& grad, const at::Tensor& g, const at::Tensor& s,
                      const at::Tensor& d_pooled, const at::Tensor& idx_s,
                      const at::Tensor& d_avg, const at::Tensor& d_max, const at::Tensor& idx_c,
                      bool residual) {
  check(grad, "grad", 3);
  check(g, "g", 2);
  check(s, "s", 2);
  check(d_pooled, "d_pooled", 3);
  check(idx_s, "idx_s", 2);
  check(d_avg, "d_avg", 2);
  check(d_max, "d_max", 2);
  check(idx_c, "idx_c", 2);
  const int64_t c = grad.size(1), hw = grad.size(2);
  auto dx = at::empty_like(grad);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "input_grad", [&] {
    const scalar_t* gr = grad.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* dp = d_pooled.data_ptr<scalar_t>();
    const int64_t* isp = idx_s.data_ptr<int64_t>();
    const scalar_t* dap = d_avg.data_ptr<scalar_t>();
    const scalar_t* dmp = d_max.data_ptr<scalar_t>();
    const int64_t* icp = idx_c.data_ptr<int64_t>();
    scalar_t* out = dx.data_ptr<scalar_t>();
    const scalar_t inv_c = scalar_t(1) / static_cast<scalar_t>(c);
    at::parallel_for(0, grad.size(0) * c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / c;
        const scalar_t w = gp[r], base = dap[r] / static_cast<scalar_t>(hw);
        const scalar_t* grow = gr + r * hw;
        const scalar_t* srow = sp + b * hw;
        const scalar_t* d_avg_s = dp + b * 2 * hw;
        const scalar_t* d_max_s = d_avg_s + hw;
        scalar_t* orow = out + r * hw;
        for (int64_t i = 0; i < hw; ++i) orow[i] = (grow[i] * srow[i] + d_avg_s[i] * inv_c) * w + base;
        if (residual) {
          for (int64_t i = 0; i < hw; ++i) orow[i] += grow[i];
        }
      }
    });
    for (int64_t b = 0; b < grad.size(0); ++b) {
      const scalar_t* d_max_s = dp + (b * 2 + 1) * hw;
      for (int64_t p = 0; p < hw; ++p) {
        const int64_t ch = isp[b * hw + p];
        out[(b * c + ch) * hw + p] += gp[b * c + ch] * d_max_s[p];
      }
      for (int64_t ch = 0; ch < c; ++ch) out[(b * c + ch) * hw + icp[b * c + ch]] += dmp[b * c + ch];
    }
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY(smp_cbam, m) {
  m.def("channel_pool", &channel_pool);
  m.def("spatial_pool", &spatial_pool);
  m.def("scale", &scale);
  m.def("gate_grads", &gate_grads);
  m.def("pool_gate_grad", &pool_gate_grad);
  m.def("input_grad", &input_grad);
}
