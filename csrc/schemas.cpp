// The schema of every torch.ops.sparrow.* op (docs/ops.md is the contract), defined once
// here; the kernels register per device in csrc/<op>.cpp (CPU) and csrc/cuda/<op>.cu (CUDA).
// Holds no kernels. Mutated arguments are marked Tensor(a!) so functionalization and
// torch.compile know kv_compact writes its input.
#include <torch/library.h>

TORCH_LIBRARY(sparrow, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def(
      "window_attn(Tensor q, Tensor k, Tensor v, Tensor kv_len, Tensor q_pos, int window, int n_anchor, "
      "Tensor? tree_mask, float scale) -> (Tensor out, Tensor lse)",
      tags);
  m.def(
      "window_attn_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor kv_len, Tensor q_pos, int window, int n_anchor, Tensor? tree_mask, float scale) "
      "-> (Tensor dq, Tensor dk, Tensor dv)",
      tags);
  m.def("gather_hidden(Tensor[] hidden, Tensor index) -> Tensor", tags);
  m.def(
      "tree_verify_greedy(Tensor candidates, Tensor target_predict, Tensor next_token, Tensor next_sibling) "
      "-> (Tensor accept_index, Tensor accept_len, Tensor bonus_token)",
      tags);
  m.def(
      "tree_verify_sample(Tensor candidates, Tensor target_probs, Tensor draft_probs, Tensor next_token, "
      "Tensor next_sibling, Tensor uniform_accept, Tensor uniform_final) "
      "-> (Tensor accept_index, Tensor accept_len, Tensor bonus_token)",
      tags);
  m.def("kv_compact(Tensor(a!) kv, Tensor prefix_len, Tensor accept_index, Tensor accept_len) -> ()", tags);
}

// setup.py builds this file into the Python module sparrow_kernels._C: importing it runs the
// static registrations above. The CMake (libtorch) build has no Python and leaves this out.
#ifdef SPARROW_PYTHON_MODULE
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // m_name
      "Registers the torch.ops.sparrow.* schemas and their CPU/CUDA kernels.",
      -1,       // m_size
      nullptr,  // m_methods
      nullptr,  // m_slots
      nullptr,  // m_traverse
      nullptr,  // m_clear
      nullptr,  // m_free
  };
  return PyModule_Create(&module_def);
}
#endif
