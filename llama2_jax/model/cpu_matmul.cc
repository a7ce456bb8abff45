// Weight matmuls on CPU as an XLA FFI custom call (llama2_jax/model/cpu_kernels.py builds and
// registers it), over weights packed in tiles (llama2_jax/model/packed.py).
//
// y [M, N] float32 = x [M, K] float32 @ W [K, N], W given packed as w [N / T, K, T] (float32
// or bfloat16; T = kTile columns): tile t holds columns t*T .. t*T+T-1 of every input, one
// contiguous run of K * T values. Work items are tiles, shared out to XLA's intra-op threads.
// An item multiplies its tile by the rows kRows at a time: kRows x T float32 sums stay in
// vector registers while the tile streams past (from memory for the first rows, from the
// cache for the next ones).
//
// Why: XLA:CPU's dots over BENCH_134M's weights ran at ~20 GB/s at one row (the machine
// reads ~27) and far from its arithmetic peak at 4-64 rows, and at 16 rows took longer than
// llama.cpp's whole step. A first version of this kernel read [K, N] weights in place, tile
// by tile (a short run from every row of the weight): 0.67x XLA's speed at one row. Packed,
// each tile is one run read front to back: 1.14-1.17x XLA at one row, ~1.5x at 4-64 rows
// (benchmarks/matmul_chain.py; benchmarks/RESULTS.md, "Fifth look").

#include <cstdint>
#include <cstring>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

constexpr int64_t kLanes = 16;
constexpr int64_t kVectors = 2;               // vectors per row of a tile
constexpr int64_t kTile = kLanes * kVectors;  // columns per tile (packed.TILE)
constexpr int64_t kRows = 8;                  // rows at once: kRows x kVectors sums

inline f32x16 load(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline f32x16 load(const uint16_t* p) {  // 16 bfloat16 as float32
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  const u32x16 w = __builtin_convertvector(h, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

// rows m0 .. m0+R-1 of y, the columns of tile w (K x kTile values)
template <int R, typename W>
void rows(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t m0,
          int64_t n0) {
  f32x16 acc[R][kVectors];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kVectors; ++j) acc[r][j] = f32x16{};
  const float* xr = x + m0 * K;
  for (int64_t k = 0; k < K; ++k, w += kTile) {
    f32x16 wv[kVectors];
    for (int j = 0; j < kVectors; ++j) wv[j] = load(w + j * kLanes);
    for (int r = 0; r < R; ++r) {
      const f32x16 xb = f32x16{} + xr[r * K + k];
      for (int j = 0; j < kVectors; ++j) acc[r][j] += xb * wv[j];
    }
  }
  for (int r = 0; r < R; ++r) std::memcpy(y + (m0 + r) * N + n0, acc[r], sizeof acc[r]);
}

template <typename W>
void tile(const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N, int64_t t) {
  const W* wt = w + t * K * kTile;
  const int64_t n0 = t * kTile;
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    switch (M - m0) {
      case 1: rows<1>(x, wt, y, K, N, m0, n0); break;
      case 2: rows<2>(x, wt, y, K, N, m0, n0); break;
      case 3: rows<3>(x, wt, y, K, N, m0, n0); break;
      case 4: rows<4>(x, wt, y, K, N, m0, n0); break;
      case 5: rows<5>(x, wt, y, K, N, m0, n0); break;
      case 6: rows<6>(x, wt, y, K, N, m0, n0); break;
      case 7: rows<7>(x, wt, y, K, N, m0, n0); break;
      default: rows<kRows>(x, wt, y, K, N, m0, n0);
    }
  }
}

ffi::Error matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                  ffi::Result<ffi::AnyBuffer> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || x.element_type() != ffi::F32 ||
      y->element_type() != ffi::F32 ||
      (w.element_type() != ffi::F32 && w.element_type() != ffi::BF16))
    return ffi::Error::InvalidArgument(
        "cpu matmul: expected x [M, K] float32, w [N / T, K, T] float32 or bfloat16, "
        "y [M, N] float32");
  const int64_t M = xd[0], K = xd[1], N = wd[0] * wd[2];
  if (wd[1] != K || wd[2] != kTile || yd[0] != M || yd[1] != N)
    return ffi::Error::InvalidArgument("cpu matmul: shapes of x, w and y disagree");
  const float* xp = x.typed_data<float>();
  float* yp = y->typed_data<float>();
  if (w.element_type() == ffi::F32) {
    const float* wp = w.typed_data<float>();
    parallel_for(pool, wd[0], [=](int64_t t) { tile(xp, wp, yp, M, K, N, t); });
  } else {
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.untyped_data());
    parallel_for(pool, wd[0], [=](int64_t t) { tile(xp, wp, yp, M, K, N, t); });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Llama2JaxMatmul, matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
