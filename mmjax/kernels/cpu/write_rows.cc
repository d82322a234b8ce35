// In-place row writes for XLA:CPU: buf[rows[m], :] = upd[m, :] for m < M, buf [..., C] (rows
// counted over its leading dims flattened, R of them) and upd
// [M, C] of one 16-bit dtype (bfloat16 / float16 KV caches and page pools), rows [M] int32.
// The result aliases buf (input_output_aliases), so only M rows of memory are touched.
//
// Why: XLA:CPU widens a bfloat16 dynamic_update_slice or scatter to float32, converting the whole
// buffer to float32 and back around each write: the benchmark model's batch-8 decode step spent
// 23 of its 25 ms converting its bfloat16 KV cache. A row whose index is outside [0, R) is not
// written (as a scatter with mode="drop").
#include <cstdint>
#include <cstring>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error WriteRows(ffi::AnyBuffer buf, ffi::AnyBuffer upd, ffi::Buffer<ffi::S32> rows,
                     ffi::Result<ffi::AnyBuffer> out) {
  const auto bd = buf.dimensions(), ud = upd.dimensions(), rd = rows.dimensions();
  if (bd.size() < 2 || ud.size() != 2 || rd.size() != 1 || ud[1] != bd[bd.size() - 1] || rd[0] != ud[0] ||
      upd.element_type() != buf.element_type() || out->element_type() != buf.element_type())
    return ffi::Error::InvalidArgument("mmjax_write_rows: expects buf [..., C], upd [M, C] of its dtype, rows [M]");
  int64_t R = 1;
  for (size_t i = 0; i + 1 < bd.size(); ++i) R *= bd[i];
  const int64_t M = ud[0];
  const size_t row_bytes = size_t(bd[bd.size() - 1]) * ffi::ByteWidth(buf.element_type());
  char* dst = static_cast<char*>(out->untyped_data());
  if (dst != buf.untyped_data())  // XLA could not alias: start from a copy (never the case when donated)
    std::memcpy(dst, buf.untyped_data(), size_t(R) * row_bytes);
  const char* src = static_cast<const char*>(upd.untyped_data());
  const int32_t* r = rows.typed_data();
  for (int64_t m = 0; m < M; ++m)
    if (r[m] >= 0 && r[m] < R) std::memcpy(dst + size_t(r[m]) * row_bytes, src + size_t(m) * row_bytes, row_bytes);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxWriteRows, WriteRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());
