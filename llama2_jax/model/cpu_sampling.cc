// The top-k / top-p floor of sampled rows on CPU as an XLA FFI custom call
// (llama2_jax/model/cpu_kernels.py builds and registers it; llama2_jax/inference/sampling.py
// calls it where its candidates do not resolve a row).
//
// For each row of x [B, V] float32 (logits over the temperature) with k [B] int32 (1..V; V:
// no top-k), top_p [B] float32 and want [B] int32 (0: the row is not sampled, its floor is
// -inf): the smallest value v of the row such that the tokens x > v that top-k keeps carry at
// most top_p of the top-k tokens' mass (Meta's top-p: a token stays while the mass before it
// is at most top_p). With top_p >= 1 the floor is top-k's: the k-th largest value. Tokens
// x >= floor are kept. The same floor as sampling.py's bisection, found by selection instead
// of 32 passes over the row (masses summed in float64; the bisection sums in float32).
//
// Why: with a flat distribution (top-p over thousands of tokens) the bisection's 32 masked
// sums over [B, 32000] cost a 16-row step ~4 ms on XLA:CPU (benchmarks/RESULTS.md).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Row {
  float value;
  double w;  // exp(value - the row's max)
};

float row_floor(const float* row, int64_t V, int64_t k, float top_p, std::vector<Row>& buf,
                std::vector<float>& clean, std::vector<float>& tmp) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  clean.assign(row, row + V);  // NaN as -inf: the selections below need an order
  for (float& v : clean)
    if (std::isnan(v)) v = kNegInf;
  const float* x = clean.data();
  float kth = kNegInf;
  if (k < V) {
    tmp.assign(x, x + V);
    std::nth_element(tmp.begin(), tmp.begin() + (k - 1), tmp.end(), std::greater<float>());
    kth = tmp[k - 1];
  }
  const float top = *std::max_element(x, x + V);
  if (top_p >= 1.0f) return k < V ? kth : *std::min_element(x, x + V);
  if (top == kNegInf) return kNegInf;  // nothing has any mass: keep all
  buf.clear();
  double total = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    if (x[i] >= kth) {
      const double w = std::exp(static_cast<double>(x[i]) - top);
      buf.push_back(Row{x[i], w});
      total += w;
    }
  }
  const double target = static_cast<double>(top_p) * total;
  // Selection by mass: `above` is the mass of the tokens known to lie above every candidate
  // left in buf[lo, hi). The floor is the smallest candidate whose mass above is <= target.
  double above = 0.0;
  int64_t lo = 0, hi = static_cast<int64_t>(buf.size());
  uint64_t seed = 0x9E3779B97F4A7C15ull;
  for (;;) {
    seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;  // a pivot by xorshift
    const float p = buf[lo + static_cast<int64_t>(seed % static_cast<uint64_t>(hi - lo))].value;
    // Three ways: [lo, a) > p, [a, b) == p, [b, hi) < p.
    auto mid = std::partition(buf.begin() + lo, buf.begin() + hi,
                              [p](const Row& r) { return r.value > p; });
    auto low = std::partition(mid, buf.begin() + hi, [p](const Row& r) { return r.value == p; });
    const int64_t a = mid - buf.begin(), b = low - buf.begin();
    double higher = 0.0, equal = 0.0;
    for (int64_t i = lo; i < a; ++i) higher += buf[i].w;
    for (int64_t i = a; i < b; ++i) equal += buf[i].w;
    if (above + higher > target) {  // p keeps too much: the floor is above it
      hi = a;
    } else if (b == hi || above + higher + equal > target) {  // nothing below p qualifies
      return p;
    } else {  // the floor is below p
      above += higher + equal;
      lo = b;
    }
  }
}

struct Shared {
  const float* x;
  const int32_t* k;
  const float* top_p;
  const int32_t* want;
  float* out;
  int64_t B, V;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void work() {
    thread_local std::vector<Row> buf;
    thread_local std::vector<float> clean, tmp;
    for (;;) {
      const int64_t b = next.fetch_add(1);
      if (b >= B) return;
      const int64_t kb = std::clamp<int64_t>(k[b], 1, V);
      out[b] = want[b] ? row_floor(x + b * V, V, kb, top_p[b], buf, clean, tmp)
                       : -std::numeric_limits<float>::infinity();
      if (done.fetch_add(1) + 1 == B) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

ffi::Error nucleus_floor(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> k,
                         ffi::Buffer<ffi::F32> top_p, ffi::Buffer<ffi::S32> want,
                         ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions();
  if (xd.size() != 2)
    return ffi::Error::InvalidArgument("nucleus_floor: x must be [B, V]");
  auto s = std::make_shared<Shared>();
  s->B = xd[0], s->V = xd[1];
  if (k.element_count() != static_cast<size_t>(s->B) ||
      top_p.element_count() != static_cast<size_t>(s->B) ||
      want.element_count() != static_cast<size_t>(s->B) ||
      out->element_count() != static_cast<size_t>(s->B))
    return ffi::Error::InvalidArgument("nucleus_floor: k, top_p, want and out must be [B]");
  if (s->B == 0) return ffi::Error::Success();
  s->x = x.typed_data(), s->k = k.typed_data(), s->top_p = top_p.typed_data();
  s->want = want.typed_data(), s->out = out->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t helpers = std::min(threads, s->B) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([s] { s->work(); });
  s->work();
  std::unique_lock<std::mutex> lock(s->mu);
  s->cv.wait(lock, [&] { return s->done.load() == s->B; });
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
