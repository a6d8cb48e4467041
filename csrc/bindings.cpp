// omni_fast._C: host-side ops, and a sandbox per kernel that runs its reference or fast path on numpy buffers so
// tests and benchmarks can check and time each version without going through MindSpore.
#include "csrc/bindings.h"

#include <omp.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "omni_fast compiled host-side ops and kernel sandboxes";
  m.def(
      "build_info",
      [] {
        py::dict info;
        info["cpu_features"] = OMNI_FAST_CPU_FEATURES;
        info["arch_flags"] = OMNI_FAST_ARCH_FLAGS;
        info["openmp_max_threads"] = omp_get_max_threads();
        return info;
      },
      "How the kernels were built: CPU features detected at build time, arch flags, OpenMP threads.");
  register_activation(m);
  register_adamw(m);
  register_attention(m);
  register_convert(m);
  register_layer_norm(m);
  register_rms_norm(m);
  register_rope_index(m);
  register_rotary(m);
  register_scatter(m);
}
