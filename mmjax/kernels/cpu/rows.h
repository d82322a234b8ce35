// Which cache rows one (b, kv head) task of decode attention (decode_attention.cc) reads: the
// offsets, in values from the start of the K (or V) buffer, of its visible rows in order. K and V share them; an int8 row's scale is at offset / H.
//  * a contiguous cache [B, K, S, H] (mmjax.generate's): rows start[b] <= s < end[b] of (b, kh);
//  * paged pools [K, P, Z, H] (the serving engine's): rows s < lengths[b], row s being row s % Z
//    of page tables[b, s / Z] (a page outside [0, P) is clamped into it, as XLA's gather does).
// Both run the same kernels over the offsets, so a paged row sums in exactly the order its
// gathered copy would: the serving engine's answers equal mmjax.generate's bitwise, and the pages
// are read where they lie (no gathered copy of each row's cache).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace mmjax_rows {

struct Rows {
  int64_t K = 0, H = 0;
  const int32_t* end = nullptr;  // [B]: contiguous end, or paged lengths
  // contiguous: start [B], S cache length
  const int32_t* start = nullptr;
  int64_t S = 0;
  // paged: tables [B, L] of pages of Z rows, P pages in the pool
  const int32_t* tables = nullptr;
  int64_t L = 0, P = 0, Z = 0;

  // Fills off[0:n] for task (b, kh) and returns n (0: no visible row).
  int64_t Offsets(int64_t b, int64_t kh, std::vector<int64_t>& off) const {
    if (tables == nullptr) {
      const int64_t s0 = std::clamp<int64_t>(start[b], 0, S), s1 = std::clamp<int64_t>(end[b], 0, S);
      const int64_t n = std::max<int64_t>(s1 - s0, 0);
      off.resize(n);
      const int64_t base = ((b * K + kh) * S + s0) * H;
      for (int64_t s = 0; s < n; ++s) off[s] = base + s * H;
      return n;
    }
    const int64_t n = std::clamp<int64_t>(end[b], 0, L * Z);
    off.resize(n);
    for (int64_t j = 0, s = 0; s < n; ++j) {
      const int64_t page = std::clamp<int64_t>(tables[b * L + j], 0, P - 1);
      const int64_t base = (kh * P + page) * Z * H;
      for (int64_t z = 0; z < Z && s < n; ++z, ++s) off[s] = base + z * H;
    }
    return n;
  }
};

}  // namespace mmjax_rows
