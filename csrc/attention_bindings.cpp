// Flash-attention kernel sandbox for numpy arrays: the scalar reference or the fast path, run directly (float32).
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "csrc/bindings.h"

#include <pybind11/stl.h>
#include "kernels/attention.h"

namespace {

using omni_fast::AttentionParams;
using omni_fast::AttnInputLayout;
using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using BoolArray = py::array_t<bool, py::array::c_style | py::array::forcecast>;

AttnInputLayout parse_layout(const std::string& name) {
  if (name == "BNSD") return AttnInputLayout::kBNSD;
  if (name == "BSND") return AttnInputLayout::kBSND;
  if (name == "BSH") return AttnInputLayout::kBSH;
  if (name == "TND") return AttnInputLayout::kTND;
  throw py::value_error("attention: input_layout must be BNSD, BSND, BSH or TND, got " + name);
}

// Keeps the cumulative-ends and mask buffers alive while the params point into them.
struct Call {
  AttentionParams p;
  I64Array cu_q, cu_kv;
  BoolArray mask;
};

Call make_params(const F32Array& q, const F32Array& k, const F32Array& v, int64_t head_num, const std::string& layout,
                 const std::optional<I64Array>& cu_q, const std::optional<I64Array>& cu_kv,
                 const std::optional<BoolArray>& mask, std::optional<double> scale, int64_t sparse_mode,
                 int64_t pre_tokens, int64_t next_tokens) {
  Call call;
  const AttnInputLayout lay = parse_layout(layout);
  const bool tnd = lay == AttnInputLayout::kTND;
  if (tnd != (cu_q.has_value() && cu_kv.has_value())) {
    throw py::value_error("attention: TND needs cu_q and cu_kv, the other layouts take neither");
  }
  if (tnd) {
    call.cu_q = *cu_q;
    call.cu_kv = *cu_kv;
  }
  std::vector<int64_t> mask_shape;
  if (mask) {
    call.mask = *mask;
    mask_shape.assign(call.mask.shape(), call.mask.shape() + call.mask.ndim());
  }
  AttentionParams& p = call.p;
  const std::string shape_error = omni_fast::attention_shapes(
      lay, head_num, q.ndim(), std::vector<int64_t>(q.shape(), q.shape() + q.ndim()).data(), k.ndim(),
      std::vector<int64_t>(k.shape(), k.shape() + k.ndim()).data(), v.ndim(),
      std::vector<int64_t>(v.shape(), v.shape() + v.ndim()).data(), int(mask_shape.size()), mask_shape.data(),
      tnd ? call.cu_q.size() : 0, tnd ? call.cu_kv.size() : 0, &p);
  if (!shape_error.empty()) throw py::value_error("attention: " + shape_error);
  if (tnd) {
    p.cu_q = call.cu_q.data();
    p.cu_kv = call.cu_kv.data();
  }
  if (mask) p.mask = reinterpret_cast<const uint8_t*>(call.mask.data());
  p.scale = scale ? float(*scale) : float(1.0 / std::sqrt(double(p.head_dim)));
  p.sparse_mode = sparse_mode;
  p.pre_tokens = pre_tokens;
  p.next_tokens = next_tokens;
  const std::string error = omni_fast::attention_check(p);
  if (!error.empty()) throw py::value_error("attention: " + error);
  return call;
}

std::vector<py::ssize_t> shape_of(const F32Array& a) { return {a.shape(), a.shape() + a.ndim()}; }

std::vector<py::ssize_t> lse_shape(const AttentionParams& p) {
  switch (p.layout) {
    case omni_fast::AttnLayout::kBNSD:
      return {p.batch, p.q_heads, p.q_seq};
    case omni_fast::AttnLayout::kBSND:
      return {p.batch, p.q_seq, p.q_heads};
    default:
      return {p.q_seq, p.q_heads};
  }
}

py::tuple forward(const F32Array& q, const F32Array& k, const F32Array& v, int64_t head_num,
                  const std::string& layout, const std::optional<I64Array>& cu_q,
                  const std::optional<I64Array>& cu_kv, const std::optional<BoolArray>& mask,
                  std::optional<double> scale, int64_t sparse_mode, int64_t pre_tokens, int64_t next_tokens,
                  bool reference) {
  const Call call =
      make_params(q, k, v, head_num, layout, cu_q, cu_kv, mask, scale, sparse_mode, pre_tokens, next_tokens);
  py::array_t<float> out(shape_of(q)), lse(lse_shape(call.p));
  {
    py::gil_scoped_release release;
    (reference ? omni_fast::attention_forward_reference<float> : omni_fast::attention_forward<float>)(
        call.p, q.data(), k.data(), v.data(), out.mutable_data(), lse.mutable_data());
  }
  return py::make_tuple(out, lse);
}

py::tuple backward(const F32Array& dout, const F32Array& q, const F32Array& k, const F32Array& v,
                   const F32Array& out, const F32Array& lse, int64_t head_num, const std::string& layout,
                   const std::optional<I64Array>& cu_q, const std::optional<I64Array>& cu_kv,
                   const std::optional<BoolArray>& mask, std::optional<double> scale, int64_t sparse_mode,
                   int64_t pre_tokens, int64_t next_tokens, bool reference) {
  const Call call =
      make_params(q, k, v, head_num, layout, cu_q, cu_kv, mask, scale, sparse_mode, pre_tokens, next_tokens);
  if (shape_of(dout) != shape_of(q) || shape_of(out) != shape_of(q)) {
    throw py::value_error("attention: dout and out must have the query's shape");
  }
  if (shape_of(lse) != lse_shape(call.p)) throw py::value_error("attention: lse has the wrong shape");
  py::array_t<float> dq(shape_of(q)), dk(shape_of(k)), dv(shape_of(v));
  {
    py::gil_scoped_release release;
    (reference ? omni_fast::attention_backward_reference<float> : omni_fast::attention_backward<float>)(
        call.p, dout.data(), q.data(), k.data(), v.data(), out.data(), lse.data(), dq.mutable_data(),
        dk.mutable_data(), dv.mutable_data());
  }
  return py::make_tuple(dq, dk, dv);
}

}  // namespace

void register_attention(py::module_& m) {
  m.def("attention_forward", &forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("head_num"),
        py::arg("layout") = "BNSD", py::arg("cu_q") = py::none(), py::arg("cu_kv") = py::none(),
        py::arg("mask") = py::none(), py::arg("scale") = py::none(), py::arg("sparse_mode") = 0,
        py::arg("pre_tokens") = 2147483647, py::arg("next_tokens") = 2147483647, py::arg("reference") = false,
        "Flash attention forward -> (out, lse) on float32 numpy arrays (kernel sandbox).");
  m.def("attention_backward", &backward, py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("head_num"), py::arg("layout") = "BNSD", py::arg("cu_q") = py::none(),
        py::arg("cu_kv") = py::none(), py::arg("mask") = py::none(), py::arg("scale") = py::none(),
        py::arg("sparse_mode") = 0, py::arg("pre_tokens") = 2147483647, py::arg("next_tokens") = 2147483647,
        py::arg("reference") = false,
        "Flash attention backward -> (dq, dk, dv) on float32 numpy arrays (kernel sandbox).");
}
