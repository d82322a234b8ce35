// Small-batch matrix product for XLA:CPU decode steps: y[M, N] = x[M, K] @ w[K, N] (* scale[N]),
// M = 1..8 rows (one row per sequence of a decode batch). x and y are float32; w is float32,
// bfloat16, or int8 with a float32 scale per output column (mmjax/quantization.py). Narrow
// weights are widened to float32 in registers as they stream (LoadW, simd.h), so a step reads 2 or
// 1 bytes per weight instead of 4; the int8 scale multiplies each finished column once.
//
// Why: a decode step multiplies a few rows by every weight matrix, so it is bound by how fast
// the weights stream from memory. XLA:CPU emits [1, K] x [K, N] as a single-threaded loop (12-17
// GB/s on the 2-core benchmark machine, which streams ~25 GB/s with both cores) and [8, K] x
// [K, N] through a GEMM at 7-11 GB/s. This kernel streams w once, row-major as stored, with the
// columns split over XLA's own intra-op thread pool (docs/cpu_kernels.md, "CPU decode matmul").
//
// One row (Columns): for each column chunk [n0, n1), for k in steps of 4 rows,
// y[n0:n1] += x[k] w[k] + x[k+1] w[k+1] + x[k+2] w[k+2] + x[k+3] w[k+3]: four sequential row
// streams of w, y's chunk stays in L1. The compiler vectorises the inner loop (__restrict__).
//
// 2..8 rows (Rows<M>): the same order, 8 rows of w at a time, over column blocks of kBlock;
// the M x kBlock accumulator block lives in L1 and each step of the inner loop keeps 2 vectors
// x M rows of it in registers across the 8 w rows (w loaded once, used M times). The block's row
// stride is not a multiple of 4 KiB: rows of y 4 KiB apart make each load of one row wait on the
// stores of another (4K aliasing), which halved the rate when the block was y itself.
// More than 8 rows run 8 at a time (w streams once per 8 rows); the engine sends at most 8.
//
// Prefetch: each pass also prefetches, one cache line per row, the rows of w some 8 KiB of its
// stream ahead (AheadRows), which keeps enough lines in flight for 1- and 2-byte weights.
//
// Threading: column blocks are shared out by mmjax_pool::ParallelFor (pool.h): the caller
// and helper tasks on the XLA pool claim them; a busy pool cannot deadlock the call.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>

#include "pool.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kVec = mmjax_simd::kLanes;  // chunk widths are multiples of one vector

// Software prefetch of w: a pass reads `step` rows of w over a chunk of `len` columns, and
// prefetches the rows about kAhead bytes of its own stream ahead, one cache line at a time
// (at least the next pass). Without it the hardware prefetcher keeps too few lines in flight
// for narrow weights: on the 2-core EPYC, 12 decoder layers (M = 1) streamed int8 at 9.3 GB/s
// and bfloat16 at 13 GB/s, with it 18 and 23 GB/s (of ~35). Not for float32 (AheadRows).
constexpr int64_t kAhead = 8192;
template <typename W>
int64_t AheadRows(int64_t len, int64_t step) {
  // float32: none. 12 chained layers alone ran faster with it (23 -> 31 GB/s), the whole fp32
  // decode step slower (batch 1: ~54 vs ~57 tok/s, three alternating A/B rounds).
  if (std::is_same_v<W, float>) return 0;
  const int64_t r = (kAhead / int64_t(len * sizeof(W)) + step - 1) / step * step;
  return std::max<int64_t>(step, r);
}
template <typename W>
inline void Prefetch(const W* p) { __builtin_prefetch(p, 0, 3); }

using mmjax_simd::LoadW;
using mmjax_simd::NLoad;
using mmjax_simd::NVec;
using mmjax_simd::ToFloat;
constexpr int64_t kN = mmjax_simd::kNLanes;  // one native register of floats

// y[n0:n1] = x @ w[:, n0:n1]
template <typename W>
void Columns(const float* __restrict__ x, const W* __restrict__ w, float* __restrict__ y,
             int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t len = n1 - n0;
  float* __restrict__ yp = y + n0;
  std::memset(yp, 0, len * sizeof(float));
  constexpr int64_t L = 64 / sizeof(W);  // columns per cache line of w
  const int64_t ahead = AheadRows<W>(len, 4);
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    const W* __restrict__ w0 = w + k * N + n0;
    const W* pf = ahead > 0 && k + ahead + 4 <= K ? w0 + ahead * N : nullptr;
    const W* __restrict__ w1 = w0 + N;
    const W* __restrict__ w2 = w1 + N;
    const W* __restrict__ w3 = w2 + N;
    const float a0 = x[k], a1 = x[k + 1], a2 = x[k + 2], a3 = x[k + 3];
    int64_t n = 0;
    if constexpr (!std::is_same_v<W, float>) {  // float32 auto-vectorises; the widening loads do not
      const NVec b0 = mmjax_simd::NSplat(a0), b1 = mmjax_simd::NSplat(a1), b2 = mmjax_simd::NSplat(a2),
                 b3 = mmjax_simd::NSplat(a3);
      for (; n + L <= len; n += L) {
        if (pf != nullptr)
          for (int r = 0; r < 4; ++r) Prefetch(pf + r * N + n);
#pragma GCC unroll 8
        for (int64_t v = n; v < n + L; v += kN)
          mmjax_simd::NStore(yp + v, NLoad(yp + v) + b0 * LoadW(w0 + v) + b1 * LoadW(w1 + v) + b2 * LoadW(w2 + v) +
                                         b3 * LoadW(w3 + v));
      }
      for (; n + kN <= len; n += kN)
        mmjax_simd::NStore(yp + n, NLoad(yp + n) + b0 * LoadW(w0 + n) + b1 * LoadW(w1 + n) + b2 * LoadW(w2 + n) +
                                       b3 * LoadW(w3 + n));
    }
    for (; n < len; ++n)
      yp[n] += a0 * ToFloat(w0[n]) + a1 * ToFloat(w1[n]) + a2 * ToFloat(w2[n]) + a3 * ToFloat(w3[n]);
  }
  for (; k < K; ++k) {
    const W* __restrict__ wk = w + k * N + n0;
    const float a = x[k];
    for (int64_t n = 0; n < len; ++n) yp[n] += a * ToFloat(wk[n]);
  }
}

constexpr int64_t kMaxRows = 8;
constexpr int64_t kBlock = 1024;         // columns per accumulator block
constexpr int64_t kLd = kBlock + kVec;   // its row stride: 4160 bytes, not a multiple of 4 KiB
constexpr int kGroup = 8;                // rows of w per pass over the block

// y[0:M, n0:n1] = x[0:M] @ w[:, n0:n1]; x is [M, K] and y [M, N], row-major.
template <int M, typename W>
void Rows(const float* __restrict__ x, const W* __restrict__ w, float* __restrict__ y,
          int64_t K, int64_t N, int64_t n0, int64_t n1) {
  // U registers of columns per row and step: M x U accumulators + U weights stay in registers
  // (16 on AVX2: 2 columns of registers up to 4 rows, then 1; 32 on AVX-512: always 2).
  constexpr int U = (kN >= 16 || M <= 4) ? 2 : 1;
  alignas(64) static thread_local float acc[kMaxRows * kLd];
  for (int64_t b0 = n0; b0 < n1; b0 += kBlock) {
    const int64_t len = std::min(n1, b0 + kBlock) - b0, lv = len / kN * kN;
    for (int m = 0; m < M; ++m) std::memset(acc + m * kLd, 0, len * sizeof(float));
    constexpr int64_t L = 64 / sizeof(W);
    const int64_t ahead = AheadRows<W>(len, kGroup);
    int64_t k = 0;
    for (; k + kGroup <= K; k += kGroup) {
      const W* wk = w + k * N + b0;
      const W* pf = ahead > 0 && k + ahead + kGroup <= K ? wk + ahead * N : nullptr;
      float a[M][kGroup];
      for (int m = 0; m < M; ++m)
        for (int g = 0; g < kGroup; ++g) a[m][g] = x[m * K + k + g];
      int64_t n = 0;
      for (; n + U * kN <= lv; n += U * kN) {
        if (pf != nullptr && n % L == 0)
          for (int g = 0; g < kGroup; ++g) Prefetch(pf + g * N + n);
        NVec t[U][M];
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m)
          for (int u = 0; u < U; ++u) t[u][m] = *reinterpret_cast<NVec*>(acc + m * kLd + n + u * kN);
#pragma GCC unroll 8
        for (int g = 0; g < kGroup; ++g) {
          NVec wv[U];
          for (int u = 0; u < U; ++u) wv[u] = LoadW(wk + g * N + n + u * kN);
#pragma GCC unroll 8
          for (int m = 0; m < M; ++m)
            for (int u = 0; u < U; ++u) t[u][m] += a[m][g] * wv[u];
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m)
          for (int u = 0; u < U; ++u) *reinterpret_cast<NVec*>(acc + m * kLd + n + u * kN) = t[u][m];
      }
      for (; n < len; ++n)  // the last < U vectors of the block
        for (int m = 0; m < M; ++m) {
          float s = 0;
          for (int g = 0; g < kGroup; ++g) s += a[m][g] * ToFloat(wk[g * N + n]);
          acc[m * kLd + n] += s;
        }
    }
    for (; k < K; ++k) {  // K % 8 leftover rows of w
      const W* wk = w + k * N + b0;
      for (int m = 0; m < M; ++m) {
        const float a = x[m * K + k];
        for (int64_t n = 0; n < len; ++n) acc[m * kLd + n] += a * ToFloat(wk[n]);
      }
    }
    for (int m = 0; m < M; ++m) std::memcpy(y + m * N + b0, acc + m * kLd, len * sizeof(float));
  }
}

template <typename W>
using ColumnsFn = void (*)(const float*, const W*, float*, int64_t, int64_t, int64_t, int64_t);
// kColumns<W>[m]: the kernel for m rows (1 <= m <= kMaxRows).
template <typename W>
constexpr ColumnsFn<W> kColumns[kMaxRows + 1] = {nullptr,    Columns<W>, Rows<2, W>, Rows<3, W>, Rows<4, W>,
                                                 Rows<5, W>, Rows<6, W>, Rows<7, W>, Rows<8, W>};

// y = x @ w (* scale per column when scale is not null); x [M, K], w [K, N], y [M, N].
template <typename W>
void Gemv(ffi::ThreadPool& pool, const float* xp, const W* wp, const float* scale, float* yp, int64_t M, int64_t K,
          int64_t N) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // One contiguous column block per thread (>= 64 columns): long runs per row stream best.
  // Measured on the 2-core box, 12 MLP blocks at D 768 / F 2048: one block per thread 22 GB/s,
  // two 20 GB/s, four 18 GB/s (XLA's own dot: 16-18 GB/s).
  int64_t chunk = (N + threads - 1) / threads;
  chunk = std::max<int64_t>(64, (chunk + kVec - 1) / kVec * kVec);
  mmjax_pool::ParallelFor(pool, (N + chunk - 1) / chunk, [&](int64_t c) {
    const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows)  // more than 8 rows: 8 at a time
      kColumns<W>[std::min(kMaxRows, M - m0)](xp + m0 * K, wp, yp + m0 * N, K, N, n0, n1);
    if (scale != nullptr)  // the int8 kernel's per-column scale, once per finished column
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) yp[m * N + n] *= scale[n];
  });
}

ffi::Error CheckShapes(const char* name, ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd) {
  if (xd.size() != 2 || wd.size() != 2 || xd[0] < 1 || xd[1] != wd[0])
    return ffi::Error::InvalidArgument(std::string(name) + ": expects x [M, K] and w [K, N]");
  return ffi::Error::Success();
}

ffi::Error GemvF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (auto e = CheckShapes("mmjax_gemv_f32", xd, wd); e.failure()) return e;
  Gemv<float>(pool, x.typed_data(), w.typed_data(), nullptr, y->typed_data(), xd[0], wd[0], wd[1]);
  return ffi::Error::Success();
}

ffi::Error GemvBF16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (auto e = CheckShapes("mmjax_gemv_bf16", xd, wd); e.failure()) return e;
  Gemv<uint16_t>(pool, x.typed_data(), w.typed_data(), nullptr, y->typed_data(), xd[0], wd[0], wd[1]);
  return ffi::Error::Success();
}

ffi::Error GemvS8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                  ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions();
  if (auto e = CheckShapes("mmjax_gemv_s8", xd, wd); e.failure()) return e;
  if (sd.size() != 1 || sd[0] != wd[1])
    return ffi::Error::InvalidArgument("mmjax_gemv_s8: expects scale [N] for w [K, N]");
  Gemv<int8_t>(pool, x.typed_data(), w.typed_data(), scale.typed_data(), y->typed_data(), xd[0], wd[0], wd[1]);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxGemvF32, GemvF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxGemvBF16, GemvBF16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxGemvS8, GemvS8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
