// Rotary-embedding kernel sandbox for numpy arrays: the scalar reference or the fast path, run directly.
#include "csrc/bindings.h"
#include <string>
#include <vector>

#include "kernels/rotary.h"

namespace {

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;

std::string shape_str(const F32Array& a) {
  std::string s = "[";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + "]";
}

// x [..., N, D]; cos and sin [..., 1, D] or [..., D] with x's leading axes; D even.
omni_fast::RotaryParams rotary_check(const F32Array& x, const F32Array& cos, const F32Array& sin) {
  if (x.ndim() < 2) throw py::value_error("rotary: x must be [..., heads, head_dim], got " + shape_str(x));
  omni_fast::RotaryParams p;
  p.dim = x.shape(x.ndim() - 1);
  p.heads = x.shape(x.ndim() - 2);
  p.rows = 1;
  for (py::ssize_t i = 0; i + 2 < x.ndim(); ++i) p.rows *= x.shape(i);
  if (p.dim % 2 != 0) throw py::value_error("rotary: head_dim must be even, got " + std::to_string(p.dim));
  for (const F32Array* t : {&cos, &sin}) {
    bool ok = t->ndim() == x.ndim() || t->ndim() == x.ndim() - 1;
    for (py::ssize_t i = 0; ok && i + 2 < x.ndim(); ++i) ok = t->shape(i) == x.shape(i);
    ok = ok && t->shape(t->ndim() - 1) == p.dim && (t->ndim() == x.ndim() - 1 || t->shape(t->ndim() - 2) == 1);
    if (!ok) {
      throw py::value_error("rotary: cos and sin must be [..., 1, D] or [..., D] with x's leading axes; x is " +
                            shape_str(x) + ", got " + shape_str(*t));
    }
  }
  return p;
}

py::array_t<float> rotary_run(const F32Array& x, const F32Array& cos, const F32Array& sin, bool backward,
                              bool reference) {
  const auto p = rotary_check(x, cos, sin);
  py::array_t<float> y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  using Fn = void (*)(const omni_fast::RotaryParams&, const float*, const float*, const float*, float*);
  const Fn fn = backward ? (reference ? omni_fast::rotary_backward_reference<float> : omni_fast::rotary_backward<float>)
                         : (reference ? omni_fast::rotary_forward_reference<float> : omni_fast::rotary_forward<float>);
  {
    py::gil_scoped_release release;
    fn(p, x.data(), cos.data(), sin.data(), y.mutable_data());
  }
  return y;
}

}  // namespace

void register_rotary(py::module_& m) {
  m.def(
      "rotary_forward",
      [](const F32Array& x, const F32Array& cos, const F32Array& sin, bool reference) {
        return rotary_run(x, cos, sin, false, reference);
      },
      py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("reference") = false,
      "x * cos + rotate_half(x) * sin on float32 numpy arrays (kernel sandbox).");
  m.def(
      "rotary_backward",
      [](const F32Array& dy, const F32Array& cos, const F32Array& sin, bool reference) {
        return rotary_run(dy, cos, sin, true, reference);
      },
      py::arg("dy"), py::arg("cos"), py::arg("sin"), py::arg("reference") = false,
      "dy * cos + rotate_half^T(dy * sin) (the rotary backward) on float32 numpy arrays (kernel sandbox).");
}
