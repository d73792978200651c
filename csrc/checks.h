// Input validation shared by the CPU (csrc/*.cpp) and CUDA (csrc/cuda/*.cu) kernels, so both
// raise the same RuntimeError text (and the same text as sparrow_kernels/ops/__init__.py for the Python
// backends). One check_<op>_inputs per op. Host code only: it computes nothing and must not
// launch kernels. Checks that read tensor *values* (index ranges, kv_len) run for CPU tensors
// only (no device sync); CUDA kernels must treat out-of-range values safely (skip, never read
// or write out of bounds), which each .cu documents.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace sparrow {

constexpr int64_t kAnySize = -1;     // a dimension whose size is not constrained
constexpr int64_t kMaxHeadDim = 256;  // window_attn's largest head dim (docs/ops.md)

// One expected dimension: its symbol in messages ("Hkv") and its size (kAnySize = any).
struct DimSpec {
  const char* name;
  int64_t size;
};

// The dtype names Python prints (float32, bfloat16, int64, ...), so messages read the same.
inline std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(dtype);
  }
}

inline std::string format_sizes(c10::IntArrayRef sizes) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << "]";
  return os.str();
}

// "[B, Hkv, Tk, D] = [2, ?, ?, 64]" (streams only: GCC 12 -O3 warns falsely on string operator+)
inline std::string format_spec(const std::vector<DimSpec>& spec) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < spec.size(); ++i) os << (i ? ", " : "") << spec[i].name;
  os << "] = [";
  for (size_t i = 0; i < spec.size(); ++i) {
    os << (i ? ", " : "");
    if (spec[i].size == kAnySize) {
      os << "?";
    } else {
      os << spec[i].size;
    }
  }
  os << "]";
  return os.str();
}

// Rank + sizes, then dtype, then (when `device` is given) device.
inline void check_tensor(const char* op, const std::string& arg, const at::Tensor& t,
                         const std::vector<DimSpec>& spec, std::initializer_list<at::ScalarType> dtypes,
                         const c10::optional<at::Device>& device = c10::nullopt) {
  TORCH_CHECK(t.defined(), op, ": ", arg, " must be a tensor of shape ", format_spec(spec), ", got None");
  bool shape_ok = t.dim() == static_cast<int64_t>(spec.size());
  for (size_t i = 0; shape_ok && i < spec.size(); ++i) {
    shape_ok = spec[i].size == kAnySize || spec[i].size == t.size(static_cast<int64_t>(i));
  }
  TORCH_CHECK(shape_ok, op, ": ", arg, " must have shape ", format_spec(spec), ", got ", format_sizes(t.sizes()));
  bool dtype_ok = false;
  std::ostringstream expected;
  for (at::ScalarType dtype : dtypes) {
    if (dtype_ok || t.scalar_type() == dtype) dtype_ok = true;
    expected << (expected.tellp() > 0 ? " or " : "") << dtype_name(dtype);
  }
  TORCH_CHECK(dtype_ok, op, ": ", arg, " must have dtype ", expected.str(), ", got ", dtype_name(t.scalar_type()));
  if (device.has_value()) {
    TORCH_CHECK(t.device() == *device, op, ": ", arg, " must be on device ", device->str(),
                " like the other inputs, got ", t.device().str());
  }
}

inline void check_last_dim_contiguous(const char* op, const std::string& arg, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", arg,
              " must be contiguous in its last dimension (stride 1), got strides ", format_sizes(t.strides()));
}

// Range checks that read data run on the host for CPU tensors only (see the file comment).
inline bool values_checkable(const at::Tensor& t) {
  return t.device().is_cpu();
}

// ------------------------------------------------------------------------------ window_attn
// `op` names the caller in messages: "window_attn" or "window_attn_backward".
inline void check_window_attn_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& kv_len, const at::Tensor& q_pos,
                                     int64_t window, int64_t n_anchor,
                                     const c10::optional<at::Tensor>& tree_mask, double scale) {
  (void)window;  // every value is meaningful: <= 0 = unlimited
  // every finite value is meaningful (<= 0 = 1/sqrt(D)); inf / NaN would turn every score
  // into +-inf / NaN, which no kernel can answer meaningfully
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite (<= 0 selects 1/sqrt(D)), got ", scale);
  const std::initializer_list<at::ScalarType> attn_dtypes = {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble};
  check_tensor(op, "q", q, {{"B", kAnySize}, {"Hq", kAnySize}, {"Tq", kAnySize}, {"D", kAnySize}}, attn_dtypes);
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3);
  const at::Device dev = q.device();
  check_tensor(op, "k", k, {{"B", B}, {"Hkv", kAnySize}, {"Tk", kAnySize}, {"D", D}}, attn_dtypes, dev);
  const int64_t Hkv = k.size(1), Tk = k.size(2);
  check_tensor(op, "v", v, {{"B", B}, {"Hkv", Hkv}, {"Tk", Tk}, {"D", D}}, attn_dtypes, dev);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must have the same dtype, got q torch.", dtype_name(q.scalar_type()), ", k torch.",
              dtype_name(k.scalar_type()), ", v torch.", dtype_name(v.scalar_type()));
  TORCH_CHECK(Hkv != 0 && Hq % Hkv == 0, op, ": the query heads Hq=", Hq,
              " must be a multiple of the kv heads Hkv=", Hkv, " (GQA)");
  TORCH_CHECK(D >= 1 && D <= kMaxHeadDim, op, ": head dim D must be in [1, ", kMaxHeadDim, "], got ", D);
  check_last_dim_contiguous(op, "q", q);
  check_last_dim_contiguous(op, "k", k);
  check_last_dim_contiguous(op, "v", v);
  check_tensor(op, "kv_len", kv_len, {{"B", B}}, {at::kLong}, dev);
  check_tensor(op, "q_pos", q_pos, {{"B", B}, {"Tq", Tq}}, {at::kLong}, dev);
  const bool has_tree = tree_mask.has_value() && tree_mask->defined();
  if (has_tree) {
    check_tensor(op, "tree_mask", *tree_mask, {{"B", B}, {"Tq", Tq}, {"Tq", Tq}}, {at::kBool}, dev);
  }
  TORCH_CHECK(n_anchor >= 0, op, ": n_anchor must be >= 0, got ", n_anchor);
  if (values_checkable(kv_len) && B > 0) {
    const int64_t low = has_tree ? Tq : 1;
    const at::Tensor lengths = kv_len.contiguous();
    const int64_t* len = lengths.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(len[b] >= low && len[b] <= Tk, op, ": kv_len must be in [",
                  has_tree ? "Tq (tree_mask given)" : "1", ", Tk] = [", low, ", ", Tk, "], got kv_len[", b,
                  "] = ", len[b]);
    }
  }
}

inline void check_window_attn_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q,
                                              const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                              const at::Tensor& lse, const at::Tensor& kv_len,
                                              const at::Tensor& q_pos, int64_t window, int64_t n_anchor,
                                              const c10::optional<at::Tensor>& tree_mask, double scale) {
  const char* op = "window_attn_backward";
  check_window_attn_inputs(op, q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, scale);
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3);
  const std::vector<DimSpec> q_spec = {{"B", B}, {"Hq", Hq}, {"Tq", Tq}, {"D", D}};
  check_tensor(op, "grad_out", grad_out, q_spec, {q.scalar_type()}, q.device());
  check_tensor(op, "out", out, q_spec, {q.scalar_type()}, q.device());
  check_tensor(op, "lse", lse, {{"B", B}, {"Hq", Hq}, {"Tq", Tq}}, {at::kFloat, at::kDouble}, q.device());
}

// ------------------------------------------------------------------------------ gather_hidden
inline void check_gather_hidden_inputs(at::TensorList hidden, const at::Tensor& index) {
  const char* op = "gather_hidden";
  TORCH_CHECK(!hidden.empty(), op, ": hidden must be a non-empty list of [B, T, H] tensors, got an empty list");
  const at::Tensor& first = hidden[0];
  check_tensor(op, "hidden[0]", first, {{"B", kAnySize}, {"T", kAnySize}, {"H", kAnySize}},
               {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  const int64_t B = first.size(0), T = first.size(1), H = first.size(2);
  for (size_t i = 0; i < hidden.size(); ++i) {
    std::ostringstream name;
    name << "hidden[" << i << "]";
    const std::string arg = name.str();
    check_tensor(op, arg, hidden[i], {{"B", B}, {"T", T}, {"H", H}}, {first.scalar_type()}, first.device());
    check_last_dim_contiguous(op, arg, hidden[i]);
  }
  check_tensor(op, "index", index, {{"B", B}, {"N", kAnySize}}, {at::kLong}, first.device());
  if (values_checkable(index) && index.numel() > 0) {
    const at::Tensor idx = index.contiguous();
    const int64_t* data = idx.data_ptr<int64_t>();
    const int64_t N = index.size(1);
    for (int64_t i = 0; i < B * N; ++i) {
      TORCH_CHECK(data[i] >= -1 && data[i] < T, op, ": index values must be in [-1, T) = [-1, ", T,
                  "), got index[", i / N, ", ", i % N, "] = ", data[i]);
    }
  }
}

// ------------------------------------------------------------------------------ tree_verify_*
// Children and siblings come after their node (topological order), so every walk ends.
inline void check_tree_links(const char* op, const at::Tensor& next_token, const at::Tensor& next_sibling) {
  if (!values_checkable(next_token) || next_token.numel() == 0) return;
  const int64_t B = next_token.size(0), N = next_token.size(1);
  const std::pair<const char*, const at::Tensor*> links[] = {{"next_token", &next_token},
                                                             {"next_sibling", &next_sibling}};
  for (const auto& [arg, tensor] : links) {
    const at::Tensor link = tensor->contiguous();
    const int64_t* data = link.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < N; ++i) {
        const int64_t value = data[b * N + i];
        TORCH_CHECK(value == -1 || (value > i && value < N), op, ": ", arg,
                    " values must be -1 or a later node in (i, N) = (", i, ", ", N, "), got ", arg, "[", b, ", ",
                    i, "] = ", value);
      }
    }
  }
}

// "[1, 2, 3]" for a flat index into a tensor of `sizes`
inline std::string format_index(int64_t flat, c10::IntArrayRef sizes) {
  std::vector<int64_t> index(sizes.size());
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    index[d] = sizes[d] == 0 ? 0 : flat % sizes[d];
    flat = sizes[d] == 0 ? 0 : flat / sizes[d];
  }
  return format_sizes(index);
}

// Probabilities: finite and >= 0 (a row may sum to anything > 0; all-zero rows are handled
// by the op). NaN would read as "no mass" and bias the accepted tokens.
// Every value in [low, high] (NaN fails): a branch-free pass the compiler vectorises (the
// target rows of a 152k vocabulary are ~10M values per call); the element is located only
// when one fails.
template <bool kHighOpen>
inline void check_value_range(const char* op, const char* arg, const at::Tensor& t, float low, float high,
                              const char* expected) {
  if (!values_checkable(t) || t.numel() == 0) return;
  const at::Tensor values = t.contiguous();
  const float* data = values.data_ptr<float>();
  const int64_t n = values.numel();
  int ok = 1;
  for (int64_t i = 0; i < n; ++i) ok &= (data[i] >= low) & (kHighOpen ? data[i] < high : data[i] <= high);
  if (ok) return;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(data[i] >= low && (kHighOpen ? data[i] < high : data[i] <= high), op, ": ", arg, " values must be ",
                expected, ", got ", arg, format_index(i, values.sizes()), " = ", data[i]);
  }
}

inline void check_probabilities(const char* op, const char* arg, const at::Tensor& probs) {
  check_value_range<false>(op, arg, probs, 0.0f, std::numeric_limits<float>::max(), "finite and >= 0");
}

// Uniform coins: in [0, 1) (NaN fails the test).
inline void check_uniforms(const char* op, const char* arg, const at::Tensor& uniforms) {
  check_value_range<true>(op, arg, uniforms, 0.0f, 1.0f, "in [0, 1)");
}

inline void check_tree_verify_greedy_inputs(const at::Tensor& candidates, const at::Tensor& target_predict,
                                            const at::Tensor& next_token, const at::Tensor& next_sibling) {
  const char* op = "tree_verify_greedy";
  check_tensor(op, "candidates", candidates, {{"B", kAnySize}, {"N", kAnySize}}, {at::kLong});
  const int64_t B = candidates.size(0), N = candidates.size(1);
  const at::Device dev = candidates.device();
  check_tensor(op, "target_predict", target_predict, {{"B", B}, {"N", N}}, {at::kLong}, dev);
  check_tensor(op, "next_token", next_token, {{"B", B}, {"N", N}}, {at::kLong}, dev);
  check_tensor(op, "next_sibling", next_sibling, {{"B", B}, {"N", N}}, {at::kLong}, dev);
  TORCH_CHECK(N != 0, op, ": candidates must hold at least the root node (N >= 1), got N = 0");
  check_tree_links(op, next_token, next_sibling);
}

inline void check_tree_verify_sample_inputs(const at::Tensor& candidates, const at::Tensor& target_probs,
                                            const at::Tensor& draft_probs, const at::Tensor& next_token,
                                            const at::Tensor& next_sibling, const at::Tensor& uniform_accept,
                                            const at::Tensor& uniform_final) {
  const char* op = "tree_verify_sample";
  check_tensor(op, "candidates", candidates, {{"B", kAnySize}, {"N", kAnySize}}, {at::kLong});
  const int64_t B = candidates.size(0), N = candidates.size(1);
  const at::Device dev = candidates.device();
  check_tensor(op, "target_probs", target_probs, {{"B", B}, {"N", N}, {"V", kAnySize}}, {at::kFloat}, dev);
  const int64_t V = target_probs.size(2);
  check_tensor(op, "draft_probs", draft_probs, {{"B", B}, {"N", N}, {"V", V}}, {at::kFloat}, dev);
  check_last_dim_contiguous(op, "target_probs", target_probs);
  check_last_dim_contiguous(op, "draft_probs", draft_probs);
  check_tensor(op, "next_token", next_token, {{"B", B}, {"N", N}}, {at::kLong}, dev);
  check_tensor(op, "next_sibling", next_sibling, {{"B", B}, {"N", N}}, {at::kLong}, dev);
  check_tensor(op, "uniform_accept", uniform_accept, {{"B", B}, {"N", N}}, {at::kFloat}, dev);
  check_tensor(op, "uniform_final", uniform_final, {{"B", B}}, {at::kFloat}, dev);
  TORCH_CHECK(N != 0 && V != 0, op, ": need N >= 1 nodes and V >= 1 tokens, got N = ", N, ", V = ", V);
  if (values_checkable(candidates) && candidates.numel() > 0) {
    // the root's token is never looked up; every other node's must index the vocabulary
    const at::Tensor tokens = candidates.contiguous();
    const int64_t* data = tokens.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 1; i < N; ++i) {
        const int64_t token = data[b * N + i];
        TORCH_CHECK(token >= 0 && token < V, op, ": candidates values must be in [0, V) = [0, ", V,
                    "), got candidates[", b, ", ", i, "] = ", token);
      }
    }
  }
  check_tree_links(op, next_token, next_sibling);
  check_probabilities(op, "target_probs", target_probs);
  check_probabilities(op, "draft_probs", draft_probs);
  check_uniforms(op, "uniform_accept", uniform_accept);
  check_uniforms(op, "uniform_final", uniform_final);
}

// ------------------------------------------------------------------------------ kv_compact
// kv may have any dtype (the kernels move elements, they do no arithmetic).
inline void check_kv_compact_inputs(const at::Tensor& kv, const at::Tensor& prefix_len,
                                    const at::Tensor& accept_index, const at::Tensor& accept_len) {
  const char* op = "kv_compact";
  const std::vector<DimSpec> kv_spec = {
      {"L", kAnySize}, {"B", kAnySize}, {"H", kAnySize}, {"S", kAnySize}, {"D", kAnySize}};
  TORCH_CHECK(kv.defined() && kv.dim() == 5, op, ": kv must have shape ", format_spec(kv_spec), ", got ",
              kv.defined() ? format_sizes(kv.sizes()) : std::string("None"));
  TORCH_CHECK(kv.is_contiguous(), op, ": kv must be contiguous, got strides ", format_sizes(kv.strides()));
  const int64_t B = kv.size(1), S = kv.size(3);
  const at::Device dev = kv.device();
  check_tensor(op, "prefix_len", prefix_len, {{"B", B}}, {at::kLong}, dev);
  check_tensor(op, "accept_index", accept_index, {{"B", B}, {"A", kAnySize}}, {at::kLong}, dev);
  const int64_t A = accept_index.size(1);
  check_tensor(op, "accept_len", accept_len, {{"B", B}}, {at::kLong}, dev);
  if (!values_checkable(kv) || B == 0) return;
  const at::Tensor starts_t = prefix_len.contiguous(), index_t = accept_index.contiguous(),
                   lens_t = accept_len.contiguous();
  const int64_t* starts = starts_t.data_ptr<int64_t>();
  const int64_t* index = index_t.data_ptr<int64_t>();
  const int64_t* lens = lens_t.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n_keep = lens[b], start = starts[b];
    const int64_t* kept = index + b * A;
    TORCH_CHECK(n_keep >= 0 && n_keep <= A, op, ": accept_len values must be in [0, A] = [0, ", A,
                "], got accept_len[", b, "] = ", n_keep);
    TORCH_CHECK(start >= 0, op, ": prefix_len values must be >= 0, got prefix_len[", b, "] = ", start);
    TORCH_CHECK(n_keep == 0 || kept[0] >= 0, op, ": accept_index values must be >= 0 within accept_len, got accept_index[",
                b, ", 0] = ", kept[0]);
    for (int64_t i = 1; i < n_keep; ++i) {
      TORCH_CHECK(kept[i] > kept[i - 1], op, ": accept_index must be strictly increasing within accept_len, got accept_index[",
                  b, ", ", i - 1, ":", i + 1, "] = [", kept[i - 1], ", ", kept[i], "]");
    }
    // compared without adding: start + kept[...] may overflow int64 (start, kept[...] >= 0 here)
    TORCH_CHECK(n_keep == 0 || (start < S && kept[n_keep - 1] < S - start), op,
                ": prefix_len[b] + accept_index[b, i] must be < S = ", S, ", got prefix_len[", b, "] = ", start,
                " and accept_index[", b, ", ", n_keep - 1, "] = ", kept[n_keep - 1]);
  }
}

}  // namespace sparrow
