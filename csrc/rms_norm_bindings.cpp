// RMSNorm kernel sandbox for numpy arrays: the scalar reference or the fast path, run directly.
#include "csrc/bindings.h"
#include <string>
#include <vector>

#include "kernels/rms_norm.h"

namespace {

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;

omni_fast::RmsNormParams rms_norm_check(const F32Array& x, const F32Array& w, float eps) {
  if (x.ndim() < 1) throw py::value_error("rms_norm: x must have at least one axis");
  if (w.ndim() != 1 || w.shape(0) != x.shape(x.ndim() - 1)) {
    throw py::value_error("rms_norm: weight must have shape [" + std::to_string(x.shape(x.ndim() - 1)) +
                          "] (the last axis of x)");
  }
  if (!(eps > 0.f)) throw py::value_error("rms_norm: eps must be positive");
  omni_fast::RmsNormParams p;
  p.cols = x.shape(x.ndim() - 1);
  p.rows = p.cols == 0 ? 0 : x.size() / p.cols;
  p.eps = eps;
  return p;
}

py::array_t<float> rms_norm_forward(const F32Array& x, const F32Array& w, float eps, bool reference) {
  const auto p = rms_norm_check(x, w, eps);
  py::array_t<float> y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  {
    py::gil_scoped_release release;
    (reference ? omni_fast::rms_norm_forward_reference<float> : omni_fast::rms_norm_forward<float>)(
        p, x.data(), w.data(), y.mutable_data());
  }
  return y;
}

py::tuple rms_norm_backward(const F32Array& dy, const F32Array& x, const F32Array& w, float eps, bool reference) {
  const auto p = rms_norm_check(x, w, eps);
  if (dy.size() != x.size() || dy.ndim() != x.ndim()) throw py::value_error("rms_norm: dy must have x's shape");
  py::array_t<float> dx(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  py::array_t<float> dw(std::vector<py::ssize_t>{p.cols});
  {
    py::gil_scoped_release release;
    (reference ? omni_fast::rms_norm_backward_reference<float> : omni_fast::rms_norm_backward<float>)(
        p, dy.data(), x.data(), w.data(), dx.mutable_data(), dw.mutable_data());
  }
  return py::make_tuple(dx, dw);
}

}  // namespace

void register_rms_norm(py::module_& m) {
  m.def("rms_norm_forward", &rms_norm_forward, py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::arg("reference") = false, "RMSNorm forward on float32 numpy arrays (kernel sandbox).");
  m.def("rms_norm_backward", &rms_norm_backward, py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::arg("reference") = false, "RMSNorm backward -> (dx, dw) on float32 numpy arrays (kernel sandbox).");
}
