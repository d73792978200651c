// The shared-keys phase of sparrow::window_attn's CPU forward (fp32): the key slots
// [shared_begin[b], shared_end[b]) that *every* query of row b sees (a contiguous range inside
// all their windows, past the anchors: with window <= 0 the whole committed prefix, e.g. the
// visual tokens of a video), scored for all of a KV head's queries at once
// and split across threads along the keys (flash-decoding style). It leaves the online-softmax
// state of every query row; csrc/window_attn.cpp continues from it with each query's own keys.
// It reads q, k, v only and must not change the op's semantics.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace sparrow {

// Per query row (b, h, i) of q [B, Hq, Tq, D] (fp32): running max m, running sum l and the
// unnormalised output acc [D] over the shared keys (m = -inf, l = 0, acc = 0 where the range
// is empty). Laid out as state[B, Hq, Tq, D + 2] = (acc[0..D), m, l).
at::Tensor window_attn_shared_keys(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const std::vector<int64_t>& shared_begin, const std::vector<int64_t>& shared_end,
                                   double scale);

// Fewest shared keys for which the shared phase pays off (below it the per-query path runs).
constexpr int64_t kMinSharedKeys = 128;

}  // namespace sparrow
