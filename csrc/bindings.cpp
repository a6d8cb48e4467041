// omni_fast._C: host-side ops, and a sandbox per kernel that runs its reference or fast path on numpy buffers so
// tests and benchmarks can check and time each version without going through MindSpore.
#include "csrc/bindings.h"

#include <omp.h>

#include <chrono>
#include <stdexcept>

namespace {

// The arithmetic ceiling of this build on this machine: every OpenMP thread runs kChains independent chains of
// multiply-adds on 16-float vectors (one zmm with AVX-512, two ymm with AVX2: whatever the build flags allow) for
// `seconds`. Enough chains to cover the FMA latency times the FMA ports; nothing is loaded or stored inside the loop.
// A GEMM or a training step can approach this figure, never pass it.
double fma_peak_gflops(double seconds) {
  if (!(seconds > 0.0 && seconds <= 10.0)) throw std::invalid_argument("seconds must be in (0, 10]");
  typedef float vf __attribute__((vector_size(64)));
  constexpr int kChains = 12;
  constexpr int64_t kInner = 1 << 16;
  double flops = 0.0, total = 0.0;
  const auto start = std::chrono::steady_clock::now();
#pragma omp parallel reduction(+ : flops, total)
  {
    vf acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = vf{} + float(c);
    const vf mul = vf{} + 0.999999f, add = vf{} + 1e-6f;
    int64_t rounds = 0;
    do {
      for (int64_t i = 0; i < kInner; ++i) {
        for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * mul + add;
      }
      ++rounds;
    } while (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < seconds);
    flops += 2.0 * 16 * kChains * kInner * rounds;
    for (int c = 0; c < kChains; ++c) total += acc[c][0];  // keeps the chains alive
  }
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (total != total) throw std::runtime_error("fma_peak_gflops: NaN in the chains");
  return flops / elapsed / 1e9;
}

}  // namespace

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
  m.def("fma_peak_gflops", &fma_peak_gflops, py::arg("seconds") = 0.25,
        "fp32 GFLOP/s of independent multiply-add chains on all OpenMP threads for `seconds` (0 < s <= 10): the "
        "arithmetic ceiling of this build on this machine, the yardstick above the GEMM peak.",
        py::call_guard<py::gil_scoped_release>());
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
