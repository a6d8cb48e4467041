// Multimodal scatter kernel sandbox for numpy arrays: the scalar reference or the fast path, run directly.
// numpy has no bfloat16, so a uint16 array stands for bfloat16 storage (its raw bits): the op is a copy, and
// running it on uint16 exercises exactly the bf16 instantiation.
#include "csrc/bindings.h"

#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "kernels/scatter.h"

namespace {

using omni_fast::bf16;
using omni_fast::kScatterMaxModalities;
using omni_fast::kScatterOk;
using omni_fast::ScatterParams;

// The same array, or a C-contiguous copy of it (same dtype).
py::array contiguous(const py::array& a) { return py::array::ensure(a, py::array::c_style); }

py::dtype element_dtype(const py::array& a, const char* name) {
  const py::dtype dt = a.dtype();
  if (!dt.equal(py::dtype::of<float>()) && !dt.equal(py::dtype::of<uint16_t>())) {
    throw py::value_error(std::string("multimodal_scatter: ") + name +
                          " must be float32 or uint16 (bfloat16 bits), got " + py::str(dt).cast<std::string>());
  }
  return dt;
}

py::array ids_array(const py::array& ids, int64_t tokens) {
  const py::dtype dt = ids.dtype();
  if (!dt.equal(py::dtype::of<int32_t>()) && !dt.equal(py::dtype::of<int64_t>())) {
    throw py::value_error("multimodal_scatter: ids must be int32 or int64, got " + py::str(dt).cast<std::string>());
  }
  if (ids.size() != tokens) {
    throw py::value_error("multimodal_scatter: ids hold " + std::to_string(ids.size()) + " tokens but embeds have " +
                          std::to_string(tokens) + " rows");
  }
  return contiguous(ids);
}

ScatterParams params_for(int64_t tokens, int64_t hidden, const std::vector<int64_t>& token_ids,
                         const std::vector<int64_t>& rows) {
  if (token_ids.size() != rows.size() || token_ids.size() > static_cast<size_t>(kScatterMaxModalities)) {
    throw py::value_error("multimodal_scatter: expected at most 3 modalities, one token id each");
  }
  ScatterParams p;
  p.tokens = tokens;
  p.hidden = hidden;
  p.modalities = static_cast<int>(token_ids.size());
  for (int m = 0; m < p.modalities; ++m) {
    for (int j = 0; j < m; ++j) {
      if (token_ids[j] == token_ids[m]) throw py::value_error("multimodal_scatter: token ids must be distinct");
    }
    p.token_id[m] = token_ids[m];
    p.rows[m] = rows[m];
  }
  return p;
}

void raise_on_mismatch(int bad, const ScatterParams& p, const int64_t* counts) {
  if (bad == kScatterOk) return;
  throw py::value_error("multimodal_scatter: modality " + std::to_string(bad) + " (token id " +
                        std::to_string(p.token_id[bad]) + ") has " + std::to_string(counts[bad]) +
                        " placeholders but " + std::to_string(p.rows[bad]) + " feature rows");
}

template <typename T, typename Id>
int run_forward(bool reference, const ScatterParams& p, const py::array& embeds, const py::array& ids,
                const std::vector<py::array>& features, py::array& out, int64_t* counts) {
  const T* f[kScatterMaxModalities] = {};
  for (size_t m = 0; m < features.size(); ++m) f[m] = static_cast<const T*>(features[m].data());
  const auto* e = static_cast<const T*>(embeds.data());
  const auto* i = static_cast<const Id*>(ids.data());
  auto* o = static_cast<T*>(out.mutable_data());
  py::gil_scoped_release release;
  return reference ? omni_fast::multimodal_scatter_forward_reference(p, e, i, f, o, counts)
                   : omni_fast::multimodal_scatter_forward(p, e, i, f, o, counts);
}

template <typename T, typename Id>
int run_backward(bool reference, const ScatterParams& p, const py::array& d_out, const py::array& ids,
                 py::array& d_embeds, std::vector<py::array>& d_features, int64_t* counts) {
  T* f[kScatterMaxModalities] = {};
  for (size_t m = 0; m < d_features.size(); ++m) f[m] = static_cast<T*>(d_features[m].mutable_data());
  const auto* d = static_cast<const T*>(d_out.data());
  const auto* i = static_cast<const Id*>(ids.data());
  auto* de = static_cast<T*>(d_embeds.mutable_data());
  py::gil_scoped_release release;
  return reference ? omni_fast::multimodal_scatter_backward_reference(p, d, i, de, f, counts)
                   : omni_fast::multimodal_scatter_backward(p, d, i, de, f, counts);
}

// A fresh output array, or `reuse` when given: it must then be a writeable C-contiguous array of exactly this dtype
// and shape (e.g. a previous result), so that a benchmark can time the kernels on warm memory, as MindSpore's
// memory pool gives them, instead of on fresh pages whose first-touch faults would dominate.
py::array output(const py::handle& reuse, const py::dtype& dt, const std::vector<py::ssize_t>& shape,
                 const std::string& name) {
  if (reuse.is_none()) return py::array(dt, shape);
  auto a = py::reinterpret_borrow<py::object>(reuse).cast<py::array>();
  const bool ok = a.dtype().equal(dt) && std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim()) == shape &&
                  (a.flags() & py::array::c_style) && a.writeable();
  if (!ok) throw py::value_error("multimodal_scatter: " + name + " does not fit (dtype, shape, C order)");
  return a;
}

// Calls fn(T{}, Id{}) for the element type (float32 / uint16 = bf16) and the ids type.
template <typename Fn>
int by_types(const py::dtype& element, const py::dtype& ids, Fn&& fn) {
  const bool i64 = ids.equal(py::dtype::of<int64_t>());
  if (element.equal(py::dtype::of<float>())) return i64 ? fn(float{}, int64_t{}) : fn(float{}, int32_t{});
  return i64 ? fn(bf16{}, int64_t{}) : fn(bf16{}, int32_t{});
}

py::array forward(const py::array& embeds_in, const py::array& ids_in, const std::vector<py::array>& features_in,
                  const std::vector<int64_t>& token_ids, bool reference, const py::object& out_in) {
  const py::dtype dt = element_dtype(embeds_in, "embeds");
  if (embeds_in.ndim() < 1) throw py::value_error("multimodal_scatter: embeds must have a hidden axis");
  const int64_t hidden = embeds_in.shape(embeds_in.ndim() - 1);
  const int64_t tokens = hidden == 0 ? 0 : embeds_in.size() / hidden;
  const py::array embeds = contiguous(embeds_in);
  const py::array ids = ids_array(ids_in, tokens);
  std::vector<py::array> features;
  std::vector<int64_t> rows;
  for (const auto& f : features_in) {
    if (!f.dtype().equal(dt)) throw py::value_error("multimodal_scatter: features must have embeds' dtype");
    if (f.ndim() != 2 || f.shape(1) != hidden) {
      throw py::value_error("multimodal_scatter: features must be [rows, " + std::to_string(hidden) + "]");
    }
    features.push_back(contiguous(f));
    rows.push_back(f.shape(0));
  }
  const ScatterParams p = params_for(tokens, hidden, token_ids, rows);
  py::array out = output(out_in, dt, std::vector<py::ssize_t>(embeds.shape(), embeds.shape() + embeds.ndim()), "out");
  int64_t counts[kScatterMaxModalities];
  const int bad = by_types(dt, ids.dtype(), [&](auto t, auto i) {
    return run_forward<decltype(t), decltype(i)>(reference, p, embeds, ids, features, out, counts);
  });
  raise_on_mismatch(bad, p, counts);
  return out;
}

py::tuple backward(const py::array& d_out_in, const py::array& ids_in, const std::vector<int64_t>& feature_rows,
                   const std::vector<int64_t>& token_ids, bool reference, const py::object& out) {
  const py::dtype dt = element_dtype(d_out_in, "d_out");
  if (d_out_in.ndim() < 1) throw py::value_error("multimodal_scatter: d_out must have a hidden axis");
  const int64_t hidden = d_out_in.shape(d_out_in.ndim() - 1);
  const int64_t tokens = hidden == 0 ? 0 : d_out_in.size() / hidden;
  const py::array d_out = contiguous(d_out_in);
  const py::array ids = ids_array(ids_in, tokens);
  const ScatterParams p = params_for(tokens, hidden, token_ids, feature_rows);
  // out: (d_embeds, [d_features]) as a previous call returned them.
  py::object reuse_embeds = py::none();
  std::vector<py::object> reuse_features(feature_rows.size(), py::none());
  if (!out.is_none()) {
    const bool is_pair = py::isinstance<py::tuple>(out) && py::len(out) == 2;
    const py::tuple pair = is_pair ? out.cast<py::tuple>() : py::tuple();
    const size_t embeds_at = 0, features_at = 1;
    if (!is_pair || !py::isinstance<py::list>(pair[features_at]) || py::len(pair[features_at]) != feature_rows.size()) {
      throw py::value_error("multimodal_scatter: out must be (d_embeds, [d_features]) as a previous call returned");
    }
    reuse_embeds = pair[embeds_at];
    const auto list = pair[features_at].cast<py::list>();
    for (size_t m = 0; m < feature_rows.size(); ++m) reuse_features[m] = list[m];
  }
  py::array d_embeds =
      output(reuse_embeds, dt, std::vector<py::ssize_t>(d_out.shape(), d_out.shape() + d_out.ndim()), "out[0]");
  std::vector<py::array> d_features;
  for (size_t m = 0; m < feature_rows.size(); ++m) {
    if (feature_rows[m] < 0) throw py::value_error("multimodal_scatter: feature rows must be >= 0");
    d_features.push_back(
        output(reuse_features[m], dt, {feature_rows[m], hidden}, "out[1][" + std::to_string(m) + "]"));
  }
  int64_t counts[kScatterMaxModalities];
  const int bad = by_types(dt, ids.dtype(), [&](auto t, auto i) {
    return run_backward<decltype(t), decltype(i)>(reference, p, d_out, ids, d_embeds, d_features, counts);
  });
  raise_on_mismatch(bad, p, counts);
  return py::make_tuple(d_embeds, py::cast(d_features));
}

}  // namespace

void register_scatter(py::module_& m) {
  m.def("multimodal_scatter_forward", &forward, py::arg("embeds"), py::arg("ids"), py::arg("features"),
        py::arg("token_ids"), py::arg("reference") = false, py::arg("out") = py::none(),
        "Multimodal scatter forward on numpy arrays (kernel sandbox): features[m] [rows_m, H] go to the rows of "
        "embeds [..., H] where ids == token_ids[m], in order. float32, or uint16 holding bfloat16 bits. `out`: "
        "an array to write into (e.g. a previous result) instead of a fresh one.");
  m.def("multimodal_scatter_backward", &backward, py::arg("d_out"), py::arg("ids"), py::arg("feature_rows"),
        py::arg("token_ids"), py::arg("reference") = false, py::arg("out") = py::none(),
        "Multimodal scatter backward -> (d_embeds, [d_features]) on numpy arrays (kernel sandbox). `out`: a "
        "previous result to write into instead of fresh arrays.");
}
