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

  // How many rows row b sees (the n Offsets returns, for every kv head).
  int64_t Count(int64_t b) const {
    if (tables == nullptr)
      return std::max<int64_t>(std::clamp<int64_t>(end[b], 0, S) - std::clamp<int64_t>(start[b], 0, S), 0);
    return std::clamp<int64_t>(end[b], 0, L * Z);
  }

  // Fills off[0:m] with the offsets of the visible rows first .. first + m - 1 of task (b, kh),
  // m = min(count, Count(b) - first) (count < 0: all from first), and returns m. With idx, also
  // idx[0:m] = off[0:m] / H, the rows' indices (an int8 cache's scales), without dividing.
  int64_t Offsets(int64_t b, int64_t kh, std::vector<int64_t>& off, int64_t first = 0, int64_t count = -1,
                  std::vector<int64_t>* idx = nullptr) const {
    const int64_t n = Count(b);
    first = std::clamp<int64_t>(first, 0, n);
    const int64_t m = count < 0 ? n - first : std::min(count, n - first);
    off.resize(m);
    if (idx != nullptr) idx->resize(m);
    if (tables == nullptr) {
      const int64_t row0 = (b * K + kh) * S + std::clamp<int64_t>(start[b], 0, S) + first;
      for (int64_t s = 0; s < m; ++s) off[s] = (row0 + s) * H;
      if (idx != nullptr)
        for (int64_t s = 0; s < m; ++s) (*idx)[s] = row0 + s;
      return m;
    }
    for (int64_t s = 0; s < m;) {
      const int64_t row = first + s, j = row / Z;
      const int64_t page = std::clamp<int64_t>(tables[b * L + j], 0, P - 1);
      const int64_t row0 = (kh * P + page) * Z;
      for (int64_t z = row % Z; z < Z && s < m; ++z, ++s) {
        off[s] = (row0 + z) * H;
        if (idx != nullptr) (*idx)[s] = row0 + z;
      }
    }
    return m;
  }
};

}  // namespace mmjax_rows
