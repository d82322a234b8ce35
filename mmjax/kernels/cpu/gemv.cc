// Small-batch matrix product for XLA:CPU decode steps: y[M, N] = x[M, K] @ w[K, N], float32,
// M = 1..8 rows (one row per sequence of a decode batch).
//
// Why: a decode step multiplies a few rows by every weight matrix, so it is bound by how fast
// the weights stream from memory. XLA:CPU emits [1, K] x [K, N] as a single-threaded loop (12-17
// GB/s on the 2-core benchmark machine, which streams ~25 GB/s with both cores) and [8, K] x
// [K, N] through a GEMM at 7-11 GB/s. This kernel streams w once, row-major as stored, with the
// columns split over XLA's own intra-op thread pool (docs/kernels.md, "CPU decode matmul").
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
// Threading: column blocks are shared out by mmjax_pool::ParallelFor (pool.h): the caller
// and helper tasks on the XLA pool claim them; a busy pool cannot deadlock the call.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "pool.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kVec = mmjax_simd::kLanes;  // chunk widths are multiples of one vector

// y[n0:n1] = x @ w[:, n0:n1]
void Columns(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
             int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t len = n1 - n0;
  float* __restrict__ yp = y + n0;
  std::memset(yp, 0, len * sizeof(float));
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    const float* __restrict__ w0 = w + k * N + n0;
    const float* __restrict__ w1 = w0 + N;
    const float* __restrict__ w2 = w1 + N;
    const float* __restrict__ w3 = w2 + N;
    const float a0 = x[k], a1 = x[k + 1], a2 = x[k + 2], a3 = x[k + 3];
    for (int64_t n = 0; n < len; ++n) yp[n] += a0 * w0[n] + a1 * w1[n] + a2 * w2[n] + a3 * w3[n];
  }
  for (; k < K; ++k) {
    const float* __restrict__ wk = w + k * N + n0;
    const float a = x[k];
    for (int64_t n = 0; n < len; ++n) yp[n] += a * wk[n];
  }
}

using mmjax_simd::Load;
using mmjax_simd::Vec;

constexpr int64_t kMaxRows = 8;
constexpr int64_t kBlock = 1024;         // columns per accumulator block
constexpr int64_t kLd = kBlock + kVec;   // its row stride: 4160 bytes, not a multiple of 4 KiB
constexpr int kGroup = 8;                // rows of w per pass over the block

// y[0:M, n0:n1] = x[0:M] @ w[:, n0:n1]; x is [M, K] and y [M, N], row-major.
template <int M>
void Rows(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
          int64_t K, int64_t N, int64_t n0, int64_t n1) {
  alignas(64) static thread_local float acc[kMaxRows * kLd];
  for (int64_t b0 = n0; b0 < n1; b0 += kBlock) {
    const int64_t len = std::min(n1, b0 + kBlock) - b0, lv = len / kVec * kVec;
    for (int m = 0; m < M; ++m) std::memset(acc + m * kLd, 0, len * sizeof(float));
    int64_t k = 0;
    for (; k + kGroup <= K; k += kGroup) {
      const float* wk = w + k * N + b0;
      float a[M][kGroup];
      for (int m = 0; m < M; ++m)
        for (int g = 0; g < kGroup; ++g) a[m][g] = x[m * K + k + g];
      int64_t n = 0;
      for (; n + 2 * kVec <= lv; n += 2 * kVec) {
        Vec t0[M], t1[M];
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          t0[m] = *reinterpret_cast<Vec*>(acc + m * kLd + n);
          t1[m] = *reinterpret_cast<Vec*>(acc + m * kLd + n + kVec);
        }
#pragma GCC unroll 8
        for (int g = 0; g < kGroup; ++g) {
          const Vec w0 = Load(wk + g * N + n), w1 = Load(wk + g * N + n + kVec);
#pragma GCC unroll 8
          for (int m = 0; m < M; ++m) {
            t0[m] += a[m][g] * w0;
            t1[m] += a[m][g] * w1;
          }
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          *reinterpret_cast<Vec*>(acc + m * kLd + n) = t0[m];
          *reinterpret_cast<Vec*>(acc + m * kLd + n + kVec) = t1[m];
        }
      }
      for (; n < len; ++n)  // the last < 2 vectors of the block
        for (int m = 0; m < M; ++m) {
          float s = 0;
          for (int g = 0; g < kGroup; ++g) s += a[m][g] * wk[g * N + n];
          acc[m * kLd + n] += s;
        }
    }
    for (; k < K; ++k) {  // K % 8 leftover rows of w
      const float* wk = w + k * N + b0;
      for (int m = 0; m < M; ++m) {
        const float a = x[m * K + k];
        for (int64_t n = 0; n < len; ++n) acc[m * kLd + n] += a * wk[n];
      }
    }
    for (int m = 0; m < M; ++m) std::memcpy(y + m * N + b0, acc + m * kLd, len * sizeof(float));
  }
}

using ColumnsFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
// kColumns[m]: the kernel for m rows (1 <= m <= kMaxRows).
constexpr ColumnsFn kColumns[kMaxRows + 1] = {nullptr, Columns, Rows<2>, Rows<3>, Rows<4>,
                                               Rows<5>, Rows<6>, Rows<7>, Rows<8>};

ffi::Error GemvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[0] < 1 || xd[1] != wd[0])
    return ffi::Error::InvalidArgument("mmjax_gemv_f32: expects x [M, K] and w [K, N]");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t M = xd[0], K = wd[0], N = wd[1];
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // One contiguous column block per thread (>= 64 columns): long runs per row stream best.
  // Measured on the 2-core box, 12 MLP blocks at D 768 / F 2048: one block per thread 22 GB/s,
  // two 20 GB/s, four 18 GB/s (XLA's own dot: 16-18 GB/s).
  int64_t chunk = (N + threads - 1) / threads;
  chunk = std::max<int64_t>(64, (chunk + kVec - 1) / kVec * kVec);
  mmjax_pool::ParallelFor(pool, (N + chunk - 1) / chunk, [&](int64_t c) {
    const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows)  // more than 8 rows: 8 at a time
      kColumns[std::min(kMaxRows, M - m0)](xp + m0 * K, wp, yp + m0 * N, K, N, n0, n1);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxGemvF32, GemvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
