// LayerNorm kernel sandbox for numpy arrays: the scalar reference or the fast path, run directly.
#include "csrc/bindings.h"
#include <string>
#include <vector>

#include "kernels/layer_norm.h"

namespace {

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;

omni_fast::LayerNormParams layer_norm_check(const F32Array& x, const F32Array& w, float eps) {
  if (x.ndim() < 1) throw py::value_error("layer_norm: x must have at least one axis");
  if (w.ndim() != 1 || w.shape(0) != x.shape(x.ndim() - 1)) {
    throw py::value_error("layer_norm: weight must have shape [" + std::to_string(x.shape(x.ndim() - 1)) +
                          "] (the last axis of x)");
  }
  if (!(eps > 0.f)) throw py::value_error("layer_norm: eps must be positive");
  omni_fast::LayerNormParams p;
  p.cols = x.shape(x.ndim() - 1);
  p.rows = p.cols == 0 ? 0 : x.size() / p.cols;
  p.eps = eps;
  return p;
}

py::array_t<float> layer_norm_forward(const F32Array& x, const F32Array& w, const F32Array& b, float eps,
                                      bool reference) {
  const auto p = layer_norm_check(x, w, eps);
  if (b.ndim() != 1 || b.shape(0) != p.cols) throw py::value_error("layer_norm: bias must have weight's shape");
  py::array_t<float> y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  {
    py::gil_scoped_release release;
    (reference ? omni_fast::layer_norm_forward_reference<float> : omni_fast::layer_norm_forward<float>)(
        p, x.data(), w.data(), b.data(), y.mutable_data());
  }
  return y;
}

py::tuple layer_norm_backward(const F32Array& dy, const F32Array& x, const F32Array& w, float eps, bool reference) {
  const auto p = layer_norm_check(x, w, eps);
  if (dy.size() != x.size() || dy.ndim() != x.ndim()) throw py::value_error("layer_norm: dy must have x's shape");
  py::array_t<float> dx(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  py::array_t<float> dw(std::vector<py::ssize_t>{p.cols}), db(std::vector<py::ssize_t>{p.cols});
  {
    py::gil_scoped_release release;
    (reference ? omni_fast::layer_norm_backward_reference<float> : omni_fast::layer_norm_backward<float>)(
        p, dy.data(), x.data(), w.data(), dx.mutable_data(), dw.mutable_data(), db.mutable_data());
  }
  return py::make_tuple(dx, dw, db);
}

}  // namespace

void register_layer_norm(py::module_& m) {
  m.def("layer_norm_forward", &layer_norm_forward, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::arg("reference") = false, "LayerNorm forward on float32 numpy arrays (kernel sandbox).");
  m.def("layer_norm_backward", &layer_norm_backward, py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::arg("reference") = false,
        "LayerNorm backward -> (dx, dw, db) on float32 numpy arrays (kernel sandbox).");
}
