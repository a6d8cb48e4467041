// SwiGLU and GELU kernel sandboxes for numpy arrays: the scalar reference or the fast path, run directly.
#include <algorithm>
#include <string>
#include <vector>

#include "csrc/bindings.h"
#include "kernels/gelu.h"
#include "kernels/swiglu.h"

namespace {

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;

py::array_t<float> like(const F32Array& a) {
  return py::array_t<float>(std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim()));
}

void check_same_shape(const char* op, const char* name, const F32Array& a, const F32Array& b, const char* b_name) {
  const bool same = a.ndim() == b.ndim() && std::equal(a.shape(), a.shape() + a.ndim(), b.shape());
  if (!same) throw py::value_error(std::string(op) + ": " + name + " must have " + b_name + "'s shape");
}

py::array_t<float> swiglu_forward(const F32Array& gate, const F32Array& up, bool reference) {
  check_same_shape("swiglu", "up", up, gate, "gate");
  auto out = like(gate);
  const omni_fast::SwiGluParams p{gate.size()};
  {
    py::gil_scoped_release release;
    (reference ? omni_fast::swiglu_forward_reference<float> : omni_fast::swiglu_forward<float>)(
        p, gate.data(), up.data(), out.mutable_data());
  }
  return out;
}

py::tuple swiglu_backward(const F32Array& dout, const F32Array& gate, const F32Array& up, bool reference) {
  check_same_shape("swiglu", "up", up, gate, "gate");
  check_same_shape("swiglu", "dout", dout, gate, "gate");
  auto d_gate = like(gate), d_up = like(gate);
  const omni_fast::SwiGluParams p{gate.size()};
  {
    py::gil_scoped_release release;
    (reference ? omni_fast::swiglu_backward_reference<float> : omni_fast::swiglu_backward<float>)(
        p, dout.data(), gate.data(), up.data(), d_gate.mutable_data(), d_up.mutable_data());
  }
  return py::make_tuple(d_gate, d_up);
}

py::array_t<float> gelu_forward(const F32Array& x, bool reference) {
  auto y = like(x);
  const omni_fast::GeluParams p{x.size()};
  {
    py::gil_scoped_release release;
    (reference ? omni_fast::gelu_forward_reference<float> : omni_fast::gelu_forward<float>)(p, x.data(),
                                                                                          y.mutable_data());
  }
  return y;
}

py::array_t<float> gelu_backward(const F32Array& dout, const F32Array& x, bool reference) {
  check_same_shape("gelu", "dout", dout, x, "x");
  auto dx = like(x);
  const omni_fast::GeluParams p{x.size()};
  {
    py::gil_scoped_release release;
    (reference ? omni_fast::gelu_backward_reference<float> : omni_fast::gelu_backward<float>)(
        p, dout.data(), x.data(), dx.mutable_data());
  }
  return dx;
}

}  // namespace

void register_activation(py::module_& m) {
  m.def("swiglu_forward", &swiglu_forward, py::arg("gate"), py::arg("up"), py::arg("reference") = false,
        "silu(gate) * up on float32 numpy arrays (kernel sandbox).");
  m.def("swiglu_backward", &swiglu_backward, py::arg("dout"), py::arg("gate"), py::arg("up"),
        py::arg("reference") = false, "SwiGLU backward -> (d_gate, d_up) on float32 numpy arrays (kernel sandbox).");
  m.def("gelu_forward", &gelu_forward, py::arg("x"), py::arg("reference") = false,
        "Exact (erf) GELU on a float32 numpy array (kernel sandbox).");
  m.def("gelu_backward", &gelu_backward, py::arg("dout"), py::arg("x"), py::arg("reference") = false,
        "GELU backward -> dx on float32 numpy arrays (kernel sandbox).");
}
