// Decode attention on CPU as an XLA FFI custom call (llama2_jax/model/cpu_kernels.py builds
// and registers it).
//
// One query position per row: q [B, K, G, H] (K KV heads, G query heads each) over a cache
// row group's position blocks, keys and values [R, K, S_j, H] (or [K, S_j, H] for a one-row
// group; R >= B, the group's rows 0..B-1 are used), positions [B] int32. Row b attends over
// positions 0..positions[b] of its row and nothing else; a row whose position is outside the
// blocks (an idle row) gets zeros. Work items are (row, KV head) pairs, shared out to XLA's
// intra-op threads; each reads its keys and values once for all G query heads. Scores,
// softmax and the sums are float32; q and the output are float32. The cache may be float32
// or bfloat16 (operands: the keys' blocks, then the values'), or 8-bit (kv_cache.QKV: int8
// or float8_e4m3fn codes [R, K, S_j, H] with a float32 scale per position [R, K, S_j];
// operands: the keys' codes, their scales, the values' codes, their scales, each per block):
// the scores are multiplied by the keys' scales and the probabilities by the values'.
//
// Why: XLA:CPU runs a decode step's batched attention dots as one small matrix-vector product
// per (row, head), one after another on one core, over every position of the longest row's
// bucket (benchmarks/RESULTS.md, "Third look: where a served run's time goes").

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Block {
  const void* k;
  const void* v;
  const float* ks;       // 8-bit blocks: the keys' and values' scales [R, K, S_j]
  const float* vs;
  int64_t length;  // S_j
  int64_t offset;  // the block's first position
};

enum class Kind { kF32, kBF16, kS8, kF8 };

struct Fp8 {  // a stand-in type for float8_e4m3fn codes
  uint8_t bits;
};

// float8_e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities, S.1111.111
// is NaN.
struct Fp8Table {
  float value[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 15, m = b & 7;
      float v = e == 0 ? std::ldexp(m / 8.0f, -6) : std::ldexp(1.0f + m / 8.0f, e - 7);
      if (e == 15 && m == 7) v = std::numeric_limits<float>::quiet_NaN();
      value[b] = (b & 128) ? -v : v;
    }
  }
};
const Fp8Table kFp8;

inline float load(const float* p, int64_t i) { return p[i]; }

inline float load(const uint16_t* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline float load(const int8_t* p, int64_t i) { return static_cast<float>(p[i]); }

inline float load(const Fp8* p, int64_t i) { return kFp8.value[p[i].bits]; }

struct Problem {
  const float* q;         // [B, K, G, H]
  const int32_t* positions;  // [B]
  float* out;             // [B, K, G, H]
  std::vector<Block> blocks;
  int64_t B, K, G, H, total;
  Kind kind;
};

// fn(block, positions of it to read) for the blocks holding positions 0..n-1.
template <typename Fn>
void each_block(const Problem& p, int64_t n, Fn fn) {
  for (const Block& blk : p.blocks) {
    if (blk.offset >= n) break;
    fn(blk, std::min(blk.length, n - blk.offset));
  }
}

template <typename T, bool kScaled>
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
  each_block(p, n, [&](const Block& blk, int64_t take) {
    const T* keys = static_cast<const T*>(blk.k) + (b * p.K + kh) * blk.length * H;
    const float* ks = kScaled ? blk.ks + (b * p.K + kh) * blk.length : nullptr;
    for (int64_t t = 0; t < take; ++t) {
      const T* key = keys + t * H;
      const float f = kScaled ? ks[t] * scale : scale;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = q + g * H;
        float acc = 0.0f;
        for (int64_t h = 0; h < H; ++h) acc += qg[h] * load(key, h);
        scores[g * n + blk.offset + t] = acc * f;
      }
    }
  });
  // Softmax over each query head's n scores, in place.
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores.data() + g * n;
    float m = s[0];
    for (int64_t t = 1; t < n; ++t) m = std::max(m, s[t]);
    float sum = 0.0f;
    for (int64_t t = 0; t < n; ++t) {
      s[t] = std::exp(s[t] - m);
      sum += s[t];
    }
    const float inv = 1.0f / sum;
    for (int64_t t = 0; t < n; ++t) s[t] *= inv;
  }
  // Values: each read once for the G query heads.
  each_block(p, n, [&](const Block& blk, int64_t take) {
    const T* values = static_cast<const T*>(blk.v) + (b * p.K + kh) * blk.length * H;
    const float* vs = kScaled ? blk.vs + (b * p.K + kh) * blk.length : nullptr;
    for (int64_t t = 0; t < take; ++t) {
      const T* value = values + t * H;
      for (int64_t g = 0; g < G; ++g) {
        const float w = scores[g * n + blk.offset + t] * (kScaled ? vs[t] : 1.0f);
        float* og = out + g * H;
        for (int64_t h = 0; h < H; ++h) og[h] += w * load(value, h);
      }
    }
  });
}

void run_item(const Problem& p, int64_t item) {
  thread_local std::vector<float> scores;
  switch (p.kind) {
    case Kind::kF32: return one_item<float, false>(p, item, scores);
    case Kind::kBF16: return one_item<uint16_t, false>(p, item, scores);
    case Kind::kS8: return one_item<int8_t, true>(p, item, scores);
    case Kind::kF8: return one_item<Fp8, true>(p, item, scores);
  }
}

ffi::Error decode_attention(ffi::ThreadPool pool, ffi::AnyBuffer q,
                            ffi::Buffer<ffi::S32> positions, ffi::RemainingArgs blocks,
                            ffi::Result<ffi::AnyBuffer> out) {
  if (q.element_type() != ffi::F32 || out->element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("decode_attention: q and the output must be float32");
  auto qd = q.dimensions();
  if (qd.size() != 4)
    return ffi::Error::InvalidArgument("decode_attention: q must be [B, K, G, H]");
  Problem p;
  p.B = qd[0], p.K = qd[1], p.G = qd[2], p.H = qd[3];
  p.q = q.typed_data<float>();
  p.positions = positions.typed_data();
  p.out = out->typed_data<float>();
  if (positions.element_count() != static_cast<size_t>(p.B))
    return ffi::Error::InvalidArgument("decode_attention: positions must be [B]");
  if (blocks.size() == 0)
    return ffi::Error::InvalidArgument("decode_attention: no cache blocks");
  auto first = blocks.get<ffi::AnyBuffer>(0);
  if (!first.has_value())
    return ffi::Error::InvalidArgument("decode_attention: a block is not a buffer");
  switch (first->element_type()) {
    case ffi::F32: p.kind = Kind::kF32; break;
    case ffi::BF16: p.kind = Kind::kBF16; break;
    case ffi::S8: p.kind = Kind::kS8; break;
    case ffi::F8E4M3FN: p.kind = Kind::kF8; break;
    default:
      return ffi::Error::InvalidArgument(
          "decode_attention: the cache must be float32, bfloat16, int8 or float8_e4m3fn");
  }
  const bool scaled = p.kind == Kind::kS8 || p.kind == Kind::kF8;
  const size_t parts = scaled ? 4 : 2;  // keys, values (and their scales)
  if (blocks.size() % parts)
    return ffi::Error::InvalidArgument("decode_attention: expected keys then values blocks "
                                       "(8-bit: codes and scales of each)");
  const size_t nb = blocks.size() / parts;
  int64_t offset = 0;
  for (size_t j = 0; j < nb; ++j) {
    auto k = blocks.get<ffi::AnyBuffer>(j);
    auto v = blocks.get<ffi::AnyBuffer>(j + (scaled ? 2 : 1) * nb);
    if (!k.has_value() || !v.has_value())
      return ffi::Error::InvalidArgument("decode_attention: a block is not a buffer");
    auto kd = k->dimensions();
    auto vd = v->dimensions();
    bool same = kd.size() == vd.size() && k->element_type() == first->element_type() &&
                v->element_type() == first->element_type();
    for (size_t i = 0; same && i < kd.size(); ++i) same = kd[i] == vd[i];
    if (!same)
      return ffi::Error::InvalidArgument("decode_attention: blocks differ in shape or dtype");
    const size_t r = kd.size();
    const int64_t rows = r == 4 ? kd[0] : 1;
    if ((r != 3 && r != 4) || kd[r - 3] != p.K || kd[r - 1] != p.H || rows < p.B)
      return ffi::Error::InvalidArgument(
          "decode_attention: a block must be [R >= B, K, S, H] or [K, S, H] (B = 1)");
    Block blk{k->untyped_data(), v->untyped_data(), nullptr, nullptr, kd[r - 2], offset};
    if (scaled) {
      auto ks = blocks.get<ffi::AnyBuffer>(j + nb);
      auto vs = blocks.get<ffi::AnyBuffer>(j + 3 * nb);
      if (!ks.has_value() || !vs.has_value() || ks->element_type() != ffi::F32 ||
          vs->element_type() != ffi::F32 || ks->element_count() != k->element_count() / p.H ||
          vs->element_count() != k->element_count() / p.H)
        return ffi::Error::InvalidArgument(
            "decode_attention: 8-bit blocks need float32 scales [R, K, S]");
      blk.ks = ks->typed_data<float>();
      blk.vs = vs->typed_data<float>();
    }
    p.blocks.push_back(blk);
    offset += kd[r - 2];
  }
  p.total = offset;
  parallel_for(pool, p.B * p.K, [&p](int64_t item) { run_item(p, item); });
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
