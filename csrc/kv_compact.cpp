// CPU kernel of sparrow::kv_compact (docs/ops.md): in place over every layer of kv [L, B, H, S, D],
// copy slot prefix_len[b] + accept_index[b, i] to slot prefix_len[b] + i in increasing i.
// A pure copy (any dtype); never touches slots below prefix_len[b]; validated by csrc/checks.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "checks.h"

namespace sparrow {
namespace {

void kv_compact_cpu(const at::Tensor& kv, const at::Tensor& prefix_len, const at::Tensor& accept_index,
                    const at::Tensor& accept_len) {
  check_kv_compact_inputs(kv, prefix_len, accept_index, accept_len);
  if (kv.numel() == 0) return;
  const int64_t L = kv.size(0), B = kv.size(1), H = kv.size(2), S = kv.size(3), D = kv.size(4);
  const int64_t A = accept_index.size(1);
  const at::Tensor starts_c = prefix_len.contiguous(), index_c = accept_index.contiguous(),
                   lens_c = accept_len.contiguous();
  const int64_t* starts = starts_c.data_ptr<int64_t>();
  const int64_t* index = index_c.data_ptr<int64_t>();
  const int64_t* lens = lens_c.data_ptr<int64_t>();
  const int64_t slot_bytes = D * static_cast<int64_t>(kv.element_size());
  char* data = static_cast<char*>(kv.data_ptr());  // contiguous [L, B, H, S, D]
  // work item = one (l, b, h) sequence of S slots; its copies run in increasing i
  at::parallel_for(0, L * B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = (item / H) % B;
      char* seq = data + item * S * slot_bytes;
      const int64_t start = starts[b];
      for (int64_t i = 0; i < lens[b]; ++i) {
        const int64_t src = start + index[b * A + i], dst = start + i;
        // accept_index strictly increasing => src >= dst; distinct slots never overlap
        if (src != dst) std::memcpy(seq + dst * slot_bytes, seq + src * slot_bytes, slot_bytes);
      }
    }
  });
}

}  // namespace
}  // namespace sparrow

TORCH_LIBRARY_IMPL(sparrow, CPU, m) {
  m.impl("kv_compact", &sparrow::kv_compact_cpu);
}
