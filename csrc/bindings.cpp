// ecoflap_fast._C: operator schemas and the CPU (and, when built, CUDA) registrations.
// Thin on purpose: argument checks live in checks.cpp, math in cpu/ and cuda/.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

// Importing ecoflap_fast._C runs the static registrations below; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "ecoflap_fast C++/CUDA operators", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(ecoflap_fast, m) {
  m.def("pack_24_cutlass(Tensor dense) -> (Tensor values, Tensor meta)");
  m.def("unpack_24_cutlass(Tensor values, Tensor meta) -> Tensor");
  m.def("pack_bitmask(Tensor dense, int n, int m) -> (Tensor values, Tensor bitmask, Tensor row_offsets)");
  m.def("unpack_bitmask(Tensor values, Tensor bitmask, int rows, int cols) -> Tensor");
  m.def("select_mask(Tensor scores, Tensor? scaler_row, bool use_abs, int k, int n, int m, bool per_matrix) -> Tensor");
  m.def("select_prune_(Tensor(a!) weight, Tensor? scaler_row, int k, int n, int m, bool per_matrix) -> int");
}

TORCH_LIBRARY_IMPL(ecoflap_fast, CPU, m) {
  m.impl("pack_24_cutlass", &ecoflap::pack_24_cutlass_cpu);
  m.impl("unpack_24_cutlass", &ecoflap::unpack_24_cutlass_cpu);
  m.impl("pack_bitmask", &ecoflap::pack_bitmask_cpu);
  m.impl("unpack_bitmask", &ecoflap::unpack_bitmask_cpu);
  m.impl("select_mask", &ecoflap::select_mask_cpu);
  m.impl("select_prune_", &ecoflap::select_prune_cpu);
}
