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
#include <vector>

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

// Mean and max of each of the n rows of x (n, len), and the max's first index when idx is set.
template <typename T>
void row_mean_max(const T* x, int64_t n, int64_t len, T* mean, T* max, int64_t* idx) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * len;
      T best = -std::numeric_limits<T>::infinity();
      int64_t best_chunk = 0;  // the first chunk that holds the max
      double total = 0;
      for (int64_t start = 0; start < len; start += kChunk) {
        const int64_t stop = std::min(start + kChunk, len);
        T s[kLanes] = {}, m[kLanes];
        std::fill(m, m + kLanes, -std::numeric_limits<T>::infinity());
        int64_t i = start;
        for (; i + kLanes <= stop; i += kLanes) {
          for (int64_t j = 0; j < kLanes; ++j) {
            s[j] += row[i + j];
            m[j] = row[i + j] > m[j] ? row[i + j] : m[j];
          }
        }
        for (; i < stop; ++i) {
          s[0] += row[i];
          m[0] = row[i] > m[0] ? row[i] : m[0];
        }
        for (int64_t j = 0; j < kLanes; ++j) total += s[j];
        const T chunk_max = *std::max_element(m, m + kLanes);
        if (chunk_max > best || start == 0) {
          best = chunk_max;
          best_chunk = start;
        }
      }
      mean[r] = static_cast<T>(total / len);
      // a NaN element makes the sum NaN (so does inf - inf): only then look for one
      const T* nan = total != total ? std::find_if(row, row + len, [](T v) { return v != v; })
                                    : row + len;
      if (nan != row + len) {
        max[r] = *nan;
        if (idx) idx[r] = nan - row;
      } else {
        max[r] = best;
        if (idx) idx[r] = std::find(row + best_chunk, row + len, best) - row;
      }
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
    row_mean_max<scalar_t>(x.data_ptr<scalar_t>(), n * c, hw, mean.data_ptr<scalar_t>(),
                           max.data_ptr<scalar_t>(), with_index ? idx.data_ptr<int64_t>() : nullptr);
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

// pooled (N, 2, HW): mean and max over channels of y = x * g.
at::Tensor spatial_pool(const at::Tensor& x, const at::Tensor& g) {
  check(x, "x", 3);
  check(g, "g", 2);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2);
  auto pooled = at::empty({n, 2, hw}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spatial_pool", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* out = pooled.data_ptr<scalar_t>();
    for_tiles(n, hw, [&](int64_t b, int64_t, int64_t p0, int64_t p1) {
      scalar_t* sum = out + b * 2 * hw + p0;
      scalar_t* max = sum + hw;
      const int64_t len = p1 - p0;
      std::fill(sum, sum + len, scalar_t(0));
      std::fill(max, max + len, -std::numeric_limits<scalar_t>::infinity());
      for (int64_t ch = 0; ch < c; ++ch) {
        const scalar_t w = gp[b * c + ch];
        const scalar_t* row = xp + (b * c + ch) * hw + p0;
        for (int64_t i = 0; i < len; ++i) {
          const scalar_t v = row[i] * w;
          sum[i] += v;
          max[i] = beats(v, max[i]) ? v : max[i];
        }
      }
      for (int64_t i = 0; i < len; ++i) sum[i] /= static_cast<scalar_t>(c);
    });
  });
  return pooled;
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

constexpr int64_t kBlockX = 32;  // output columns kept in registers by correlate_add

// src (H, W) copied into a zero border of r = k / 2 (and kBlockX spare columns), row length ld.
template <typename T>
std::vector<T> padded(const T* src, int64_t h, int64_t wd, int64_t r, int64_t ld) {
  std::vector<T> out((h + 2 * r) * ld, T(0));
  for (int64_t y = 0; y < h; ++y) std::copy(src + y * wd, src + (y + 1) * wd, out.data() + (y + r) * ld + r);
  return out;
}

// dst (H, W) += src (H, W) correlated with the k x k kernel w, zero-padded to keep the size;
// with flip, w turned by 180 degrees (the correlation's adjoint).
template <typename T>
void correlate_add(const T* src, const T* w, int64_t k, bool flip, int64_t h, int64_t wd, T* dst) {
  const int64_t r = k / 2, ld = wd + 2 * r + kBlockX;
  const std::vector<T> pad = padded(src, h, wd, r, ld);
  std::vector<T> taps(w, w + k * k);
  if (flip) std::reverse(taps.begin(), taps.end());
  for (int64_t y = 0; y < h; ++y) {
    for (int64_t x0 = 0; x0 < wd; x0 += kBlockX) {
      T acc[kBlockX] = {};
      for (int64_t ky = 0; ky < k; ++ky) {
        const T* in = pad.data() + (y + ky) * ld + x0;
        for (int64_t kx = 0; kx < k; ++kx) {
          const T v = taps[ky * k + kx];
          for (int64_t j = 0; j < kBlockX; ++j) acc[j] += v * in[kx + j];
        }
      }
      T* out = dst + y * wd + x0;
      for (int64_t j = 0; j < std::min(kBlockX, wd - x0); ++j) out[j] += acc[j];
    }
  }
}

// The 2 -> 1 k x k convolution of the pooled map (N, 2, H, W), without bias: (N, 1, H, W).
at::Tensor spatial_conv(const at::Tensor& pooled, const at::Tensor& weight) {
  check(pooled, "pooled", 4);
  check(weight, "weight", 4);
  TORCH_CHECK(pooled.size(1) == 2 && weight.size(0) == 1 && weight.size(1) == 2,
              "expected a (N, 2, H, W) map and a (1, 2, k, k) weight");
  const int64_t n = pooled.size(0), h = pooled.size(2), wd = pooled.size(3), k = weight.size(3);
  auto out = at::zeros({n, 1, h, wd}, pooled.options());
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "spatial_conv", [&] {
    const scalar_t* src = pooled.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t ch = 0; ch < 2; ++ch) {
          correlate_add(src + (b * 2 + ch) * h * wd, w + ch * k * k, k, false, h, wd, dst + b * h * wd);
        }
      }
    });
  });
  return out;
}

// Gradients of spatial_conv for d_out (N, 1, H, W): the pooled map's and the weight's.
std::tuple<at::Tensor, at::Tensor> spatial_conv_backward(const at::Tensor& d_out,
                                                         const at::Tensor& pooled,
                                                         const at::Tensor& weight) {
  check(d_out, "d_out", 4);
  check(pooled, "pooled", 4);
  check(weight, "weight", 4);
  const int64_t n = pooled.size(0), h = pooled.size(2), wd = pooled.size(3), k = weight.size(3);
  const int64_t r = k / 2;
  auto d_pooled = at::zeros_like(pooled);
  auto d_weight = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "spatial_conv_backward", [&] {
    const scalar_t* dz = d_out.data_ptr<scalar_t>();
    const scalar_t* src = pooled.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* dp = d_pooled.data_ptr<scalar_t>();
    at::parallel_for(0, n * 2, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        correlate_add(dz + (t / 2) * h * wd, w + (t % 2) * k * k, k, true, h, wd, dp + t * h * wd);
      }
    });
    // dw[ch, ky, kx] = sum over n, y, x of pooled[n, ch, y + ky - r, x + kx - r] dz[n, y, x],
    // summed per (n, ch) over blocks of kBlockX columns, kept per tap and column
    auto per_map = at::empty({n, 2, k * k}, pooled.options().dtype(at::kDouble));
    double* pm = per_map.data_ptr<double>();
    at::parallel_for(0, n * 2, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t ld = wd + 2 * r + kBlockX, ldz = wd + kBlockX;
        const std::vector<scalar_t> pad = padded(src + t * h * wd, h, wd, r, ld);
        const std::vector<scalar_t> grad = padded(dz + (t / 2) * h * wd, h, wd, int64_t(0), ldz);
        std::vector<scalar_t> acc(k * k * kBlockX, scalar_t(0));
        for (int64_t y = 0; y < h; ++y) {
          for (int64_t x0 = 0; x0 < wd; x0 += kBlockX) {
            const scalar_t* g = grad.data() + y * ldz + x0;
            for (int64_t ky = 0; ky < k; ++ky) {
              const scalar_t* in = pad.data() + (y + ky) * ld + x0;
              for (int64_t kx = 0; kx < k; ++kx) {
                scalar_t* a = acc.data() + (ky * k + kx) * kBlockX;
                for (int64_t j = 0; j < kBlockX; ++j) a[j] += in[kx + j] * g[j];
              }
            }
          }
        }
        for (int64_t tap = 0; tap < k * k; ++tap) {
          double total = 0;
          for (int64_t j = 0; j < kBlockX; ++j) total += acc[tap * kBlockX + j];
          pm[t * k * k + tap] = total;
        }
      }
    });
    d_weight.copy_(per_map.sum(0).view_as(weight));
  });
  return {d_pooled, d_weight};
}

}  // namespace

TORCH_LIBRARY(smp_cbam, m) {
  m.def("channel_pool", &channel_pool);
  m.def("spatial_pool", &spatial_pool);
  m.def("scale", &scale);
  m.def("gate_grads", &gate_grads);
  m.def("pool_gate_grad", &pool_gate_grad);
  m.def("input_grad", &input_grad);
  m.def("spatial_conv", &spatial_conv);
  m.def("spatial_conv_backward", &spatial_conv_backward);
}
