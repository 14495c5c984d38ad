// Fused CPU passes of CBAM over NCHW-contiguous float32/float64/bfloat16 tensors, and its forward
// and backward over channels_last ones too (see smp_cbam/attention/kernels.py).
//
// x is (N, C, HW); g the channel gate (N, C); s the spatial gate (N, HW). Each pass reads its
// full-size operands once; every max returns the first maximal element, NaN counting as maximal,
// as torch.max(dim) does.
//
// The full-size tensors (x, the output, G = dL/dout and dL/dx) are read and written in their own
// dtype T; all arithmetic is in Acc<T> = at::opmath_type<T> (float for bfloat16, T itself for
// float and double), and everything small (pooled descriptors and maps, the gates, the parameters
// and their gradients) is an Acc<T> tensor: autocast's numerics, which keep reductions in float32,
// with each full-size element rounded to bfloat16 once.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 with the Tensor type casters
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
using Acc = at::opmath_type<T>;
template <typename T>
using AccVec = at::vec::Vectorized<Acc<T>>;

// AccVec<T>::size() elements of p, widened to the compute type (exact)
template <typename T>
inline AccVec<T> load_acc(const T* p) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    AccVec<T> out;
    at::vec::load_fp32_from_bf16(p, out);
    return out;
  } else {
    return AccVec<T>::loadu(p);
  }
}

// v rounded to T (to nearest even, as c10::BFloat16's constructor rounds the scalar tails) into
// AccVec<T>::size() elements of p
template <typename T>
inline void store_acc(const AccVec<T>& v, T* p) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
#if defined(CPU_CAPABILITY_AVX512)
    // 16 lanes in, 16 out: convert_float_bfloat16 would also convert a second, unused half
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_bf16(__m512(v)));
#else
    at::vec::convert_float_bfloat16(v, v).store(p, AccVec<T>::size());
#endif
  } else {
    v.store(p);
  }
}

// The options of x's small companions: its compute type (float32 for bfloat16 x)
at::TensorOptions acc_options(const at::Tensor& x) {
  return x.options().dtype(at::toOpMathType(x.scalar_type()));
}

constexpr int64_t kChunk = 1024;  // elements summed in Acc<T> before adding to a double
constexpr int64_t kTile = 1024;   // pixels per task in the passes that loop over channels
constexpr int64_t kAhead = 4;     // channels ahead that pool_span and gate_span prefetch
constexpr int64_t kPrefetchBytes = 4096;  // how far ahead row_mean_max's stream is prefetched
// How far ahead the channels_last passes prefetch, with the hint for L2: they read x as one
// stream, which the hardware prefetcher alone, stopping at every 4 KiB page, keeps too few lines
// ahead of, and lines fetched into L1 this far ahead would evict the rows being read.
constexpr int64_t kPrefetchBytesCl = 16384;

template <typename T>
inline bool beats(T v, T m) {
  return v > m || (v != v && m == m);
}

// beats lane by lane, as a blend mask
template <typename T>
inline at::vec::Vectorized<T> beats(const at::vec::Vectorized<T>& v, const at::vec::Vectorized<T>& m) {
  return (v > m) | ((v != v) & (m == m));
}

void check(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// The sum, maximum (NaN-propagating) and minimum across a vector's lanes.
template <typename T>
inline T sum_lanes(const at::vec::Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](const auto& a, const auto& b) { return a + b; }, v);
}

template <typename T>
inline T max_lanes(const at::vec::Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](const auto& a, const auto& b) { return at::vec::maximum(a, b); }, v);
}

template <typename T>
inline T min_lanes(const at::vec::Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](const auto& a, const auto& b) { return at::vec::minimum(a, b); }, v);
}

// Sum of a[i] * b[i] over [0, len) for a full-size row a and a small one b: in Acc<T> per kChunk,
// then in double.
template <typename T>
double dot(const T* a, const Acc<T>* b, int64_t len) {
  using A = Acc<T>;
  using Vec = AccVec<T>;
  double total = 0;
  for (int64_t start = 0; start < len; start += kChunk) {
    const int64_t stop = std::min(start + kChunk, len);
    Vec acc(A(0));
    int64_t i = start;
    for (; i + Vec::size() <= stop; i += Vec::size()) {
      acc = acc + load_acc(a + i) * Vec::loadu(b + i);
    }
    A lanes[Vec::size()];
    acc.store(lanes);
    for (; i < stop; ++i) total += static_cast<A>(a[i]) * b[i];
    for (A lane : lanes) total += lane;
  }
  return total;
}

// Sum of a[i] * b[i] over [0, len) in T, for the MLP's short rows: two vector accumulators, the
// tail as a zero-filled partial vector, one tree reduction.
template <typename T>
T dot_short(const T* a, const T* b, int64_t len) {
  using Vec = at::vec::Vectorized<T>;
  Vec acc0(T(0)), acc1(T(0));
  int64_t i = 0;
  for (; i + 2 * Vec::size() <= len; i += 2 * Vec::size()) {
    acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + i + Vec::size()), Vec::loadu(b + i + Vec::size()), acc1);
  }
  for (; i < len; i += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), len - i);
    acc0 = at::vec::fmadd(Vec::loadu(a + i, count), Vec::loadu(b + i, count), acc0);
  }
  return sum_lanes(acc0 + acc1);
}

// The first i in [from, len) with row[i] == value, else len.
template <typename T>
int64_t find_first(const T* row, int64_t from, int64_t len, Acc<T> value) {
  using Vec = AccVec<T>;
  const Vec target(value);
  int64_t i = from;
  for (; i + Vec::size() <= len; i += Vec::size()) {
    // zero_mask marks the lanes that compare unequal (a true comparison sets every bit)
    const auto hits = ~static_cast<uint64_t>((load_acc(row + i) == target).zero_mask()) &
                      ((uint64_t(1) << Vec::size()) - 1);
    if (hits) return i + __builtin_ctzll(hits);
  }
  for (; i < len; ++i) {
    if (static_cast<Acc<T>>(row[i]) == value) return i;
  }
  return len;
}

// Prefetches the cache lines kBytes past [p, p + len) (kLocality: __builtin_prefetch's hint, 3 for
// every level, 1 for L2 and below; CPUs may treat the hints alike). The hardware prefetcher alone
// leaves a stream read through the L2 waiting (measured in the network's order of shapes, cold or
// in L3).
template <int64_t kBytes = kPrefetchBytes, int kLocality = 3, typename T>
inline void prefetch_ahead(const T* p, int64_t len) {
  const char* ahead = reinterpret_cast<const char*>(p) + kBytes;
  for (int64_t b = 0; b < len * int64_t(sizeof(T)); b += 64) __builtin_prefetch(ahead + b, 0, kLocality);
}

// Mean and max of each of the n rows of x (n, len), and the max's first index when idx is set.
// Each chunk is summed in two vectors of Acc<T>, then added to a double. The rows are read as
// one stream, prefetched ahead across their ends.
template <typename T>
void row_mean_max(const T* x, int64_t n, int64_t len, Acc<T>* mean, Acc<T>* max, int64_t* idx) {
  using A = Acc<T>;
  using Vec = AccVec<T>;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * len;
      A best = -std::numeric_limits<A>::infinity();
      int64_t best_chunk = 0;  // the first chunk that holds the max
      double total = 0;
      for (int64_t start = 0; start < len; start += kChunk) {
        const int64_t stop = std::min(start + kChunk, len);
        Vec s0(A(0)), s1(A(0)), m0(-std::numeric_limits<A>::infinity()), m1(m0);
        int64_t i = start;
        // clamp_min is the plain vector max; a NaN shows in the sum, and is looked for below
        for (; i + 4 * Vec::size() <= stop; i += 4 * Vec::size()) {
          prefetch_ahead(row + i, 4 * Vec::size());
          const Vec v0 = load_acc(row + i), v1 = load_acc(row + i + Vec::size());
          const Vec v2 = load_acc(row + i + 2 * Vec::size()), v3 = load_acc(row + i + 3 * Vec::size());
          s0 = s0 + v0 + v2;
          s1 = s1 + v1 + v3;
          m0 = at::vec::clamp_min(at::vec::clamp_min(v0, m0), v2);
          m1 = at::vec::clamp_min(at::vec::clamp_min(v1, m1), v3);
        }
        for (; i + 2 * Vec::size() <= stop; i += 2 * Vec::size()) {
          prefetch_ahead(row + i, 2 * Vec::size());
          const Vec v0 = load_acc(row + i), v1 = load_acc(row + i + Vec::size());
          s0 = s0 + v0;
          s1 = s1 + v1;
          m0 = at::vec::clamp_min(v0, m0);
          m1 = at::vec::clamp_min(v1, m1);
        }
        A chunk_sum = sum_lanes(s0 + s1);
        A chunk_max = max_lanes(at::vec::maximum(m0, m1));
        for (; i < stop; ++i) {
          const A v = row[i];
          chunk_sum += v;
          chunk_max = beats(v, chunk_max) ? v : chunk_max;
        }
        total += chunk_sum;
        if (chunk_max > best || start == 0) {
          best = chunk_max;
          best_chunk = start;
        }
      }
      mean[r] = static_cast<A>(total / len);
      // a NaN element makes the sum NaN (so does inf - inf): only then look for one
      const T* nan = total != total ? std::find_if(row, row + len, [](A v) { return v != v; })
                                    : row + len;
      if (nan != row + len) {
        max[r] = static_cast<A>(*nan);
        if (idx) idx[r] = nan - row;
      } else {
        max[r] = best;
        if (idx) idx[r] = find_first(row, best_chunk, len, best);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_pool(const at::Tensor& x, bool with_index) {
  check(x, "x", 3);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2);
  auto mean = at::empty({n, c}, acc_options(x));
  auto max = at::empty({n, c}, acc_options(x));
  auto idx = with_index ? at::empty({n, c}, x.options().dtype(at::kLong)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "channel_pool", [&] {
    using A = Acc<scalar_t>;
    row_mean_max<scalar_t>(x.data_ptr<scalar_t>(), n * c, hw, mean.data_ptr<A>(), max.data_ptr<A>(),
                           with_index ? idx.data_ptr<int64_t>() : nullptr);
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

// Mean and max over the c channels of x * g (x: one batch item's (C, HW), g: its (C) gate) for
// the pixels [p0, p0 + len), into sum and max. Four channels per pass over sum and max, added in
// channel order (the same sums as one at a time, with a quarter of the loads and stores of them).
template <typename T>
void pool_span(const T* x, const Acc<T>* g, int64_t c, int64_t hw, int64_t p0, int64_t len, Acc<T>* sum,
               Acc<T>* max) {
  using A = Acc<T>;
  using Vec = AccVec<T>;
  std::fill(sum, sum + len, A(0));
  std::fill(max, max + len, -std::numeric_limits<A>::infinity());
  int64_t ch = 0;
  for (; ch + 4 <= c; ch += 4) {
    const T* row = x + ch * hw + p0;
    const Vec g0(g[ch]), g1(g[ch + 1]), g2(g[ch + 2]), g3(g[ch + 3]);
    // the rows kAhead channels on lie hw apart, too far for the hardware prefetcher to find
    const T* ahead = ch + kAhead + 4 <= c ? row + kAhead * hw : nullptr;
    int64_t i = 0;
    for (; i + Vec::size() <= len; i += Vec::size()) {
      if (ahead) {
        for (int64_t k = 0; k < 4; ++k) __builtin_prefetch(ahead + k * hw + i);
      }
      const Vec v0 = load_acc(row + i) * g0, v1 = load_acc(row + hw + i) * g1;
      const Vec v2 = load_acc(row + 2 * hw + i) * g2, v3 = load_acc(row + 3 * hw + i) * g3;
      (Vec::loadu(sum + i) + v0 + v1 + v2 + v3).store(sum + i);
      const Vec m01 = at::vec::maximum(at::vec::maximum(Vec::loadu(max + i), v0), v1);  // NaN-propagating
      at::vec::maximum(at::vec::maximum(m01, v2), v3).store(max + i);
    }
    for (; i < len; ++i) {
      for (int64_t k = 0; k < 4; ++k) {
        const A v = static_cast<A>(row[k * hw + i]) * g[ch + k];
        sum[i] += v;
        max[i] = beats(v, max[i]) ? v : max[i];
      }
    }
  }
  for (; ch < c; ++ch) {
    const A w = g[ch];
    const T* row = x + ch * hw + p0;
    int64_t i = 0;
    for (; i + Vec::size() <= len; i += Vec::size()) {
      const Vec v = load_acc(row + i) * Vec(w);
      (Vec::loadu(sum + i) + v).store(sum + i);
      at::vec::maximum(Vec::loadu(max + i), v).store(max + i);
    }
    for (; i < len; ++i) {
      const A v = static_cast<A>(row[i]) * w;
      sum[i] += v;
      max[i] = beats(v, max[i]) ? v : max[i];
    }
  }
  for (int64_t i = 0; i < len; ++i) sum[i] /= static_cast<A>(c);
}

// pooled (N, 2, HW): mean and max over channels of y = x * g.
at::Tensor spatial_pool(const at::Tensor& x, const at::Tensor& g) {
  check(x, "x", 3);
  check(g, "g", 2);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2);
  auto pooled = at::empty({n, 2, hw}, acc_options(x));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "spatial_pool", [&] {
    using A = Acc<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const A* gp = g.data_ptr<A>();
    A* out = pooled.data_ptr<A>();
    for_tiles(n, hw, [&](int64_t b, int64_t, int64_t p0, int64_t p1) {
      A* sum = out + b * 2 * hw + p0;
      pool_span(xp + b * c * hw, gp + b * c, c, hw, p0, p1 - p0, sum, sum + hw);
    });
  });
  return pooled;
}

// out = x * g * s (+ x) over len elements; out may be x
template <typename T>
void scale_span(const T* x, Acc<T> g, const Acc<T>* s, int64_t len, bool residual, T* out) {
  using A = Acc<T>;
  using Vec = AccVec<T>;
  int64_t i = 0;
  for (; i + Vec::size() <= len; i += Vec::size()) {
    const Vec v = load_acc(x + i), y = v * Vec(g) * Vec::loadu(s + i);
    store_acc(residual ? y + v : y, out + i);
  }
  for (; i < len; ++i) {
    const A v = x[i];
    out[i] = static_cast<T>(residual ? v * g * s[i] + v : v * g * s[i]);
  }
}

// out = x * g * s (+ x), rounded as (x * g) * s like the plain formula.
at::Tensor scale(const at::Tensor& x, const at::Tensor& g, const at::Tensor& s, bool residual) {
  check(x, "x", 3);
  check(g, "g", 2);
  check(s, "s", 2);
  const int64_t c = x.size(1), hw = x.size(2);
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "scale", [&] {
    using A = Acc<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const A* gp = g.data_ptr<A>();
    const A* sp = s.data_ptr<A>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, x.size(0) * c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) scale_span(xp + r * hw, gp[r], sp + (r / c) * hw, hw, residual, op + r * hw);
    });
  });
  return out;
}

// gate_grads over the pixels [p0, p0 + len) of one batch item, len <= kTile (gr, x: its (C, HW);
// g: its (C); s: its (HW)): d_s into ds, the channel of max_c x g into arg (a channel number in T,
// so that it is updated with the same vector masks) and x there into x_at (all at p0), and sum G x s
// over these pixels added to each channel's dg.
template <typename T>
void gate_span(const T* gr, const T* x, const Acc<T>* g, const Acc<T>* s, int64_t c, int64_t hw, int64_t p0,
               int64_t len, Acc<T>* ds, Acc<T>* arg, Acc<T>* x_at, double* dg) {
  using A = Acc<T>;
  using Vec = AccVec<T>;
  A max[kTile];
  std::fill(ds, ds + len, A(0));
  std::fill(x_at, x_at + len, A(0));
  std::fill(max, max + len, -std::numeric_limits<A>::infinity());
  std::fill(arg, arg + len, A(0));
  const A* srow = s + p0;
  for (int64_t ch = 0; ch < c; ++ch) {
    const A w = g[ch], channel = static_cast<A>(ch);
    const T* row = x + ch * hw + p0;
    const T* grow = gr + ch * hw + p0;
    const bool ahead = ch + kAhead < c;  // prefetch as in pool_span
    const Vec wv(w), chv(channel);
    Vec lanes(A(0));
    int64_t i = 0;
    for (; i + Vec::size() <= len; i += Vec::size()) {
      if (ahead) {
        __builtin_prefetch(row + kAhead * hw + i);
        __builtin_prefetch(grow + kAhead * hw + i);
      }
      const Vec xv = load_acc(row + i), gx = load_acc(grow + i) * xv;
      lanes = lanes + gx * Vec::loadu(srow + i);
      (Vec::loadu(ds + i) + gx * wv).store(ds + i);
      const Vec v = xv * wv, m = Vec::loadu(max + i);
      const Vec up = beats(v, m);
      Vec::blendv(m, v, up).store(max + i);
      Vec::blendv(Vec::loadu(arg + i), chv, up).store(arg + i);
      Vec::blendv(Vec::loadu(x_at + i), xv, up).store(x_at + i);
    }
    double total = sum_lanes(lanes);
    for (; i < len; ++i) {
      const A xi = row[i], gx = static_cast<A>(grow[i]) * xi;
      total += gx * srow[i];
      ds[i] += gx * w;
      const A v = xi * w;
      const bool up = beats(v, max[i]);
      max[i] = up ? v : max[i];
      arg[i] = up ? channel : arg[i];
      x_at[i] = up ? xi : x_at[i];
    }
    dg[ch] += total;
  }
}

// With G = dL/dout: d_s = sum_c G x g (N, HW), d_g = sum_hw G x s (N, C), and the channel of
// max_c x g (N, HW, a channel number in the compute type) with x there (N, HW), recomputed here
// rather than kept from the forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_grads(const at::Tensor& grad,
                                                          const at::Tensor& x, const at::Tensor& g,
                                                          const at::Tensor& s) {
  check(grad, "grad", 3);
  check(x, "x", 3);
  check(g, "g", 2);
  check(s, "s", 2);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2);
  TORCH_CHECK(c <= (int64_t(1) << 24), "gate_grads supports at most 2^24 channels, got ", c);
  const int64_t tiles = (hw + kTile - 1) / kTile;
  auto d_s = at::empty({n, hw}, acc_options(x));
  auto idx = at::empty({n, hw}, acc_options(x));
  auto x_at = at::empty({n, hw}, acc_options(x));
  auto d_g_tiles = at::zeros({n, tiles, c}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "gate_grads", [&] {
    using A = Acc<scalar_t>;
    const scalar_t* gr = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const A* gp = g.data_ptr<A>();
    const A* sp = s.data_ptr<A>();
    for_tiles(n, hw, [&](int64_t b, int64_t tile, int64_t p0, int64_t p1) {
      const int64_t at = b * hw + p0;
      gate_span(gr + b * c * hw, xp + b * c * hw, gp + b * c, sp + b * hw, c, hw, p0, p1 - p0,
                d_s.data_ptr<A>() + at, idx.data_ptr<A>() + at, x_at.data_ptr<A>() + at,
                d_g_tiles.data_ptr<double>() + (b * tiles + tile) * c);
    });
  });
  return {d_s, d_g_tiles.sum(1).to(d_s.scalar_type()), idx, x_at};
}

// P's share of dL/dg from the pixels [p0, p1) of one batch item (x: its (C, HW); d_avg, d_max, idx,
// x_at: its (HW)), added to each channel's dg: sum x d_avg / C, and x_at d_max at each pixel's max
// channel idx.
template <typename T>
void pool_share(const T* x, const Acc<T>* d_avg, const Acc<T>* d_max, const Acc<T>* idx, const Acc<T>* x_at,
                int64_t c, int64_t hw, int64_t p0, int64_t p1, double* dg) {
  for (int64_t ch = 0; ch < c; ++ch) dg[ch] += dot(x + ch * hw + p0, d_avg + p0, p1 - p0) / c;
  for (int64_t p = p0; p < p1; ++p) dg[static_cast<int64_t>(idx[p])] += x_at[p] * d_max[p];
}

// dL/dg through the pooled map, pool_share over each batch item.
at::Tensor pool_gate_grad(const at::Tensor& x, const at::Tensor& d_pooled, const at::Tensor& idx,
                          const at::Tensor& x_at) {
  check(x, "x", 3);
  check(d_pooled, "d_pooled", 3);
  check(idx, "idx", 2);
  check(x_at, "x_at", 2);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2);
  auto d_g = at::zeros({n, c}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "pool_gate_grad", [&] {
    using A = Acc<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const A* dp = d_pooled.data_ptr<A>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        pool_share(xp + b * c * hw, dp + b * 2 * hw, dp + (b * 2 + 1) * hw, idx.data_ptr<A>() + b * hw,
                   x_at.data_ptr<A>() + b * hw, c, hw, int64_t(0), hw, d_g.data_ptr<double>() + b * c);
      }
    });
  });
  return d_g.to(at::toOpMathType(x.scalar_type()));
}

// dL/dx = g (G s + d_avg_s / C) + d_avg_c / HW (+ G) + g d_max_s where the channel is the pixel's
// max channel idx_s (as gate_grads gives it), then d_max_c added at each channel's max pixel idx_c.
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
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "input_grad", [&] {
    using A = Acc<scalar_t>;
    using Vec = AccVec<scalar_t>;
    const scalar_t* gr = grad.data_ptr<scalar_t>();
    const A* gp = g.data_ptr<A>();
    const A* sp = s.data_ptr<A>();
    const A* dp = d_pooled.data_ptr<A>();
    const A* isp = idx_s.data_ptr<A>();
    const A* dap = d_avg.data_ptr<A>();
    const A* dmp = d_max.data_ptr<A>();
    const int64_t* icp = idx_c.data_ptr<int64_t>();
    scalar_t* out = dx.data_ptr<scalar_t>();
    const A inv_c = A(1) / static_cast<A>(c);
    at::parallel_for(0, grad.size(0) * c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / c;
        const A w = gp[r], base = dap[r] / static_cast<A>(hw), channel = static_cast<A>(r % c);
        const scalar_t* grow = gr + r * hw;
        const A* srow = sp + b * hw;
        const A* d_avg_s = dp + b * 2 * hw;
        const A* d_max_s = d_avg_s + hw;
        const A* arg = isp + b * hw;
        scalar_t* orow = out + r * hw;
        const Vec wv(w), basev(base), inv(inv_c), chv(channel);
        int64_t i = 0;
        for (; i + Vec::size() <= hw; i += Vec::size()) {
          const Vec gv = load_acc(grow + i);
          Vec v = (gv * Vec::loadu(srow + i) + Vec::loadu(d_avg_s + i) * inv) * wv + basev;
          if (residual) v = v + gv;
          // the max's share where this is the max channel (a true comparison sets every bit)
          v = v + ((Vec::loadu(arg + i) == chv) & (wv * Vec::loadu(d_max_s + i)));
          store_acc(v, orow + i);
        }
        for (; i < hw; ++i) {
          const A gi = grow[i];
          A v = (gi * srow[i] + d_avg_s[i] * inv_c) * w + base;
          if (residual) v += gi;
          if (arg[i] == channel) v += w * d_max_s[i];
          orow[i] = static_cast<scalar_t>(v);
        }
      }
    });
    // a second rounding, in bfloat16, of one element per channel
    for (int64_t b = 0; b < grad.size(0); ++b) {
      for (int64_t ch = 0; ch < c; ++ch) {
        scalar_t& at_max = out[(b * c + ch) * hw + icp[b * c + ch]];
        at_max = static_cast<scalar_t>(static_cast<A>(at_max) + dmp[b * c + ch]);
      }
    }
  });
  return dx;
}

constexpr int64_t kBlockX = 32;  // output columns kept in registers by correlate_rows

// src (H, W) copied into a zero border of r = k / 2 (and kBlockX spare columns), row length ld.
template <typename T>
std::vector<T> padded(const T* src, int64_t h, int64_t wd, int64_t r, int64_t ld) {
  std::vector<T> out((h + 2 * r) * ld, T(0));
  for (int64_t y = 0; y < h; ++y) std::copy(src + y * wd, src + (y + 1) * wd, out.data() + (y + r) * ld + r);
  return out;
}

// The border of a map padded as in correlate_rows: r rows above and below, r columns left, the rest
// of each row right.
template <typename T>
void zero_border(T* pad, int64_t h, int64_t wd, int64_t r, int64_t ld) {
  std::fill(pad, pad + r * ld, T(0));
  for (int64_t y = r; y < h + r; ++y) {
    std::fill(pad + y * ld, pad + y * ld + r, T(0));
    std::fill(pad + y * ld + r + wd, pad + (y + 1) * ld, T(0));
  }
  std::fill(pad + (h + r) * ld, pad + (h + 2 * r) * ld, T(0));
}

// Rows [y, y + kRows), columns [x0, x0 + kBlockX) of correlate_rows.
template <int64_t kRows, typename T>
void correlate_block(const T* pad, int64_t ld, const T* taps, int64_t k, int64_t y, int64_t x0,
                     int64_t wd, T* dst) {
  using Vec = at::vec::Vectorized<T>;
  static_assert(kBlockX % Vec::size() == 0, "kBlockX must hold whole vectors");
  constexpr int64_t kVecs = kBlockX / Vec::size();
  Vec acc[kRows][kVecs];
  for (auto& row : acc) {
    for (Vec& a : row) a = Vec(T(0));
  }
  for (int64_t ky = 0; ky < k; ++ky) {
    for (int64_t kx = 0; kx < k; ++kx) {
      const Vec v(taps[ky * k + kx]);
      for (int64_t r = 0; r < kRows; ++r) {
        const T* in = pad + (y + r + ky) * ld + x0 + kx;
        for (int64_t j = 0; j < kVecs; ++j) acc[r][j] = at::vec::fmadd(v, Vec::loadu(in + j * Vec::size()), acc[r][j]);
      }
    }
  }
  T out[kBlockX];
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t j = 0; j < kVecs; ++j) acc[r][j].store(out + j * Vec::size());
    T* row = dst + (y + r) * wd + x0;
    for (int64_t j = 0; j < std::min(kBlockX, wd - x0); ++j) row[j] += out[j];
  }
}

// Rows [y0, y1) of dst (H, W) += the k x k correlation with taps of the map in pad, which holds it
// with a zero border of r = k / 2 rows and columns (image pixel (y, x) at pad[(y + r) * ld + x + r])
// and kBlockX spare columns. Four rows at a time, for independent accumulators.
template <typename T>
void correlate_rows(const T* pad, int64_t ld, const T* taps, int64_t k, int64_t y0, int64_t y1,
                    int64_t wd, T* dst) {
  for (int64_t y = y0; y < y1;) {
    const bool four = y + 4 <= y1;
    for (int64_t x0 = 0; x0 < wd; x0 += kBlockX) {
      if (four) {
        correlate_block<4>(pad, ld, taps, k, y, x0, wd, dst);
      } else {
        correlate_block<1>(pad, ld, taps, k, y, x0, wd, dst);
      }
    }
    y += four ? 4 : 1;
  }
}

// dst (H, W) += src (H, W) correlated with the k x k kernel w, zero-padded to keep the size;
// with flip, w turned by 180 degrees (the correlation's adjoint).
template <typename T>
void correlate_add(const T* src, const T* w, int64_t k, bool flip, int64_t h, int64_t wd, T* dst) {
  const int64_t r = k / 2, ld = wd + 2 * r + kBlockX;
  const std::vector<T> pad = padded(src, h, wd, r, ld);
  std::vector<T> taps(w, w + k * k);
  if (flip) std::reverse(taps.begin(), taps.end());
  correlate_rows(pad.data(), ld, taps.data(), k, 0, h, wd, dst);
}

constexpr int64_t kTapGroup = 4;     // weight_grad_map's taps kept in registers at a time
constexpr int64_t kRowsPerFlush = 8;  // rows its float accumulators sum before adding to doubles

// out[ky * k + kx] += sum over y, x of pad[(y + ky) * ld + x + kx] dz[y * ldz + x]: the weight
// gradient of a correlation, for the map padded as in correlate_rows but with 2 * kBlockX spare
// columns, and dz padded with kBlockX zero columns. kTapGroup taps of a row of the kernel at a
// time, two vectors of columns each (independent accumulators); a group may run past k into the
// padding, and only the taps below k are kept.
template <typename T>
void weight_grad_map(const T* pad, int64_t ld, const T* dz, int64_t ldz, int64_t k, int64_t h, int64_t wd,
                     double* out) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kStep = 2 * Vec::size();
  static_assert(kBlockX >= kStep, "dz's padding must hold a step's overrun");
  for (int64_t ky = 0; ky < k; ++ky) {
    for (int64_t kx0 = 0; kx0 < k; kx0 += kTapGroup) {
      for (int64_t y0 = 0; y0 < h; y0 += kRowsPerFlush) {
        Vec acc[2][kTapGroup];
        for (auto& half : acc) {
          for (Vec& a : half) a = Vec(T(0));
        }
        for (int64_t y = y0; y < std::min(h, y0 + kRowsPerFlush); ++y) {
          const T* in = pad + (y + ky) * ld + kx0;
          const T* g = dz + y * ldz;
          for (int64_t x = 0; x < wd; x += kStep) {
            const Vec g0 = Vec::loadu(g + x), g1 = Vec::loadu(g + x + Vec::size());
            for (int64_t j = 0; j < kTapGroup; ++j) {
              acc[0][j] = at::vec::fmadd(Vec::loadu(in + x + j), g0, acc[0][j]);
              acc[1][j] = at::vec::fmadd(Vec::loadu(in + x + j + Vec::size()), g1, acc[1][j]);
            }
          }
        }
        T lanes[kTapGroup][Vec::size()];  // every accumulator stored, so that all stay in registers
        for (int64_t j = 0; j < kTapGroup; ++j) (acc[0][j] + acc[1][j]).store(lanes[j]);
        for (int64_t j = 0; j < std::min(kTapGroup, k - kx0); ++j) {
          for (T lane : lanes[j]) out[ky * k + kx0 + j] += lane;
        }
      }
    }
  }
}

// The 2 -> 1 k x k convolution of the pooled map (N, 2, H, W), without bias: (N, 1, H, W). Like the
// MLP's backward below, it sees only small tensors of the compute type, never bfloat16.
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

// The weight's gradient of spatial_conv for d_out (N, 1, H, W).
at::Tensor conv_weight_grad(const at::Tensor& d_out, const at::Tensor& pooled, const at::Tensor& weight) {
  check(d_out, "d_out", 4);
  check(pooled, "pooled", 4);
  check(weight, "weight", 4);
  const int64_t n = pooled.size(0), h = pooled.size(2), wd = pooled.size(3), k = weight.size(3), r = k / 2;
  auto per_map = at::zeros({n, 2, k * k}, pooled.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "conv_weight_grad", [&] {
    const scalar_t* dz = d_out.data_ptr<scalar_t>();
    const scalar_t* src = pooled.data_ptr<scalar_t>();
    double* pm = per_map.data_ptr<double>();
    at::parallel_for(0, n * 2, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t ld = wd + 2 * r + 2 * kBlockX, ldz = wd + kBlockX;
        const std::vector<scalar_t> pad = padded(src + t * h * wd, h, wd, r, ld);
        const std::vector<scalar_t> grad = padded(dz + (t / 2) * h * wd, h, wd, int64_t(0), ldz);
        weight_grad_map(pad.data(), ld, grad.data(), ldz, k, h, wd, pm + t * k * k);
      }
    });
  });
  return per_map.sum(0).view_as(weight).to(weight.scalar_type());
}

// Gradients of spatial_conv for d_out (N, 1, H, W): the pooled map's and the weight's.
std::tuple<at::Tensor, at::Tensor> spatial_conv_backward(const at::Tensor& d_out,
                                                         const at::Tensor& pooled,
                                                         const at::Tensor& weight) {
  check(d_out, "d_out", 4);
  check(pooled, "pooled", 4);
  check(weight, "weight", 4);
  const int64_t n = pooled.size(0), h = pooled.size(2), wd = pooled.size(3), k = weight.size(3);
  auto d_pooled = at::zeros_like(pooled);
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "spatial_conv_backward", [&] {
    const scalar_t* dz = d_out.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* dp = d_pooled.data_ptr<scalar_t>();
    at::parallel_for(0, n * 2, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        correlate_add(dz + (t / 2) * h * wd, w + (t % 2) * k * k, k, true, h, wd, dp + t * h * wd);
      }
    });
  });
  return {d_pooled, conv_weight_grad(d_out, pooled, weight)};
}


// s = sigmoid(a * s + b), in place; the tail as a partial vector, so that every element gets the
// vector exp whatever the length (the passes' blocks of rows depend on the thread count)
template <typename T>
void sigmoid_affine(T* s, int64_t len, T a, T b) {
  using Vec = at::vec::Vectorized<T>;
  for (int64_t i = 0; i < len; i += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), len - i);
    const Vec z = Vec(-a) * Vec::loadu(s + i, count) - Vec(b);
    (Vec(T(1)) + z.exp()).reciprocal().store(s + i, count);
  }
}

// Storage for N vectors, left uninitialised: Vectorized's default constructor zeroes its lanes, and
// the arrays of a group's pixels below live in memory (indexed in a loop), where that zeroing was a
// store of every vector before each group.
template <typename V, int64_t N>
struct Vectors {
  alignas(V) unsigned char raw[sizeof(V) * N];
  V* data() { return reinterpret_cast<V*>(raw); }
  V& operator[](int64_t i) { return data()[i]; }
};

#if defined(CPU_CAPABILITY_AVX512)
// Lane i of the result: v[i]'s lanes combined by op (a sum, or a NaN-propagating max), for 16
// vectors at once. Pairs of vectors are interleaved and combined level by level (within 128-bit
// lanes, then across them), which takes 30 shuffles where 16 separate reductions take 64, and no
// scalar round trip.
template <typename Op>
inline at::vec::Vectorized<float> combine16(const at::vec::Vectorized<float>* v, const Op& op) {
  using Vec = at::vec::Vectorized<float>;
  Vec pair[8], quad[4], half[2];
  // pair[i], 128-bit lane j: v[2i] and v[2i + 1] interleaved, each over pairs of lane j's elements
  for (int i = 0; i < 8; ++i) {
    pair[i] = op(Vec(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1])), Vec(_mm512_unpackhi_ps(v[2 * i], v[2 * i + 1])));
  }
  // quad[i], 128-bit lane j: v[4i], ..., v[4i + 3], each over all four of lane j's elements
  for (int i = 0; i < 4; ++i) {
    const __m512 a = pair[2 * i], b = pair[2 * i + 1];
    quad[i] = op(Vec(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0))), Vec(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2))));
  }
  // half[i], 128-bit lanes: v[8i..8i+3] over lanes 0-1, then over 2-3; the same for v[8i+4..8i+7]
  for (int i = 0; i < 2; ++i) {
    const __m512 a = quad[2 * i], b = quad[2 * i + 1];
    half[i] = op(Vec(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0))), Vec(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1))));
  }
  const __m512 a = half[0], b = half[1];
  return op(Vec(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0))), Vec(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1))));
}
template <typename Op>
inline at::vec::Vectorized<float> combine_pixels(const at::vec::Vectorized<float>* v, const Op& op) {
  return combine16(v, op);
}
#define SMP_CBAM_COMBINE_LANES 16
#elif defined(CPU_CAPABILITY_AVX2)
// combine16's tree for AVX2's 8 float lanes: lane i of the result is v[i]'s lanes combined by op,
// for 8 vectors at once.
template <typename Op>
inline at::vec::Vectorized<float> combine8(const at::vec::Vectorized<float>* v, const Op& op) {
  using Vec = at::vec::Vectorized<float>;
  Vec pair[4], quad[2];
  // pair[i], 128-bit lane j: v[2i] and v[2i + 1] interleaved, each over pairs of lane j's elements
  for (int i = 0; i < 4; ++i) {
    pair[i] = op(Vec(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1])), Vec(_mm256_unpackhi_ps(v[2 * i], v[2 * i + 1])));
  }
  // quad[i], 128-bit lane j: v[4i], ..., v[4i + 3], each over all four of lane j's elements
  for (int i = 0; i < 2; ++i) {
    const __m256 a = pair[2 * i], b = pair[2 * i + 1];
    quad[i] = op(Vec(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0))), Vec(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2))));
  }
  const __m256 a = quad[0], b = quad[1];
  return op(Vec(_mm256_permute2f128_ps(a, b, 0x20)), Vec(_mm256_permute2f128_ps(a, b, 0x31)));
}
template <typename Op>
inline at::vec::Vectorized<float> combine_pixels(const at::vec::Vectorized<float>* v, const Op& op) {
  return combine8(v, op);
}
#define SMP_CBAM_COMBINE_LANES 8
#endif

// Mean and max over the c channels of x * g (x: one channels_last image, (HW, C); g: its (C) gate)
// for each pixel of [p0, p0 + len), into sum and max: a pixel's channels are one contiguous row,
// summed in vector lanes, then across them; with AVX512 (AVX2) 16 (8) pixels' lanes are combined
// together (combine16, combine8), since one reduction per pixel costs more than reading it.
template <typename T>
void pool_pixels_cl(const T* x, const Acc<T>* g, int64_t c, int64_t p0, int64_t len, Acc<T>* sum, Acc<T>* max) {
  using A = Acc<T>;
  using Vec = AccVec<T>;
  constexpr int64_t kLanes = Vec::size();
  const A inf = std::numeric_limits<A>::infinity();
  int64_t i = 0;
#if defined(SMP_CBAM_COMBINE_LANES)
  if constexpr (std::is_same_v<A, float> && kLanes == SMP_CBAM_COMBINE_LANES) {
    const int64_t full = c - c % kLanes;
    // the last group may hold fewer than kLanes pixels: the others' lanes are left out of the stores,
    // so that every pixel goes through the same tree, however the rows are split among tasks
    for (; full > 0 && i < len; i += kLanes) {
      const int64_t count = std::min(kLanes, len - i);
      Vectors<Vec, kLanes> vs, vm;
      for (int64_t q = 0; q < kLanes; ++q) {
        if (q >= count) {
          vs[q] = Vec(A(0));
          vm[q] = Vec(A(0));
          continue;
        }
        const T* row = x + (p0 + i + q) * c;
        prefetch_ahead<kPrefetchBytesCl, 1>(row, c);
        const Vec y = load_acc(row) * Vec::loadu(g);
        vs[q] = y;
        vm[q] = y;
        for (int64_t j = kLanes; j < full; j += kLanes) {
          const Vec z = load_acc(row + j) * Vec::loadu(g + j);
          vs[q] = vs[q] + z;
          vm[q] = at::vec::maximum(vm[q], z);  // NaN-propagating
        }
      }
      const auto add = [](const Vec& a, const Vec& b) { return a + b; };
      const auto top = [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); };
      A total[kLanes], most[kLanes];
      combine_pixels(vs.data(), add).store(total);
      combine_pixels(vm.data(), top).store(most);
      for (int64_t q = 0; q < count; ++q) {
        const T* row = x + (p0 + i + q) * c;
        for (int64_t j = full; j < c; ++j) {
          const A y = static_cast<A>(row[j]) * g[j];
          total[q] += y;
          most[q] = beats(y, most[q]) ? y : most[q];
        }
        sum[i + q] = total[q] / static_cast<A>(c);
        max[i + q] = most[q];
      }
    }
  }
#endif
  for (; i < len; ++i) {
    const T* row = x + (p0 + i) * c;
    Vec vs(A(0)), vm(-inf);
    int64_t j = 0;
    for (; j + kLanes <= c; j += kLanes) {
      const Vec y = load_acc(row + j) * Vec::loadu(g + j);
      vs = vs + y;
      vm = at::vec::maximum(vm, y);  // NaN-propagating
    }
    A total = j > 0 ? sum_lanes(vs) : A(0);
    A top = j > 0 ? max_lanes(vm) : -inf;
    for (; j < c; ++j) {
      const A y = static_cast<A>(row[j]) * g[j];
      total += y;
      top = beats(y, top) ? y : top;
    }
    sum[i] = total / static_cast<A>(c);
    max[i] = top;
  }
}

// out = (x g) s (+ x) for the pixels [p0, p0 + len) of one channels_last image (x, out: (HW, C);
// g: its (C) gate; s: the pixels' spatial gate); out may be x.
template <typename T>
void scale_pixels_cl(const T* x, const Acc<T>* g, const Acc<T>* s, int64_t c, int64_t p0, int64_t len,
                     bool residual, T* out) {
  using A = Acc<T>;
  using Vec = AccVec<T>;
  for (int64_t i = 0; i < len; ++i) {
    const T* row = x + (p0 + i) * c;
    T* dst = out + (p0 + i) * c;
    const A sq = s[i];
    int64_t j = 0;
    for (; j + Vec::size() <= c; j += Vec::size()) {
      const Vec v = load_acc(row + j), y = v * Vec::loadu(g + j) * Vec(sq);
      store_acc(residual ? y + v : y, dst + j);
    }
    for (; j < c; ++j) {
      const A v = row[j];
      dst[j] = static_cast<T>(residual ? v * g[j] * sq + v : v * g[j] * sq);
    }
  }
}

constexpr int64_t kBlockBytes = 256 * 1024;  // rows per block of the streaming passes: about this many bytes
constexpr int64_t kMinSegmentRows = 8;       // the shortest segment of rows they give a task

// How attend and gate_pass split each image's h rows among tasks: segments of rows, at least two
// tasks per thread, each segment at least r rows (the border its neighbours read).
struct Segments {
  int64_t rows, count;
  Segments(int64_t n, int64_t h, int64_t r) {
    const int64_t per_image = std::max<int64_t>(1, (2 * at::get_num_threads() + n - 1) / n);
    rows = std::max({kMinSegmentRows, r, (h + per_image - 1) / per_image});
    count = (h + rows - 1) / rows;
  }
};

// The forward after the channel gate g (N, C), in one pass over x (N, C, H, W), NCHW- or
// channels_last-contiguous (out in the same layout):
// out = x * g * s (+ x) with s = sigmoid(a * conv_kxk(P) + b), P = [mean_c; max_c](x * g), where a
// and b fold the convolution's bias and an eval-mode BatchNorm. Each task streams a segment of rows
// in blocks: it pools the rows r = k / 2 ahead of the block, convolves the block and scales its x
// rows while they are still in cache. The rows that neighbouring segments need are pooled first, so
// out may be x itself. With keep, returns s (N, HW) and P (N, 2, H, W) for the backward.
std::tuple<at::Tensor, at::Tensor> attend(const at::Tensor& x, const at::Tensor& g,
                                          const at::Tensor& weight, double a, double b,
                                          bool residual, const at::Tensor& out, bool keep) {
  const bool cl = !x.is_contiguous();
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && (!cl || x.is_contiguous(at::MemoryFormat::ChannelsLast)),
              "x must be an NCHW- or channels_last-contiguous CPU tensor (N, C, H, W)");
  check(g, "g", 2);
  check(weight, "weight", 4);
  TORCH_CHECK(out.sizes() == x.sizes() && out.strides() == x.strides() && out.dtype() == x.dtype(),
              "out must match x");
  TORCH_CHECK(weight.size(0) == 1 && weight.size(1) == 2, "expected a (1, 2, k, k) weight");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), wd = x.size(3), hw = h * wd;
  const int64_t k = weight.size(3), r = k / 2, ld = wd + 2 * r + kBlockX, plane = (h + 2 * r) * ld;
  const Segments split(n, h, r);
  const int64_t seg_rows = split.rows, segs = split.count;
  auto pad = at::empty({n, 2, h + 2 * r, ld}, acc_options(x));  // pool_rows fills all but the border
  auto s_all = keep ? at::empty({n, hw}, acc_options(x)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "attend", [&] {
    using A = Acc<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const A* gp = g.data_ptr<A>();
    const A* w = weight.data_ptr<A>();
    A* pp = pad.data_ptr<A>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t span = std::max(kTile, wd);
    for (int64_t p = 0; p < 2 * n; ++p) zero_border(pp + p * plane, h, wd, r, ld);
    // P's rows [y0, y1) of batch item bi, a tile of whole rows at a time
    auto pool_rows = [&](int64_t bi, int64_t y0, int64_t y1, A* sum, A* max) {
      for (int64_t ya = y0; ya < y1;) {
        const int64_t yb = std::min(y1, ya + std::max<int64_t>(1, kTile / wd));
        if (cl) {
          pool_pixels_cl(xp + bi * hw * c, gp + bi * c, c, ya * wd, (yb - ya) * wd, sum, max);
        } else {
          pool_span(xp + bi * c * hw, gp + bi * c, c, hw, ya * wd, (yb - ya) * wd, sum, max);
        }
        for (int64_t y = ya; y < yb; ++y) {
          A* dst = pp + bi * 2 * plane + (y + r) * ld + r;
          std::copy(sum + (y - ya) * wd, sum + (y - ya + 1) * wd, dst);
          std::copy(max + (y - ya) * wd, max + (y - ya + 1) * wd, dst + plane);
        }
        ya = yb;
      }
    };
    at::parallel_for(0, n * segs, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> sum(span), max(span);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bi = t / segs, seg = t % segs, y0 = seg * seg_rows, y1 = std::min(h, y0 + seg_rows);
        if (seg > 0) pool_rows(bi, y0, std::min(y0 + r, y1), sum.data(), max.data());
        if (seg < segs - 1) pool_rows(bi, std::max(y1 - r, y0), y1, sum.data(), max.data());
      }
    });
    const int64_t block_rows = std::max<int64_t>(1, kBlockBytes / (c * wd * sizeof(scalar_t)));
    at::parallel_for(0, n * segs, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> sum(span), max(span), s(block_rows * wd);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bi = t / segs, seg = t % segs, y0 = seg * seg_rows, y1 = std::min(h, y0 + seg_rows);
        int64_t pooled = seg > 0 ? std::min(y0 + r, y1) : y0;  // rows of P done
        const int64_t last = seg < segs - 1 ? std::max(y1 - r, pooled) : y1;
        for (int64_t q0 = y0; q0 < y1; q0 += block_rows) {
          const int64_t q1 = std::min(q0 + block_rows, y1), len = (q1 - q0) * wd;
          if (std::min(q1 + r, last) > pooled) {
            pool_rows(bi, pooled, std::min(q1 + r, last), sum.data(), max.data());
            pooled = std::min(q1 + r, last);
          }
          std::fill(s.begin(), s.begin() + len, A(0));
          for (int64_t ch = 0; ch < 2; ++ch) {
            correlate_rows(pp + (bi * 2 + ch) * plane + q0 * ld, ld, w + ch * k * k, k, 0, q1 - q0, wd,
                           s.data());
          }
          sigmoid_affine(s.data(), len, static_cast<A>(a), static_cast<A>(b));
          if (keep) std::copy(s.begin(), s.begin() + len, s_all.data_ptr<A>() + bi * hw + q0 * wd);
          if (cl) {
            scale_pixels_cl(xp + bi * hw * c, gp + bi * c, s.data(), c, q0 * wd, len, residual, op + bi * hw * c);
            continue;
          }
          for (int64_t ch = 0; ch < c; ++ch) {
            const int64_t offset = (bi * c + ch) * hw + q0 * wd;
            scale_span(xp + offset, gp[bi * c + ch], s.data(), len, residual, op + offset);
          }
        }
      }
    });
  });
  if (!keep) return {};
  return {s_all, pad.slice(2, r, r + h).slice(3, r, r + wd).contiguous()};
}

// The backward's first pass for s = sigmoid(conv(P) + bias), streamed like attend: for each block
// of rows, gate_span (d_s, sum_hw G x s and the channel argmax) and d_u = d_s s (1 - s) into a map
// with a zero border; then, for the rows whose neighbourhood of d_u is complete (r = k / 2 rows
// behind), d_P by the flipped kernel and pool_share while those rows of x are still in cache. The
// rows that neighbouring segments read get their d_u first. Returns dL/dg (N, C), d_u (N, HW),
// d_P (N, 2, HW) and the channel argmax (N, HW, as gate_grads).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_pass(const at::Tensor& grad, const at::Tensor& x,
                                                                  const at::Tensor& g, const at::Tensor& s,
                                                                  const at::Tensor& weight) {
  check(grad, "grad", 4);
  check(x, "x", 4);
  check(g, "g", 2);
  check(s, "s", 2);
  check(weight, "weight", 4);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), wd = x.size(3), hw = h * wd;
  TORCH_CHECK(c <= (int64_t(1) << 24), "gate_pass supports at most 2^24 channels, got ", c);
  const int64_t k = weight.size(3), r = k / 2, ld = wd + 2 * r + kBlockX, plane = (h + 2 * r) * ld;
  const Segments split(n, h, r);
  const int64_t seg_rows = split.rows, segs = split.count;
  auto pad = at::zeros({n, h + 2 * r, ld}, acc_options(x));
  auto d_u = at::empty({n, hw}, acc_options(x));
  auto d_pooled = at::zeros({n, 2, hw}, acc_options(x));
  auto idx = at::empty({n, hw}, acc_options(x));
  auto x_at = at::empty({n, hw}, acc_options(x));
  auto d_g = at::zeros({n * segs, c}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "gate_pass", [&] {
    using A = Acc<scalar_t>;
    const scalar_t* gr = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const A* gp = g.data_ptr<A>();
    const A* sp = s.data_ptr<A>();
    A* pp = pad.data_ptr<A>();
    A* dup = d_u.data_ptr<A>();
    A* dp = d_pooled.data_ptr<A>();
    A* ip = idx.data_ptr<A>();
    A* xap = x_at.data_ptr<A>();
    std::vector<A> taps(2 * k * k);  // the kernel turned by 180 degrees: the adjoint
    const A* w = weight.data_ptr<A>();
    for (int64_t ch = 0; ch < 2; ++ch) std::reverse_copy(w + ch * k * k, w + (ch + 1) * k * k, taps.data() + ch * k * k);
    // gate_span over rows [y0, y1) of item bi, a tile at a time, then d_u into du (and into the
    // map for the rows [own0, own1))
    auto gate_rows = [&](int64_t bi, int64_t y0, int64_t y1, int64_t own0, int64_t own1, A* ds, double* dg,
                         A* du) {
      const int64_t base = bi * hw, first = y0 * wd, last = y1 * wd;
      for (int64_t p0 = first; p0 < last; p0 += kTile) {
        gate_span(gr + base * c, xp + base * c, gp + bi * c, sp + base, c, hw, p0, std::min(kTile, last - p0),
                  ds + p0 - first, ip + base + p0, xap + base + p0, dg);
      }
      for (int64_t y = y0; y < y1; ++y) {
        const A* srow = sp + base + y * wd;
        const A* drow = ds + (y - y0) * wd;
        A* out = du + (y - y0) * wd;
        for (int64_t i = 0; i < wd; ++i) out[i] = drow[i] * srow[i] * (A(1) - srow[i]);
        if (y >= own0 && y < own1) std::copy(out, out + wd, pp + bi * plane + (y + r) * ld + r);
      }
    };
    // the rows at each segment's borders that its neighbours read
    at::parallel_for(0, n * segs, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> ds(r * wd), du(r * wd);
      std::vector<double> scratch(c);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bi = t / segs, seg = t % segs, y0 = seg * seg_rows, y1 = std::min(h, y0 + seg_rows);
        const int64_t top = std::min(y0 + r, y1), bottom = std::max(y1 - r, y0);
        if (seg > 0) gate_rows(bi, y0, top, y0, top, ds.data(), scratch.data(), du.data());
        if (seg < segs - 1) gate_rows(bi, bottom, y1, bottom, y1, ds.data(), scratch.data(), du.data());
      }
    });
    // blocks of G and x of about kBlockBytes, but at least a tile of pixels per channel
    const int64_t block_rows = std::max(kBlockBytes / (2 * c * wd * int64_t(sizeof(scalar_t))), (kTile + wd - 1) / wd);
    at::parallel_for(0, n * segs, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> ds(block_rows * wd);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bi = t / segs, seg = t % segs, y0 = seg * seg_rows, y1 = std::min(h, y0 + seg_rows);
        const int64_t own0 = seg > 0 ? std::min(y0 + r, y1) : y0, own1 = seg < segs - 1 ? std::max(y1 - r, y0) : y1;
        double* dg = d_g.data_ptr<double>() + t * c;
        int64_t done = y0;  // rows of d_P and of P's share done
        for (int64_t q0 = y0; q0 < y1; q0 += block_rows) {
          const int64_t q1 = std::min(q0 + block_rows, y1);
          gate_rows(bi, q0, q1, own0, own1, ds.data(), dg, dup + bi * hw + q0 * wd);
          const int64_t ready = q1 == y1 ? y1 : std::max(done, q1 - r);
          if (ready == done) continue;
          for (int64_t ch = 0; ch < 2; ++ch) {
            correlate_rows(pp + bi * plane + done * ld, ld, taps.data() + ch * k * k, k, 0, ready - done, wd,
                           dp + (bi * 2 + ch) * hw + done * wd);
          }
          pool_share(xp + bi * c * hw, dp + bi * 2 * hw, dp + (bi * 2 + 1) * hw, ip + bi * hw, xap + bi * hw, c, hw,
                     done * wd, ready * wd, dg);
          done = ready;
        }
      }
    });
  });
  return {d_g.view({n, segs, c}).sum(1).to(d_u.scalar_type()), d_u, d_pooled, idx};
}

// The channel gate's MLP on the descriptors d = [mean_hw; max_hw] (2N, C): hidden layer
// H = relu(d w1^T + b1) (2N, C/r) into hp, g = sigmoid((H_avg + H_max) w2^T + 2 b2) (N, C) into gp.
// Plain loops: for these few rows ATen's linear layers cost more in dispatch than in arithmetic.
template <typename A>
void mlp_gate(const A* d, int64_t n, int64_t c, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
              const at::Tensor& w2, const std::optional<at::Tensor>& b2, A* hp, A* gp) {
  const int64_t hid = w1.size(0);
  const A* w1p = w1.data_ptr<A>();
  const A* w2p = w2.data_ptr<A>();
  const A* b1p = b1 ? b1->data_ptr<A>() : nullptr;
  const A* b2p = b2 ? b2->data_ptr<A>() : nullptr;
  for (int64_t i = 0; i < 2 * n; ++i) {
    for (int64_t j = 0; j < hid; ++j) {
      const A v = dot_short(d + i * c, w1p + j * c, c) + (b1p ? b1p[j] : A(0));
      hp[i * hid + j] = std::max(v, A(0));
    }
  }
  std::vector<A> sum(hid);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < hid; ++j) sum[j] = hp[i * hid + j] + hp[(n + i) * hid + j];
    for (int64_t ch = 0; ch < c; ++ch) {
      const A z = dot_short(w2p + ch * hid, sum.data(), hid) + (b2p ? 2 * b2p[ch] : A(0));
      gp[i * c + ch] = A(1) / (A(1) + std::exp(-z));
    }
  }
}

// The channel gate: pooled descriptors D = [mean_hw; max_hw](x) (2N, C), the MLP's hidden layer
// H = relu(D w1^T + b1) (2N, C/r) and g = sigmoid(Z_avg + Z_max) with Z = H w2^T + b2, computed as
// sigmoid((H_avg + H_max) w2^T + 2 b2) (mlp_gate); with with_index, each channel's max pixel (N, C).
struct ChannelGate {
  at::Tensor descriptors, hidden, g, idx;
};

ChannelGate channel_gate(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                         const at::Tensor& w2, const std::optional<at::Tensor>& b2, bool with_index) {
  check(x, "x", 4);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3), hid = w1.size(0);
  TORCH_CHECK(w1.numel() == hid * c && w2.numel() == c * hid, "expected MLP weights (C/r, C) and (C, C/r)");
  const auto w1c = w1.contiguous(), w2c = w2.contiguous();
  auto descriptors = at::empty({2 * n, c}, acc_options(x));
  auto hidden = at::empty({2 * n, hid}, acc_options(x));
  auto g = at::empty({n, c}, acc_options(x));
  auto idx = with_index ? at::empty({n, c}, x.options().dtype(at::kLong)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "channel_gate", [&] {
    using A = Acc<scalar_t>;
    A* d = descriptors.data_ptr<A>();
    row_mean_max<scalar_t>(x.data_ptr<scalar_t>(), n * c, hw, d, d + n * c,
                           with_index ? idx.data_ptr<int64_t>() : nullptr);
    mlp_gate<A>(d, n, c, w1c, b1, w2c, b2, hidden.data_ptr<A>(), g.data_ptr<A>());
  });
  return {descriptors, hidden, g, idx};
}

// The small operands (parameters, gates, descriptors) as the passes read them, contiguous: a model
// moved to channels_last has a channels_last spatial weight, and inductor may lay out a compiled
// graph's inputs any way (the operators are flexible_layout). Done here, where it is free for
// contiguous ones, rather than by the Python caller, where every call between a network's large ops
// costs microseconds with cold caches.
at::Tensor dense(const at::Tensor& t) { return t.contiguous(); }
std::optional<at::Tensor> dense(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// What cbam_infer and cbam_train take, else an error naming the function: x a non-empty
// contiguous float32/float64/bfloat16 CPU tensor (N, C, H, W) (or channels_last-contiguous, where
// channels_last is set) with C = w2's rows, the parameters
// contiguous CPU tensors of x's compute type (float32 for bfloat16 x, as under autocast; dense).
void check_call(const char* name, const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                const at::Tensor& w2, const std::optional<at::Tensor>& b2, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, bool channels_last = false) {
  const auto type = x.scalar_type();
  const bool layout = x.is_contiguous() || (channels_last && x.is_contiguous(at::MemoryFormat::ChannelsLast));
  TORCH_CHECK((type == at::kFloat || type == at::kDouble || type == at::kBFloat16) && x.dim() == 4 &&
                  x.numel() > 0 && x.device().is_cpu() && layout,
              name, ": x must be a non-empty ", channels_last ? "NCHW- or channels_last-" : "",
              "contiguous float32/float64/bfloat16 CPU tensor (N, C, H, W)");
  const auto fits = [&](const at::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == at::toOpMathType(type) && t.is_contiguous();
  };
  const auto fits_optional = [&](const std::optional<at::Tensor>& t) { return !t || fits(*t); };
  TORCH_CHECK(fits(w1) && fits(w2) && fits(weight) && fits_optional(b1) && fits_optional(b2) && fits_optional(bias),
              name, ": the parameters must be contiguous CPU tensors of x's dtype (float32 for bfloat16 x)");
  TORCH_CHECK(w2.size(0) == x.size(1), name, ": x has ", x.size(1), " channels, the MLP ", w2.size(0));
}

// Over the pixels [p0, p1) of a channels_last image, nv * lanes + rest consecutive channels (x: the
// first of them at pixel 0; a pixel's channels c apart), nv <= kNv vectors of them kept in
// registers: each channel's sum added to part (in Acc<T>) and its running max to max. With kIndex,
// a lane that beats its channel's max (the first maximal pixel, NaN counting as maximal, as
// torch.max) records the pixel in arg.
constexpr int kNv = 4;

template <typename T, int NV, bool kIndex>
void channel_stats_cl(const T* x, int64_t c, int64_t p0, int64_t p1, int64_t rest, Acc<T>* part, Acc<T>* max,
                      int64_t* arg) {
  using A = Acc<T>;
  using Vec = AccVec<T>;
  constexpr int64_t kLanes = Vec::size();
  constexpr uint64_t kAll = (uint64_t(1) << kLanes) - 1;
  Vec vs[NV > 0 ? NV : 1], vm[NV > 0 ? NV : 1];
  for (int u = 0; u < NV; ++u) {
    vs[u] = Vec::loadu(part + u * kLanes);
    vm[u] = Vec::loadu(max + u * kLanes);
  }
  A* tail = part + NV * kLanes;
  A* top = max + NV * kLanes;
  for (int64_t p = p0; p < p1; ++p) {
    const T* row = x + p * c;
    prefetch_ahead<kPrefetchBytesCl, 1>(row, NV * kLanes + rest);
    for (int u = 0; u < NV; ++u) {
      const Vec v = load_acc(row + u * kLanes);
      vs[u] = vs[u] + v;
      if constexpr (!kIndex) {
        vm[u] = at::vec::maximum(vm[u], v);  // NaN-propagating
      } else {
        // zero_mask marks the lanes that compare unequal (a true comparison sets every bit)
        const Vec mask = beats(v, vm[u]);
        const auto up = ~static_cast<uint64_t>(mask.zero_mask()) & kAll;
        if (!up) continue;
        vm[u] = Vec::blendv(vm[u], v, mask);
        for (int64_t l = 0; l < kLanes; ++l) {
          if ((up >> l) & 1) arg[u * kLanes + l] = p;
        }
      }
    }
    for (int64_t j = 0; j < rest; ++j) {
      const A v = row[NV * kLanes + j];
      tail[j] += v;
      if (beats(v, top[j])) {
        top[j] = v;
        if constexpr (kIndex) arg[NV * kLanes + j] = p;
      }
    }
  }
  for (int u = 0; u < NV; ++u) {
    vs[u].store(part + u * kLanes);
    vm[u].store(max + u * kLanes);
  }
}

template <typename T, bool kIndex>
void channel_stats_cl(const T* x, int64_t c, int64_t p0, int64_t p1, int64_t len, Acc<T>* part, Acc<T>* max,
                      int64_t* arg) {
  constexpr int64_t kLanes = AccVec<T>::size();
  const int64_t rest = len % kLanes;
  switch (len / kLanes) {
    case 0: return channel_stats_cl<T, 0, kIndex>(x, c, p0, p1, rest, part, max, arg);
    case 1: return channel_stats_cl<T, 1, kIndex>(x, c, p0, p1, rest, part, max, arg);
    case 2: return channel_stats_cl<T, 2, kIndex>(x, c, p0, p1, rest, part, max, arg);
    case 3: return channel_stats_cl<T, 3, kIndex>(x, c, p0, p1, rest, part, max, arg);
    default: return channel_stats_cl<T, kNv, kIndex>(x, c, p0, p1, rest, part, max, arg);
  }
}

// The bytes of a tile of pixel rows in channel_descriptors_cl: small enough that the tile stays in
// L1 while each of its blocks of channels is read in turn.
constexpr int64_t kStatsTileBytes = 16 * 1024;

// The channel descriptors of channels_last x (N, HW, C in memory) into d (2N, C: means, then maxima),
// with idx each channel's first max pixel. A task takes an image and a group of blocks of kNv
// vectors of channels (more than one group per image only where there are fewer images than
// tasks to give the threads) and reads its pixels in tiles of rows: each block's channels of the
// tile in registers (channel_stats_cl), then the next block's. Its memory is read in order, as
// the hardware prefetcher expects; a pass over the image per block read part of every row, and
// the prefetcher fetched the rest. As in row_mean_max, each chunk of kChunk pixels is summed in
// Acc<T> before being added to a double, in pixel order.
template <typename T>
void channel_descriptors_cl(const T* x, int64_t n, int64_t c, int64_t hw, Acc<T>* d, int64_t* idx) {
  using A = Acc<T>;
  const int64_t block = std::min<int64_t>(c, kNv * AccVec<T>::size()), blocks = (c + block - 1) / block;
  const int64_t groups = std::min(blocks, std::max<int64_t>(1, (2 * at::get_num_threads() + n - 1) / n));
  const int64_t per_group = (blocks + groups - 1) / groups;  // the most blocks a group gets
  at::parallel_for(0, n * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> total(per_group * block);
    std::vector<A> part(per_group * block), max(per_group * block);
    std::vector<int64_t> arg(per_group * block);
    for (int64_t t = begin; t < end; ++t) {
      // blocks split evenly: every group gets at least one (groups <= blocks)
      const int64_t bi = t / groups, b0 = (t % groups) * blocks / groups, b1 = (t % groups + 1) * blocks / groups;
      const int64_t c0 = b0 * block, c1 = std::min(c, b1 * block), len = c1 - c0;
      const int64_t tile = std::max<int64_t>(1, kStatsTileBytes / (len * int64_t(sizeof(T))));
      const T* image = x + bi * hw * c;
      std::fill(total.begin(), total.end(), 0.0);
      std::fill(max.begin(), max.end(), -std::numeric_limits<A>::infinity());
      std::fill(arg.begin(), arg.end(), int64_t(0));
      for (int64_t q0 = 0; q0 < hw; q0 += kChunk) {
        const int64_t q1 = std::min(hw, q0 + kChunk);
        std::fill(part.begin(), part.end(), A(0));
        for (int64_t p0 = q0; p0 < q1; p0 += tile) {
          const int64_t p1 = std::min(q1, p0 + tile);
          for (int64_t cb = c0; cb < c1; cb += block) {
            const int64_t o = cb - c0, width = std::min(block, c1 - cb);
            if (idx) {
              channel_stats_cl<T, true>(image + cb, c, p0, p1, width, part.data() + o, max.data() + o, arg.data() + o);
            } else {
              channel_stats_cl<T, false>(image + cb, c, p0, p1, width, part.data() + o, max.data() + o, nullptr);
            }
          }
        }
        for (int64_t j = 0; j < len; ++j) total[j] += part[j];
      }
      for (int64_t j = 0; j < len; ++j) {
        d[bi * c + c0 + j] = static_cast<A>(total[j] / hw);
        d[(n + bi) * c + c0 + j] = max[j];
        if (idx) idx[bi * c + c0 + j] = arg[j];
      }
    }
  });
}

// The no-grad and the training forward for channels_last x (memory N, H, W, C): the channel
// descriptors (with idx, each channel's first max pixel; channel_descriptors_cl), then the MLP,
// then attend, which streams blocks of rows as for NCHW (the pooled rows, the convolution and the
// scaled rows in cache together) and reads each pixel's channels as one row. Inductor lays
// convolution activations out channels_last on CPU, and so do users who train that way: a kernel
// that took NCHW only would cost a copy into and out of that layout around every CBAM.
struct ForwardChannelsLast {
  at::Tensor descriptors, hidden, g, idx, s, pooled;
};

ForwardChannelsLast forward_channels_last(const at::Tensor& x, const at::Tensor& w1,
                                          const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                          const std::optional<at::Tensor>& b2, const at::Tensor& weight, double a,
                                          double shift, bool residual, const at::Tensor& out, bool with_index) {
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3), hid = w1.size(0);
  TORCH_CHECK(w1.numel() == hid * c && w2.numel() == c * hid, "expected MLP weights (C/r, C) and (C, C/r)");
  auto descriptors = at::empty({2 * n, c}, acc_options(x));
  auto hidden = at::empty({2 * n, hid}, acc_options(x));
  auto g = at::empty({n, c}, acc_options(x));
  auto idx = with_index ? at::empty({n, c}, x.options().dtype(at::kLong)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "forward_channels_last", [&] {
    using T = scalar_t;
    using A = Acc<T>;
    const T* xp = x.data_ptr<T>();
    A* d = descriptors.data_ptr<A>();
    channel_descriptors_cl<T>(xp, n, c, hw, d, with_index ? idx.data_ptr<int64_t>() : nullptr);
    mlp_gate<A>(d, n, c, w1, b1, w2, b2, hidden.data_ptr<A>(), g.data_ptr<A>());
  });
  auto [s, pooled] = attend(x, g, weight, a, shift, residual, out, with_index);
  return {descriptors, hidden, g, idx, s, pooled};
}

// The whole no-grad forward, s = sigmoid(a * (conv(P) + bias) + b): the channel gate, then attend,
// into x itself with inplace (its version bumped, as by any in-place op). The caller
// (CBAM's implementation selector) sends only what this takes (check_call); anything else is an
// error here, never a silent other path.
at::Tensor cbam_infer(const at::Tensor& x, const at::Tensor& w1_, const std::optional<at::Tensor>& b1_,
                      const at::Tensor& w2_, const std::optional<at::Tensor>& b2_, const at::Tensor& weight_,
                      const std::optional<at::Tensor>& bias_, double a, double b, bool residual, bool inplace) {
  const auto w1 = dense(w1_), w2 = dense(w2_), weight = dense(weight_);
  const auto b1 = dense(b1_), b2 = dense(b2_), bias = dense(bias_);
  check_call("cbam_infer", x, w1, b1, w2, b2, weight, bias, true);
  const double shift = a * (bias ? bias->item<double>() : 0.0) + b;
  const at::Tensor out = inplace ? x : at::empty_like(x);  // of x's layout
  if (x.is_contiguous()) {
    attend(x, channel_gate(x, w1, b1, w2, b2, false).g, weight, a, shift, residual, out, false);
  } else {
    forward_channels_last(x, w1, b1, w2, b2, weight, a, shift, residual, out, false);
  }
  if (inplace) x.unsafeGetTensorImpl()->bump_version();
  return out;
}

// A dense CPU tensor and nothing else: no keys beyond an ordinary tensor's (a functorch wrapper, a
// functional or Python subclass tensor, conjugate or negative views carry more).
bool plain(const at::Tensor& t) {
  // spelled out: a tensor made here would lack the autograd keys under inference_mode
  static const c10::DispatchKeySet ordinary{c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView,
                                            c10::DispatchKey::AutogradCPU, c10::DispatchKey::AutocastCPU};
  return t.device().is_cpu() && t.layout() == at::kStrided && ordinary.isSupersetOf(t.key_set());
}

// Whether the kernels take the call: what CBAM._choose sends to them (the tests check that the two
// agree on every kind of input), with everything a mode or a transform would need the dispatcher
// for left to the operators' path. With no_grad, nothing may record a gradient (cbam_infer_eager);
// without, the caller records one (CBAM's training function around cbam_train).
bool eager_takes(const at::Tensor& x, std::initializer_list<const at::Tensor*> params, const at::Tensor& w2,
                 bool no_grad) {
  if (!x.defined() || !plain(x) || x.dim() != 4 || x.numel() == 0 || x.size(1) != w2.size(0)) return false;
  if (!(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast))) return false;
  // keys switched on for every call (functorch's transforms and Python modes add theirs)
  static const c10::DispatchKeySet always{c10::DispatchKey::BackendSelect, c10::DispatchKey::ADInplaceOrView};
  if (at::impl::torch_function_mode_enabled() || c10::impl::TorchDispatchModeTLS::any_modes_set() ||
      !always.isSupersetOf(c10::impl::tls_local_dispatch_key_set().included_)) {
    return false;
  }
  const auto type = x.scalar_type();
  if (type == at::kBFloat16) {
    if (!at::autocast::is_autocast_enabled(at::kCPU)) return false;  // the formula's error outside autocast
  } else if (type != at::kFloat && type != at::kDouble) {
    return false;
  }
  const bool grad = no_grad && at::GradMode::is_enabled();
  if (grad && x.requires_grad()) return false;
  for (const at::Tensor* p : params) {
    if (!p->defined()) continue;  // an absent bias
    if (!plain(*p) || p->scalar_type() != at::toOpMathType(type) || (grad && p->requires_grad())) return false;
  }
  return true;
}

// The no-grad forward for eager mode, bound to Python directly (pybind11, below) rather than
// through the dispatcher: CBAM calls it between a network's large ops, where with cold caches the
// operator's path (schema matching, dispatch) and Python's own checks of the input cost tens of
// microseconds per call. Returns nothing where it does not take the call (eager_takes); the caller
// then chooses as for any input. The profiler still sees it under the operator's name.
std::optional<at::Tensor> cbam_infer_eager(const at::Tensor& x, const at::Tensor& w1,
                                           const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                           const std::optional<at::Tensor>& b2, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, double a, double b, bool residual,
                                           bool inplace) {
  const at::Tensor none;
  if (!eager_takes(x, {&w1, b1 ? &*b1 : &none, &w2, b2 ? &*b2 : &none, &weight, bias ? &*bias : &none}, w2, true)) {
    return std::nullopt;
  }
  RECORD_FUNCTION("smp_cbam_cpu::cbam_infer", std::vector<c10::IValue>());
  return cbam_infer(x, w1, b1, w2, b2, weight, bias, a, b, residual, inplace);
}

// The training forward of a CBAM without spatial BatchNorm (s = sigmoid(conv(P) + bias)): the
// passes of cbam_infer into a new tensor, returning with it what cbam_backward needs.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cbam_train(
    const at::Tensor& x, const at::Tensor& w1_, const std::optional<at::Tensor>& b1_, const at::Tensor& w2_,
    const std::optional<at::Tensor>& b2_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias_,
    bool residual) {
  const auto w1 = dense(w1_), w2 = dense(w2_), weight = dense(weight_);
  const auto b1 = dense(b1_), b2 = dense(b2_), bias = dense(bias_);
  check_call("cbam_train", x, w1, b1, w2, b2, weight, bias, true);
  const double shift = bias ? bias->item<double>() : 0.0;
  auto out = at::empty_like(x);  // of x's layout
  if (!x.is_contiguous()) {
    auto f = forward_channels_last(x, w1, b1, w2, b2, weight, 1.0, shift, residual, out, true);
    return {out, f.descriptors, f.hidden, f.g, f.idx, f.s, f.pooled};
  }
  auto gate = channel_gate(x, w1, b1, w2, b2, true);
  auto [s, pooled] = attend(x, gate.g, weight, 1.0, shift, residual, out, true);
  return {out, gate.descriptors, gate.hidden, gate.g, gate.idx, s, pooled};
}

// y[i] += a * x[i] over [0, len)
template <typename T>
void axpy(T a, const T* x, T* y, int64_t len) {
  using Vec = at::vec::Vectorized<T>;
  int64_t i = 0;
  for (; i + Vec::size() <= len; i += Vec::size()) {
    at::vec::fmadd(Vec(a), Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  }
  for (; i < len; ++i) y[i] += a * x[i];
}

struct MlpGrads {
  at::Tensor d_descriptors, dw1, db1, dw2, db2;
};

// channel_gate's MLP backwards for dL/dg (N, C), in plain loops like its forward: with
// d_S = dL/dg g (1 - g), the gradient of both Z_avg and Z_max, d_H = (d_S w2) * (H > 0) for each
// descriptor row, dL/dD = d_H w1, dw1 = d_H^T D, db1 = sum d_H, dw2 = d_S^T (H_avg + H_max) and
// db2 = 2 sum d_S.
MlpGrads mlp_backward(const at::Tensor& d_g, const at::Tensor& g, const at::Tensor& descriptors,
                      const at::Tensor& hidden, const at::Tensor& w1, const at::Tensor& w2) {
  const int64_t n = g.size(0), c = g.size(1), hid = hidden.size(1);
  const auto opts = g.options();
  MlpGrads out{at::zeros({2 * n, c}, opts), at::zeros({hid, c}, opts), at::zeros({hid}, opts),
               at::zeros({c, hid}, opts), at::zeros({c}, opts)};
  const auto d_gc = d_g.contiguous(), w1c = w1.contiguous(), w2c = w2.contiguous();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "mlp_backward", [&] {
    using T = scalar_t;
    const T* dg = d_gc.data_ptr<T>();
    const T* gp = g.data_ptr<T>();
    const T* dp = descriptors.data_ptr<T>();
    const T* hp = hidden.data_ptr<T>();
    const T* w1p = w1c.data_ptr<T>();
    const T* w2p = w2c.data_ptr<T>();
    T* d_desc = out.d_descriptors.data_ptr<T>();
    T* dw1 = out.dw1.data_ptr<T>();
    T* db1 = out.db1.data_ptr<T>();
    T* dw2 = out.dw2.data_ptr<T>();
    T* db2 = out.db2.data_ptr<T>();
    std::vector<T> d_s(n * c), d_h(2 * n * hid), u(hid), h_sum(hid);
    for (int64_t i = 0; i < n * c; ++i) d_s[i] = dg[i] * gp[i] * (T(1) - gp[i]);
    for (int64_t i = 0; i < n; ++i) {
      std::fill(u.begin(), u.end(), T(0));
      for (int64_t ch = 0; ch < c; ++ch) axpy(d_s[i * c + ch], w2p + ch * hid, u.data(), hid);
      for (int64_t row : {i, n + i}) {
        for (int64_t j = 0; j < hid; ++j) d_h[row * hid + j] = u[j] * static_cast<T>(hp[row * hid + j] > 0);
      }
      for (int64_t j = 0; j < hid; ++j) h_sum[j] = hp[i * hid + j] + hp[(n + i) * hid + j];
      for (int64_t ch = 0; ch < c; ++ch) {
        axpy(d_s[i * c + ch], h_sum.data(), dw2 + ch * hid, hid);
        db2[ch] += 2 * d_s[i * c + ch];
      }
    }
    for (int64_t row = 0; row < 2 * n; ++row) {
      for (int64_t j = 0; j < hid; ++j) {
        const T a = d_h[row * hid + j];
        axpy(a, w1p + j * c, d_desc + row * c, c);
        axpy(a, dp + row * c, dw1 + j * c, c);
        db1[j] += a;
      }
    }
  });
  return out;
}

// The end of pass 1 of backward_channels_last for one pixel: its channels [j, c) one at a time
// after the vector lanes (d_s, the sums of G x s per channel, the first max of x g), then its
// d_u, max channel and x there.
template <typename T>
inline void gate_pixel_tail(const T* row, const T* grow, const Acc<T>* gb, Acc<T> sq, int64_t j, int64_t c, Acc<T> ds,
                            Acc<T> best, int64_t best_ch, Acc<T>* acc, Acc<T>* du, int64_t* arg, Acc<T>* x_at) {
  using A = Acc<T>;
  for (; j < c; ++j) {
    const A xi = row[j], gx = static_cast<A>(grow[j]) * xi, y = xi * gb[j];
    ds += gx * gb[j];
    acc[j] += gx * sq;
    if (beats(y, best)) {
      best = y;
      best_ch = j;
    }
  }
  *du = ds * sq * (A(1) - sq);
  *arg = best_ch;
  *x_at = static_cast<A>(row[best_ch]);
}

// f(std::integral_constant<int, NV>) for nv full vectors of channels: NV = nv from one to four (the
// passes that keep their per-channel sums in registers), else 0 (sums in memory).
template <typename F>
inline auto with_vectors(int64_t nv, const F& f) {
  switch (nv) {
    case 1: return f(std::integral_constant<int, 1>());
    case 2: return f(std::integral_constant<int, 2>());
    case 3: return f(std::integral_constant<int, 3>());
    case 4: return f(std::integral_constant<int, 4>());
    default: return f(std::integral_constant<int, 0>());
  }
}

// Pass 1 of backward_channels_last for the pixels [p0, p1) of one image (its rows from base = image
// times HW), 16 (8) pixels at a time: their lanes combined by one tree each (combine_pixels) for
// d_s, the max of x g and the max's channel, since three reductions per pixel cost more than its
// row at few channels. The arithmetic per lane is the per-pixel loop's; every pixel of a tile goes
// through the same tree, the last group's missing pixels left out, whatever the thread count. With
// NV > 0 the full vectors of channels number NV, and a group's sums of G x s stay in registers
// (added to acc after the group): through acc in memory, each pixel waited for the previous one's
// store. Returns the first pixel left to that loop (p0 where there is no tree for T).
template <typename T, int NV = 0>
int64_t gate_pixels_cl(const T* xp, const T* gp, const Acc<T>* gb, const Acc<T>* sp, int64_t base, int64_t c,
                       int64_t p0, int64_t p1, Acc<T>* acc, Acc<T>* dup, int64_t* ap, Acc<T>* xap) {
  using A = Acc<T>;
  using Vec = AccVec<T>;
  constexpr int64_t kLanes = Vec::size();
  int64_t p = p0;
#if defined(SMP_CBAM_COMBINE_LANES)
  if constexpr (std::is_same_v<A, float> && kLanes == SMP_CBAM_COMBINE_LANES) {
    const A inf = std::numeric_limits<A>::infinity();
    const Vec lane = Vec::arange(A(0), A(1));
    const int64_t full = NV > 0 ? NV * kLanes : c - c % kLanes;
    const auto add = [](const Vec& a, const Vec& b) { return a + b; };
    const auto top = [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); };
    const auto low = [](const Vec& a, const Vec& b) { return at::vec::minimum(a, b); };
    for (; full > 0 && p < p1; p += kLanes) {
      const int64_t count = std::min(kLanes, p1 - p);
      Vectors<Vec, kLanes> vds, vmax, vbase, channels;
      Vec sums[NV > 0 ? NV : 1];
      for (int64_t v = 0; v < NV; ++v) sums[v] = Vec(A(0));
      for (int64_t k = 0; k < kLanes; ++k) {
        if (k >= count) {
          vds[k] = vmax[k] = vbase[k] = Vec(A(0));
          continue;
        }
        const int64_t q = base + p + k;
        const T* row = xp + q * c;
        const T* grow = gp + q * c;
        const Vec vsq(sp[q]);
        prefetch_ahead<kPrefetchBytesCl, 1>(row, c);
        prefetch_ahead<kPrefetchBytesCl, 1>(grow, c);
        Vec pds(A(0)), pmax(-inf), pbase(A(0));  // this pixel's lanes, in registers
        const auto channel_block = [&](int64_t j) {
          const Vec xv = load_acc(row + j), gx = load_acc(grow + j) * xv, w = Vec::loadu(gb + j);
          pds = pds + gx * w;
          if constexpr (NV > 0) {
            sums[j / kLanes] = sums[j / kLanes] + gx * vsq;
          } else {
            (Vec::loadu(acc + j) + gx * vsq).store(acc + j);
          }
          const Vec y = xv * w, up = beats(y, pmax);
          pmax = Vec::blendv(pmax, y, up);
          pbase = Vec::blendv(pbase, Vec(static_cast<A>(j)), up);
        };
        if constexpr (NV > 0) {
          for (int64_t v = 0; v < NV; ++v) channel_block(v * kLanes);
        } else {
          for (int64_t j = 0; j < full; j += kLanes) channel_block(j);
        }
        vds[k] = pds;
        vmax[k] = pmax;
        vbase[k] = pbase;
      }
      for (int64_t v = 0; v < NV; ++v) (Vec::loadu(acc + v * kLanes) + sums[v]).store(acc + v * kLanes);
      A ds[kLanes], best[kLanes], channel[kLanes];
      combine_pixels(vds.data(), add).store(ds);
      combine_pixels(vmax.data(), top).store(best);  // NaN where any lane holds one
      for (int64_t k = 0; k < kLanes; ++k) {
        const Vec hit = best[k] != best[k] ? vmax[k] != vmax[k] : vmax[k] == Vec(best[k]);
        channels[k] = k < count ? Vec::blendv(Vec(static_cast<A>(c)), vbase[k] + lane, hit) : Vec(A(0));
      }
      combine_pixels(channels.data(), low).store(channel);
      for (int64_t k = 0; k < count; ++k) {
        const int64_t q = base + p + k;
        const T* row = xp + q * c;
        const T* grow = gp + q * c;
        gate_pixel_tail(row, grow, gb, sp[q], full, c, ds[k], best[k], static_cast<int64_t>(channel[k]), acc, dup + q,
                        ap + q, xap + q);
      }
    }
  }
#endif
  return p;
}

// Pass 1 of backward_channels_last for the pixels [p0, p1) of one image (base = image times HW):
// gate_pixels_cl, then the pixels it leaves one at a time, with the same arithmetic per lane.
template <typename T>
void gate_span_cl(const T* xp, const T* gp, const Acc<T>* gb, const Acc<T>* sp, int64_t base, int64_t c, int64_t p0,
                  int64_t p1, Acc<T>* acc, Acc<T>* dup, int64_t* ap, Acc<T>* xap) {
  using A = Acc<T>;
  using Vec = AccVec<T>;
  constexpr int64_t kLanes = Vec::size();
  const A inf = std::numeric_limits<A>::infinity();
  // lanes hold the running max of x g over their channels (the first, NaN counting as maximal) and
  // the block's first channel there; across lanes a tie goes to the lower channel
  const Vec lane = Vec::arange(A(0), A(1));
  int64_t p = with_vectors(c / kLanes, [&](auto nv) {
    return gate_pixels_cl<T, decltype(nv)::value>(xp, gp, gb, sp, base, c, p0, p1, acc, dup, ap, xap);
  });
  for (; p < p1; ++p) {
    const int64_t q = base + p;
    const T* row = xp + q * c;
    const T* grow = gp + q * c;
    const A sq = sp[q];
    prefetch_ahead<kPrefetchBytesCl, 1>(row, c);
    prefetch_ahead<kPrefetchBytesCl, 1>(grow, c);
    Vec vds(A(0)), vmax(-inf), vbase(A(0));
    int64_t j = 0;
    for (; j + kLanes <= c; j += kLanes) {
      const Vec xv = load_acc(row + j), gx = load_acc(grow + j) * xv, w = Vec::loadu(gb + j);
      vds = vds + gx * w;
      (Vec::loadu(acc + j) + gx * Vec(sq)).store(acc + j);
      const Vec y = xv * w, up = beats(y, vmax);
      vmax = Vec::blendv(vmax, y, up);
      vbase = Vec::blendv(vbase, Vec(static_cast<A>(j)), up);
    }
    A ds = j > 0 ? sum_lanes(vds) : A(0);
    A best = -inf;
    int64_t best_ch = 0;
    if (j > 0) {  // in vectors: a per-lane scalar loop here cost more than the channels at small C
      best = max_lanes(vmax);  // NaN where any lane holds one
      const Vec hit = best != best ? vmax != vmax : vmax == Vec(best);
      const Vec channels = Vec::blendv(Vec(static_cast<A>(c)), vbase + lane, hit);
      best_ch = static_cast<int64_t>(min_lanes(channels));
    }
    gate_pixel_tail(row, grow, gb, sq, j, c, ds, best, best_ch, acc, dup + q, ap + q, xap + q);
  }
}

// P's share of dL/dg from the pixels [p0, p1) of one channels_last image (base = image times HW;
// d_avg, d_max: its maps), into one row's dg: sum x d_avg / C, summed in acc first, and x_at d_max
// at each pixel's max channel. With NV > 0 the full vectors of channels number NV and their sums
// stay in registers, two sets for alternate pixels (through acc in memory, each pixel waited for
// the previous one's store).
template <typename T, int NV = 0>
void pool_share_cl(const T* xp, const Acc<T>* d_avg, const Acc<T>* d_max, const int64_t* ap, const Acc<T>* xap,
                   int64_t base, int64_t c, int64_t p0, int64_t p1, Acc<T>* acc, double* dg) {
  using A = Acc<T>;
  using Vec = AccVec<T>;
  constexpr int64_t kLanes = Vec::size();
  std::fill(acc, acc + c, A(0));
  const int64_t full = NV > 0 ? NV * kLanes : c - c % kLanes;
  const auto tail = [&](const T* row, int64_t p) {
    for (int64_t j = full; j < c; ++j) acc[j] += static_cast<A>(row[j]) * d_avg[p];
    dg[ap[base + p]] += xap[base + p] * d_max[p];
  };
  int64_t p = p0;
  if constexpr (NV > 0) {
    Vec even[NV], odd[NV];
    for (int64_t v = 0; v < NV; ++v) even[v] = odd[v] = Vec(A(0));
    for (; p + 1 < p1; p += 2) {
      const T* row = xp + (base + p) * c;
      const Vec da(d_avg[p]), db(d_avg[p + 1]);
      for (int64_t v = 0; v < NV; ++v) {
        even[v] = even[v] + load_acc(row + v * kLanes) * da;
        odd[v] = odd[v] + load_acc(row + c + v * kLanes) * db;
      }
      tail(row, p);
      tail(row + c, p + 1);
    }
    for (int64_t v = 0; v < NV; ++v) (even[v] + odd[v]).store(acc + v * kLanes);
  }
  for (; p < p1; ++p) {
    const T* row = xp + (base + p) * c;
    const Vec da(d_avg[p]);
    for (int64_t j = 0; j < full; j += kLanes) (Vec::loadu(acc + j) + load_acc(row + j) * da).store(acc + j);
    tail(row, p);
  }
  for (int64_t ch = 0; ch < c; ++ch) dg[ch] += static_cast<double>(acc[ch]) / c;
}

// cbam_backward for channels_last x (memory N, H, W, C), the NCHW passes' arithmetic over pixel
// rows, streamed like gate_pass: for each block of rows, (1) per pixel d_s = sum_c G x g, hence
// d_u = d_s s (1 - s), the channel of max_c x g with x there, and per channel sum G x s
// (gate_span_cl); then, for the rows whose neighbourhood of d_u is complete (r = k / 2 rows behind),
// (2) d_P by the flipped kernel and (3) P's share of dL/dg (pool_share_cl) while those rows of x are
// still in cache; then (4) the MLP backwards and (5) dL/dx as input_grad gives it, in x's layout. A
// separate pass for (3) read all of x a second time. The sums of dL/dg run in Acc<T> over an image
// row, then in double over the rows in order, so they do not depend on how the rows are split among
// threads (dL/dbias, ATen's sum of d_u, may).
std::vector<at::Tensor> backward_channels_last(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& descriptors,
                                               const at::Tensor& hidden, const at::Tensor& g, const at::Tensor& idx_c,
                                               const at::Tensor& s, const at::Tensor& pooled, const at::Tensor& w1,
                                               const at::Tensor& w2, const at::Tensor& weight, bool residual,
                                               bool with_input_grad) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), wd = x.size(3), hw = h * wd;
  TORCH_CHECK(c <= (int64_t(1) << 24), "cbam_backward supports at most 2^24 channels, got ", c);
  const auto gr = grad.contiguous(at::MemoryFormat::ChannelsLast);
  const auto sc = s.contiguous(), pc = pooled.contiguous();
  const int64_t k = weight.size(3), r = k / 2, ld = wd + 2 * r + kBlockX, plane = (h + 2 * r) * ld;
  const Segments split(n, h, r);
  const int64_t seg_rows = split.rows, segs = split.count;
  auto pad = at::zeros({n, h + 2 * r, ld}, acc_options(x));  // d_u with a zero border
  auto d_u = at::empty({n, hw}, acc_options(x));
  auto d_pooled = at::zeros({n, 2, hw}, acc_options(x));
  auto arg = at::empty({n, hw}, x.options().dtype(at::kLong));
  auto x_at = at::empty({n, hw}, acc_options(x));
  auto d_g_rows = at::zeros({n, h, c}, x.options().dtype(at::kDouble));
  at::Tensor d_weight;
  MlpGrads mlp;
  auto dx = at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "backward_channels_last", [&] {
    using T = scalar_t;
    using A = Acc<T>;
    using Vec = AccVec<T>;
    constexpr int64_t kLanes = Vec::size();
    const T* gp = gr.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    const A* gate = g.data_ptr<A>();
    const A* sp = sc.data_ptr<A>();
    A* pp = pad.data_ptr<A>();
    A* dup = d_u.data_ptr<A>();
    A* dp = d_pooled.data_ptr<A>();
    int64_t* ap = arg.data_ptr<int64_t>();
    A* xap = x_at.data_ptr<A>();
    double* dgr = d_g_rows.data_ptr<double>();
    std::vector<A> taps(2 * k * k);  // the kernel turned by 180 degrees: the adjoint
    const A* w = weight.data_ptr<A>();
    for (int64_t ch = 0; ch < 2; ++ch) std::reverse_copy(w + ch * k * k, w + (ch + 1) * k * k, taps.data() + ch * k * k);
    // pass 1 over rows [y0, y1) of image bi, a row at a time (its sums into its row of d_g_rows
    // where sums is set), with d_u into the map for the rows [own0, own1)
    auto gate_rows = [&](int64_t bi, int64_t y0, int64_t y1, int64_t own0, int64_t own1, A* acc, bool sums) {
      for (int64_t y = y0; y < y1; ++y) {
        std::fill(acc, acc + c, A(0));
        gate_span_cl<T>(xp, gp, gate + bi * c, sp, bi * hw, c, y * wd, (y + 1) * wd, acc, dup, ap, xap);
        if (sums) {
          double* row = dgr + (bi * h + y) * c;
          for (int64_t ch = 0; ch < c; ++ch) row[ch] += acc[ch];
        }
        if (y >= own0 && y < own1) {
          std::copy(dup + bi * hw + y * wd, dup + bi * hw + (y + 1) * wd, pp + bi * plane + (y + r) * ld + r);
        }
      }
    };
    // the rows at each segment's borders that its neighbours read
    at::parallel_for(0, n * segs, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> acc(c);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bi = t / segs, seg = t % segs, y0 = seg * seg_rows, y1 = std::min(h, y0 + seg_rows);
        const int64_t top = std::min(y0 + r, y1), bottom = std::max(y1 - r, y0);
        if (seg > 0) gate_rows(bi, y0, top, y0, top, acc.data(), false);
        if (seg < segs - 1) gate_rows(bi, bottom, y1, bottom, y1, acc.data(), false);
      }
    });
    // blocks of G and x of about kBlockBytes, but at least a tile of pixels
    const int64_t block_rows = std::max(kBlockBytes / (2 * c * wd * int64_t(sizeof(T))), (kTile + wd - 1) / wd);
    at::parallel_for(0, n * segs, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> acc(c);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bi = t / segs, seg = t % segs, y0 = seg * seg_rows, y1 = std::min(h, y0 + seg_rows);
        const int64_t own0 = seg > 0 ? std::min(y0 + r, y1) : y0, own1 = seg < segs - 1 ? std::max(y1 - r, y0) : y1;
        const A* d_avg = dp + bi * 2 * hw;
        const A* d_max = d_avg + hw;
        int64_t done = y0;  // rows of d_P and of P's share done
        for (int64_t q0 = y0; q0 < y1; q0 += block_rows) {
          const int64_t q1 = std::min(q0 + block_rows, y1);
          gate_rows(bi, q0, q1, own0, own1, acc.data(), true);
          const int64_t ready = q1 == y1 ? y1 : std::max(done, q1 - r);
          if (ready == done) continue;
          for (int64_t ch = 0; ch < 2; ++ch) {
            correlate_rows(pp + bi * plane + done * ld, ld, taps.data() + ch * k * k, k, 0, ready - done, wd,
                           dp + (bi * 2 + ch) * hw + done * wd);
          }
          for (int64_t y = done; y < ready; ++y) {
            with_vectors(c / kLanes, [&](auto nv) {
              pool_share_cl<T, decltype(nv)::value>(xp, d_avg + y * wd, d_max + y * wd, ap, xap, bi * hw + y * wd, c,
                                                     0, wd, acc.data(), dgr + (bi * h + y) * c);
            });
          }
          done = ready;
        }
      }
    });
    // the convolution's weight gradient, from the whole d_u map
    d_weight = conv_weight_grad(d_u.view({n, 1, h, wd}), pc, weight);
    // 4. the MLP
    mlp = mlp_backward(d_g_rows.sum(1).to(d_u.scalar_type()), g, descriptors, hidden, w1, w2);
    if (!with_input_grad) return;
    // 5. dL/dx = g (G s + d_avg_s / C) + d_avg_c / HW (+ G) + g d_max_s at the pixel's max channel,
    // then d_max_c added at each channel's max pixel, rounded as input_grad rounds
    dx = at::empty_like(x);  // channels_last, like x
    const auto base = (mlp.d_descriptors.narrow(0, 0, n) / static_cast<double>(hw)).contiguous();
    const auto d_max_c = mlp.d_descriptors.narrow(0, n, n).contiguous();
    const A* bp = base.data_ptr<A>();
    const A* dmc = d_max_c.data_ptr<A>();
    const int64_t* icp = idx_c.data_ptr<int64_t>();
    T* out = dx.data_ptr<T>();
    const A inv_c = A(1) / static_cast<A>(c);
    at::parallel_for(0, n * hw, kTile, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t bi = q / hw, p = q % hw;
        const T* grow = gp + q * c;
        const A* gb = gate + bi * c;
        const A* bb = bp + bi * c;
        T* orow = out + q * c;
        const A sq = sp[q], da = dp[bi * 2 * hw + p], dm = dp[(bi * 2 + 1) * hw + p];
        prefetch_ahead<kPrefetchBytesCl, 1>(grow, c);
        const Vec sv(sq), dav(da), inv(inv_c);
        const auto value = [&](int64_t ch) {
          const A gi = grow[ch];
          A v = (gi * sq + da * inv_c) * gb[ch] + bb[ch];
          if (residual) v += gi;
          return v;
        };
        int64_t j = 0;
        for (; j + kLanes <= c; j += kLanes) {
          const Vec gv = load_acc(grow + j);
          Vec v = (gv * sv + dav * inv) * Vec::loadu(gb + j) + Vec::loadu(bb + j);
          if (residual) v = v + gv;
          store_acc(v, orow + j);
        }
        for (; j < c; ++j) orow[j] = static_cast<T>(value(j));
        const int64_t a = ap[q];  // the max channel's element again, with its share, rounded once
        orow[a] = static_cast<T>(value(a) + gb[a] * dm);
      }
    });
    // a second rounding, in bfloat16, of one element per channel
    for (int64_t b = 0; b < n; ++b) {
      for (int64_t ch = 0; ch < c; ++ch) {
        T& at_max = out[(b * hw + icp[b * c + ch]) * c + ch];
        at_max = static_cast<T>(static_cast<A>(at_max) + dmc[b * c + ch]);
      }
    }
  });
  return {dx, mlp.dw1.view_as(w1), mlp.db1, mlp.dw2.view_as(w2), mlp.db2, d_weight, d_u.sum().view({1})};
}

// Gradients of cbam_train for G = dL/dout: [dx (empty unless with_input_grad), dw1, db1, dw2, db2,
// dweight, dbias]. With the forward's names, u = conv(P) + bias and S = (Z_avg + Z_max):
//   dL/ds, dL/dg (through y = x g)            gate_pass, streaming the next two
//   dL/du = dL/ds s (1 - s); dL/dP              (dweight: conv_weight_grad; dbias = sum dL/du)
//   dL/dg += (through P)
//   dL/dS = dL/dg g (1 - g), the same for Z_avg and Z_max; the MLP's layers backwards by hand
//   dL/dx                                       input_grad
std::vector<at::Tensor> cbam_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& descriptors_,
                                      const at::Tensor& hidden_, const at::Tensor& g_, const at::Tensor& idx_c_,
                                      const at::Tensor& s_, const at::Tensor& pooled_, const at::Tensor& w1_,
                                      const at::Tensor& w2_, const at::Tensor& weight_, bool residual,
                                      bool with_input_grad) {
  const auto descriptors = dense(descriptors_), hidden = dense(hidden_), g = dense(g_), idx_c = dense(idx_c_);
  const auto s = dense(s_), pooled = dense(pooled_), w1 = dense(w1_), w2 = dense(w2_), weight = dense(weight_);
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return backward_channels_last(grad, x, descriptors, hidden, g, idx_c, s, pooled, w1, w2, weight, residual,
                                  with_input_grad);
  }
  check(x, "x", 4);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), wd = x.size(3);
  const auto grad4 = grad.contiguous();
  auto [d_g, d_u, d_pooled, idx_s] = gate_pass(grad4, x, g, s, weight);
  const auto d_weight = conv_weight_grad(d_u.view({n, 1, h, wd}), pooled, weight);

  const auto mlp = mlp_backward(d_g, g, descriptors, hidden, w1, w2);
  auto dx = at::empty({0}, x.options());
  if (with_input_grad) {
    dx = input_grad(grad4.view({n, c, h * wd}), g, s, d_pooled, idx_s, mlp.d_descriptors.narrow(0, 0, n),
                    mlp.d_descriptors.narrow(0, n, n), idx_c, residual)
             .view_as(x);
  }
  return {dx, mlp.dw1.view_as(w1), mlp.db1, mlp.dw2.view_as(w2), mlp.db2, d_weight, d_u.sum().view({1})};
}

}  // namespace

// The namespace smp_cbam_cpu: smp_cbam.attention.ops registers the operators that torch.compile and
// torch.export see (smp_cbam::...), with fake implementations, over these.
TORCH_LIBRARY(smp_cbam_cpu, m) {
  m.def("channel_pool", &channel_pool);
  m.def("spatial_pool", &spatial_pool);
  m.def("scale", &scale);
  m.def("gate_grads", &gate_grads);
  m.def("pool_gate_grad", &pool_gate_grad);
  m.def("input_grad", &input_grad);
  m.def("spatial_conv", &spatial_conv);
  m.def("spatial_conv_backward", &spatial_conv_backward);
  m.def("cbam_train", &cbam_train);
  m.def("cbam_backward", &cbam_backward);
  m.def("cbam_infer(Tensor(a!) x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor weight, Tensor? bias, "
        "float a, float b, bool residual, bool inplace) -> Tensor",
        &cbam_infer);
}

// The eager binding, with the GIL released while the kernels run (as the dispatcher's Python
// binding releases it); the module also registers the operators above when imported.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cbam_infer_eager", &cbam_infer_eager, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "CBAM's no-grad forward where the kernels take it, else None");
  m.def(
      "cbam_takes",
      [](const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
         const std::optional<at::Tensor>& b2, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
        const at::Tensor none;
        return eager_takes(x, {&w1, b1 ? &*b1 : &none, &w2, b2 ? &*b2 : &none, &weight, bias ? &*bias : &none}, w2,
                           false);
      },
      "Whether the kernels take a training call (CBAM records the gradient around cbam_train)");
  // the operators' kernels for the smp_cbam:: operators' CPU implementations (attention/ops.py),
  // which run inside the dispatcher already: a second trip through it costs as much again
  const auto release = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("cbam_infer", &cbam_infer, release);
  m.def("cbam_train", &cbam_train, release);
  m.def("cbam_backward", &cbam_backward, release);
}
