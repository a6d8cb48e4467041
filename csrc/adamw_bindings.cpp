// Multi-tensor AdamW kernel sandbox for numpy arrays: the scalar reference or the fast path, run directly.
// The update works in place, so weights, moments and low-precision copies must already be C-contiguous, writable
// arrays of the right dtype (a converted copy would take the update and be thrown away). numpy has no bfloat16: a
// uint16 array stands for bfloat16 storage (its raw bits), for gradients and for the low-precision parameters.
#include "csrc/bindings.h"

#include <pybind11/stl.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "kernels/adamw.h"

namespace {

using omni_fast::AdamWParams;
using omni_fast::AdamWTensor;
using omni_fast::bf16;
using omni_fast::DType;
using omni_fast::GradTensor;

std::string where(const char* what, size_t i) { return std::string("adamw: ") + what + "[" + std::to_string(i) + "]"; }

// Gradients are only read: any layout, converted to a contiguous array kept alive in `keep`.
GradTensor grad_view(const py::array& a, size_t i, std::vector<py::array>& keep) {
  GradTensor g;
  if (a.dtype().equal(py::dtype::of<float>())) {
    g.dtype = DType::kFloat32;
  } else if (a.dtype().equal(py::dtype::of<uint16_t>())) {
    g.dtype = DType::kBFloat16;
  } else {
    throw py::value_error(where("grads", i) + " must be float32 or uint16 (bfloat16 bits), got " +
                          py::str(a.dtype()).cast<std::string>());
  }
  keep.push_back(py::array::ensure(a, py::array::c_style));
  g.data = keep.back().data();
  g.numel = a.size();
  return g;
}

template <typename T>
T* inplace_view(py::array a, const py::array& grad, const char* what, size_t i, const char* dtype_name) {
  if (!a.dtype().equal(py::dtype::of<T>())) {
    throw py::value_error(where(what, i) + " must be " + dtype_name + ", got " + py::str(a.dtype()).cast<std::string>());
  }
  if (!(a.flags() & py::array::c_style) || !a.writeable()) {
    throw py::value_error(where(what, i) + " must be C-contiguous and writable (it is updated in place)");
  }
  if (a.ndim() != grad.ndim() || !std::equal(a.shape(), a.shape() + a.ndim(), grad.shape())) {
    throw py::value_error(where(what, i) + " must have the shape of grads[" + std::to_string(i) + "]");
  }
  return static_cast<T*>(a.mutable_data());
}

void adamw_update(const std::vector<py::array>& grads, const std::vector<py::array>& weights,
                  const std::vector<py::array>& exp_avg, const std::vector<py::array>& exp_avg_sq,
                  const std::vector<std::optional<py::array>>& low, const std::vector<bool>& decay, float lr_wd,
                  float step_size, float bc2_sqrt, float grad_scale, double beta1, double beta2, double eps,
                  bool reference) {
  const size_t n = grads.size();
  for (const size_t size : {weights.size(), exp_avg.size(), exp_avg_sq.size(), low.size(), decay.size()}) {
    if (size != n) throw py::value_error("adamw: every list needs one entry per parameter");
  }
  std::vector<py::array> keep;
  keep.reserve(n);
  std::vector<AdamWTensor> tensors(n);
  for (size_t i = 0; i < n; ++i) {
    AdamWTensor& x = tensors[i];
    x.grad = grad_view(grads[i], i, keep);
    x.weight = inplace_view<float>(weights[i], grads[i], "weights", i, "float32");
    x.exp_avg = inplace_view<float>(exp_avg[i], grads[i], "exp_avg", i, "float32");
    x.exp_avg_sq = inplace_view<float>(exp_avg_sq[i], grads[i], "exp_avg_sq", i, "float32");
    if (low[i]) {
      x.low = reinterpret_cast<bf16*>(inplace_view<uint16_t>(*low[i], grads[i], "low", i, "uint16 (bfloat16 bits)"));
    }
    x.decay = decay[i];
  }
  AdamWParams p;
  p.lr_wd = lr_wd;
  p.step_size = step_size;
  p.bc2_sqrt = bc2_sqrt;
  p.grad_scale = grad_scale;
  // Rounded from double, as the MindSpore face does (see AdamWParams).
  p.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  p.beta2 = static_cast<float>(beta2);
  p.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  p.eps = static_cast<float>(eps);
  py::gil_scoped_release release;
  (reference ? omni_fast::adamw_update_reference : omni_fast::adamw_update)(p, tensors.data(),
                                                                            static_cast<int64_t>(n));
}

double grad_squared_sum(const std::vector<py::array>& grads, bool reference) {
  std::vector<py::array> keep;
  keep.reserve(grads.size());
  std::vector<GradTensor> tensors;
  for (size_t i = 0; i < grads.size(); ++i) tensors.push_back(grad_view(grads[i], i, keep));
  py::gil_scoped_release release;
  return (reference ? omni_fast::squared_sum_reference : omni_fast::squared_sum)(
      tensors.data(), static_cast<int64_t>(tensors.size()));
}

}  // namespace

void register_adamw(py::module_& m) {
  m.def("adamw_update", &adamw_update, py::arg("grads"), py::arg("weights"), py::arg("exp_avg"),
        py::arg("exp_avg_sq"), py::arg("low"), py::arg("decay"), py::kw_only(), py::arg("lr_wd"),
        py::arg("step_size"), py::arg("bc2_sqrt"), py::arg("grad_scale"), py::arg("beta1"), py::arg("beta2"),
        py::arg("eps"), py::arg("reference") = false,
        "One multi-tensor AdamW step on numpy arrays, in place (kernel sandbox). Per parameter: a float32 or "
        "uint16 (bfloat16 bits) grad; float32 weights, exp_avg, exp_avg_sq; `low` a uint16 array to receive "
        "the new weights rounded to bfloat16, or None; `decay` whether weight decay applies.");
  m.def("grad_squared_sum", &grad_squared_sum, py::arg("grads"), py::arg("reference") = false,
        "Sum of the squared entries of float32 or uint16 (bfloat16 bits) arrays, accumulated in double "
        "(kernel sandbox).");
}
