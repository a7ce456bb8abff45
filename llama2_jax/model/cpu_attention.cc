// Decode attention on CPU as an XLA FFI custom call (llama2_jax/model/cpu_attention.py builds
// and registers it).
//
// One query position per row: q [B, K, G, H] (K KV heads, G query heads each) over a cache
// row group's position blocks, keys and values [R, K, S_j, H] (or [K, S_j, H] for a one-row
// group; R >= B, the group's rows 0..B-1 are used), positions [B] int32. Row b attends over
// positions 0..positions[b] of its row and nothing else; a row whose position is outside the
// blocks (an idle row) gets zeros. Work items are (row, KV head) pairs, shared out to XLA's
// intra-op threads; each reads its keys and values once for all G query heads. Scores,
// softmax and the sums are float32; the cache may be float32 or bfloat16; q and the output
// are float32.
//
// Why: XLA:CPU runs a decode step's batched attention dots as one small matrix-vector product
// per (row, head), one after another on one core, over every position of the longest row's
// bucket (benchmarks/RESULTS.md, "Third look: where a served run's time goes").

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Block {
  const void* k;
  const void* v;
  int64_t rows, length;  // R, S_j
  int64_t offset;        // the block's first position
};

inline float load(const float* p, int64_t i) { return p[i]; }

inline float load(const uint16_t* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

struct Problem {
  const float* q;         // [B, K, G, H]
  const int32_t* positions;  // [B]
  float* out;             // [B, K, G, H]
  std::vector<Block> blocks;
  int64_t B, K, G, H, total;
  bool bf16;
};

template <typename T>
void one_item(const Problem& p, int64_t item, std::vector<float>& scores) {
  const int64_t b = item / p.K, kh = item % p.K;
  const int64_t G = p.G, H = p.H;
  float* out = p.out + (b * p.K + kh) * G * H;
  const float* q = p.q + (b * p.K + kh) * G * H;
  const int64_t pos = p.positions[b];
  std::fill(out, out + G * H, 0.0f);
  if (pos < 0 || pos >= p.total) return;  // an idle row
  const int64_t n = pos + 1;
  scores.resize(G * n);
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));

  // Scores: each key read once for the G query heads.
  for (const Block& blk : p.blocks) {
    if (blk.offset >= n) break;
    const int64_t take = std::min(blk.length, n - blk.offset);
    const T* keys = static_cast<const T*>(blk.k) + (b * p.K + kh) * blk.length * H;
    for (int64_t t = 0; t < take; ++t) {
      const T* key = keys + t * H;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = q + g * H;
        float acc = 0.0f;
        for (int64_t h = 0; h < H; ++h) acc += qg[h] * load(key, h);
        scores[g * n + blk.offset + t] = acc * scale;
      }
    }
  }
  // Softmax over each query head's n scores.
  std::vector<float> inv(G);
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores.data() + g * n;
    float m = s[0];
    for (int64_t t = 1; t < n; ++t) m = std::max(m, s[t]);
    float sum = 0.0f;
    for (int64_t t = 0; t < n; ++t) {
      s[t] = std::exp(s[t] - m);
      sum += s[t];
    }
    inv[g] = 1.0f / sum;
  }
  // Values: each read once for the G query heads.
  for (const Block& blk : p.blocks) {
    if (blk.offset >= n) break;
    const int64_t take = std::min(blk.length, n - blk.offset);
    const T* values = static_cast<const T*>(blk.v) + (b * p.K + kh) * blk.length * H;
    for (int64_t t = 0; t < take; ++t) {
      const T* value = values + t * H;
      for (int64_t g = 0; g < G; ++g) {
        const float w = scores[g * n + blk.offset + t];
        float* og = out + g * H;
        for (int64_t h = 0; h < H; ++h) og[h] += w * load(value, h);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t h = 0; h < H; ++h) out[g * H + h] *= inv[g];
}

void run_item(const Problem& p, int64_t item) {
  thread_local std::vector<float> scores;
  if (p.bf16) {
    one_item<uint16_t>(p, item, scores);
  } else {
    one_item<float>(p, item, scores);
  }
}

// Items shared out by an atomic counter. The caller works too and then waits only for items
// already claimed, so a pool task that starts late (or never, if the pool is busy) costs
// nothing: it finds no work and returns. The state outlives the call for such late tasks.
struct Shared {
  Problem problem;
  int64_t items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void work() {
    for (;;) {
      const int64_t i = next.fetch_add(1);
      if (i >= items) return;
      run_item(problem, i);
      if (done.fetch_add(1) + 1 == items) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

ffi::Error decode_attention(ffi::ThreadPool pool, ffi::AnyBuffer q,
                            ffi::Buffer<ffi::S32> positions, ffi::RemainingArgs blocks,
                            ffi::Result<ffi::AnyBuffer> out) {
  if (q.element_type() != ffi::F32 || out->element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("decode_attention: q and the output must be float32");
  auto qd = q.dimensions();
  if (qd.size() != 4)
    return ffi::Error::InvalidArgument("decode_attention: q must be [B, K, G, H]");
  auto s = std::make_shared<Shared>();
  Problem& p = s->problem;
  p.B = qd[0], p.K = qd[1], p.G = qd[2], p.H = qd[3];
  p.q = q.typed_data<float>();
  p.positions = positions.typed_data();
  p.out = out->typed_data<float>();
  if (positions.element_count() != static_cast<size_t>(p.B))
    return ffi::Error::InvalidArgument("decode_attention: positions must be [B]");
  if (blocks.size() == 0 || blocks.size() % 2)
    return ffi::Error::InvalidArgument("decode_attention: expected keys then values blocks");
  const size_t nb = blocks.size() / 2;
  int64_t offset = 0;
  for (size_t j = 0; j < nb; ++j) {
    auto k = blocks.get<ffi::AnyBuffer>(j);
    auto v = blocks.get<ffi::AnyBuffer>(j + nb);
    if (!k.has_value() || !v.has_value())
      return ffi::Error::InvalidArgument("decode_attention: a block is not a buffer");
    auto kd = k->dimensions();
    auto vd = v->dimensions();
    bool same = kd.size() == vd.size() && k->element_type() == v->element_type();
    for (size_t i = 0; same && i < kd.size(); ++i) same = kd[i] == vd[i];
    if (!same)
      return ffi::Error::InvalidArgument("decode_attention: keys and values differ");
    const bool bf16 = k->element_type() == ffi::BF16;
    if (!bf16 && k->element_type() != ffi::F32)
      return ffi::Error::InvalidArgument("decode_attention: the cache must be f32 or bf16");
    if (j == 0) p.bf16 = bf16;
    if (bf16 != p.bf16)
      return ffi::Error::InvalidArgument("decode_attention: blocks of different dtypes");
    const int64_t rows = kd.size() == 4 ? kd[0] : 1;
    const size_t r = kd.size();
    if ((r != 3 && r != 4) || kd[r - 3] != p.K || kd[r - 1] != p.H || rows < p.B)
      return ffi::Error::InvalidArgument(
          "decode_attention: a block must be [R >= B, K, S, H] or [K, S, H] (B = 1)");
    p.blocks.push_back(Block{k->untyped_data(), v->untyped_data(), rows, kd[r - 2], offset});
    offset += kd[r - 2];
  }
  p.total = offset;
  s->items = p.B * p.K;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t helpers = std::min(threads, s->items) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([s] { s->work(); });
  s->work();
  std::unique_lock<std::mutex> lock(s->mu);
  s->cv.wait(lock, [&] { return s->done.load() == s->items; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Llama2JaxDecodeAttention, decode_attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>());
