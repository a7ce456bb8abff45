// The top-k / top-p floor of sampled rows on CPU as an XLA FFI custom call
// (llama2_jax/model/cpu_kernels.py builds and registers it; llama2_jax/inference/sampling.py
// calls it for every sampled row, in place of its candidates and bisection).
//
// For each row of x [B, V] float32 (logits over the temperature) with k [B] int32 (1..V; V:
// no top-k), top_p [B] float32 and want [B] int32 (0: the row is not sampled, its floor is
// -inf): the smallest value v of the row such that the tokens x > v that top-k keeps carry at
// most top_p of the top-k tokens' mass (Meta's top-p: a token stays while the mass before it
// is at most top_p). With top_p >= 1 the floor is top-k's: the k-th largest value. Tokens
// x >= floor are kept. The same floor as sampling.py's bisection, found in three passes over
// the row instead of 32: the masses exp(x - max), the mass of each of 4096 buckets of values
// (by the top bits of their float32 order), then the values of the one bucket where the
// floor lies, sorted (masses summed in float64; the bisection sums in float32).
//
// Why: with a flat distribution (top-p over thousands of tokens) the bisection's 32 masked
// sums over [B, 32000] cost a 16-row step ~4 ms on XLA:CPU (benchmarks/RESULTS.md).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 (0 below -87.3, where float32's exp underflows): 2^(x log2 e) split
// into 2^n 2^f, f in [-1/2, 1/2], 2^f by its Taylor polynomial of degree 6 (relative error
// ~1.2e-7). Written so that the loop over a row vectorises, which std::exp does not.
inline float exp_nonpositive(float x) {
  if (!(x > -87.3f)) return 0.0f;
  const float y = x * 1.44269504088896341f;
  const float n = std::floor(y + 0.5f);
  const float f = y - n;
  float p = 1.5403530e-4f;  // ln(2)^k / k!, k = 6 .. 0
  p = p * f + 1.3333558e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// The float32 value's order as uint32 (NaN is not asked for: cleaned to -inf first).
inline uint32_t order_key(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return (bits >> 31) ? ~bits : bits | 0x80000000u;
}

constexpr int kBucketShift = 20;  // 4096 buckets of the keys' top 12 bits

struct Scratch {
  std::vector<float> x, w, tmp;
  std::vector<double> mass;
  std::vector<std::pair<float, float>> inside;  // (value, w) of the bucket the floor is in
};

float row_floor(const float* row, int64_t V, int64_t k, float top_p, Scratch& sc) {
  sc.x.assign(row, row + V);  // NaN as -inf: the selections below need an order
  for (float& v : sc.x)
    if (std::isnan(v)) v = kNegInf;
  const float* x = sc.x.data();
  float kth = kNegInf;
  if (k < V) {
    sc.tmp.assign(x, x + V);
    std::nth_element(sc.tmp.begin(), sc.tmp.begin() + (k - 1), sc.tmp.end(),
                     std::greater<float>());
    kth = sc.tmp[k - 1];
  }
  const float top = *std::max_element(x, x + V);
  if (top_p >= 1.0f) return k < V ? kth : *std::min_element(x, x + V);
  if (top == kNegInf) return kNegInf;  // nothing has any mass: keep all
  // The mass of each token top-k keeps (others 0), and of each bucket of values. A token
  // without mass is never the floor: the mass above it is all of it, more than top_p's.
  sc.w.resize(V);
  float* w = sc.w.data();
  for (int64_t i = 0; i < V; ++i) w[i] = x[i] >= kth ? exp_nonpositive(x[i] - top) : 0.0f;
  sc.mass.assign(size_t{1} << (32 - kBucketShift), 0.0);
  double total = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    sc.mass[order_key(x[i]) >> kBucketShift] += w[i];
    total += w[i];
  }
  const double target = static_cast<double>(top_p) * total;
  // The floor is the value at which the mass at or above it first exceeds the target: find
  // its bucket from the top, then walk that bucket's values in order.
  double above = 0.0;
  int64_t bucket = static_cast<int64_t>(sc.mass.size()) - 1;
  for (; bucket > 0 && above + sc.mass[bucket] <= target; --bucket) above += sc.mass[bucket];
  sc.inside.clear();
  for (int64_t i = 0; i < V; ++i)
    if (w[i] > 0.0f && (order_key(x[i]) >> kBucketShift) == static_cast<uint32_t>(bucket))
      sc.inside.emplace_back(x[i], w[i]);
  std::sort(sc.inside.begin(), sc.inside.end(),
            [](const auto& a, const auto& b) { return a.first > b.first; });
  float floor = kNegInf;
  for (size_t i = 0; i < sc.inside.size();) {
    const float v = sc.inside[i].first;
    double equal = 0.0;
    for (; i < sc.inside.size() && sc.inside[i].first == v; ++i) equal += sc.inside[i].second;
    floor = v;  // the lowest value with mass so far (rounding: the last one, at worst)
    if (above + equal > target) break;
    above += equal;
  }
  return floor;
}

ffi::Error nucleus_floor(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> k,
                         ffi::Buffer<ffi::F32> top_p, ffi::Buffer<ffi::S32> want,
                         ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions();
  if (xd.size() != 2)
    return ffi::Error::InvalidArgument("nucleus_floor: x must be [B, V]");
  const int64_t B = xd[0], V = xd[1];
  if (k.element_count() != static_cast<size_t>(B) ||
      top_p.element_count() != static_cast<size_t>(B) ||
      want.element_count() != static_cast<size_t>(B) ||
      out->element_count() != static_cast<size_t>(B))
    return ffi::Error::InvalidArgument("nucleus_floor: k, top_p, want and out must be [B]");
  const float* xs = x.typed_data();
  const int32_t *ks = k.typed_data(), *wants = want.typed_data();
  const float* ps = top_p.typed_data();
  float* floors = out->typed_data();
  parallel_for(pool, B, [=](int64_t b) {
    thread_local Scratch scratch;
    const int64_t kb = std::clamp<int64_t>(ks[b], 1, V);
    floors[b] = wants[b] && V > 0 ? row_floor(xs + b * V, V, kb, ps[b], scratch)
                                  : -std::numeric_limits<float>::infinity();
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Llama2JaxNucleusFloor, nucleus_floor,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
