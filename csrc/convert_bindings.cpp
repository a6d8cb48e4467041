// Checkpoint conversion copy engine (kernels/convert.h) for Python: sources are file paths, memory-mapped here, or
// buffers; sinks are new files or writable buffers. The plan arrays come from omni_fast/convert/engine.py.
#include <memory>
#include <string>
#include <vector>

#include "csrc/bindings.h"
#include "kernels/convert.h"

namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// Pointer and byte size of a C-contiguous buffer (bytes, bytearray, numpy array, memoryview, mmap).
std::pair<uint8_t*, int64_t> contiguous_bytes(const py::buffer_info& info, const std::string& what) {
  py::ssize_t expected = info.itemsize;
  for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
    if (info.shape[d] > 1 && info.strides[d] != expected) throw py::value_error(what + " must be C-contiguous");
    expected *= info.shape[d];
  }
  return {static_cast<uint8_t*>(info.ptr), static_cast<int64_t>(info.size * info.itemsize)};
}

void convert_copy(const py::sequence& sources, const py::sequence& sinks, const I64Array& units,
                  const I64Array& pieces, int threads, bool reference) {
  if (units.ndim() != 2 || units.shape(1) != 5) throw py::value_error("convert_copy: units must have shape [n, 5]");
  if (pieces.ndim() != 2 || pieces.shape(1) != 7) throw py::value_error("convert_copy: pieces must have shape [n, 7]");
  static_assert(sizeof(omni_fast::CopyUnit) == 5 * sizeof(int64_t), "CopyUnit must be 5 packed int64");
  static_assert(sizeof(omni_fast::CopyPiece) == 7 * sizeof(int64_t), "CopyPiece must be 7 packed int64");

  omni_fast::CopyPlan plan;
  std::vector<std::unique_ptr<omni_fast::MappedFile>> mapped;
  std::vector<std::unique_ptr<omni_fast::OutputFile>> outputs;
  std::vector<py::buffer_info> views;  // keep every buffer view alive while the copy runs
  views.reserve(py::len(sources) + py::len(sinks));

  for (size_t i = 0; i < py::len(sources); ++i) {
    py::handle src = sources[i];
    if (py::isinstance<py::str>(src)) {
      try {
        mapped.push_back(std::make_unique<omni_fast::MappedFile>(src.cast<std::string>()));
      } catch (const std::runtime_error& e) {
        PyErr_SetString(PyExc_OSError, e.what());
        throw py::error_already_set();
      }
      plan.sources.push_back(mapped.back()->source());
    } else {
      views.push_back(src.cast<py::buffer>().request());
      const auto [ptr, size] = contiguous_bytes(views.back(), "source " + std::to_string(i));
      plan.sources.push_back({ptr, size});
    }
  }
  for (size_t i = 0; i < py::len(sinks); ++i) {
    const auto item = sinks[i].cast<py::tuple>();
    if (item.size() != 2) throw py::value_error("convert_copy: each sink is a (path or buffer, size) pair");
    const int64_t size = item[1].cast<int64_t>();
    if (size < 0) throw py::value_error("convert_copy: sink " + std::to_string(i) + " has a negative size");
    if (py::isinstance<py::str>(item[0])) {
      try {
        outputs.push_back(std::make_unique<omni_fast::OutputFile>(item[0].cast<std::string>(), size));
      } catch (const std::runtime_error& e) {
        PyErr_SetString(PyExc_OSError, e.what());
        throw py::error_already_set();
      }
      plan.sinks.push_back(outputs.back()->sink());
    } else {
      views.push_back(item[0].cast<py::buffer>().request(true));
      const auto [ptr, bytes] = contiguous_bytes(views.back(), "sink " + std::to_string(i));
      if (bytes != size) {
        throw py::value_error("convert_copy: sink " + std::to_string(i) + " holds " + std::to_string(bytes) +
                              " bytes, the plan needs " + std::to_string(size));
      }
      plan.sinks.push_back({ptr, -1, size, "sink " + std::to_string(i)});
    }
  }
  plan.units = reinterpret_cast<const omni_fast::CopyUnit*>(units.data());
  plan.n_units = units.shape(0);
  plan.pieces = reinterpret_cast<const omni_fast::CopyPiece*>(pieces.data());
  plan.n_pieces = pieces.shape(0);
  if (const std::string problem = omni_fast::copy_plan_check(plan); !problem.empty()) {
    throw py::value_error("convert_copy: invalid plan: " + problem);
  }

  std::string io_error;
  {
    py::gil_scoped_release release;
    try {
      if (reference) {
        omni_fast::copy_plan_run_reference(plan);
      } else {
        omni_fast::copy_plan_run(plan, threads);
      }
      for (auto& out : outputs) out->finish();
    } catch (const std::runtime_error& e) {
      io_error = e.what();
    }
  }
  if (!io_error.empty()) {
    PyErr_SetString(PyExc_OSError, io_error.c_str());
    throw py::error_already_set();
  }
}

}  // namespace

void register_convert(py::module_& m) {
  m.def("convert_copy", &convert_copy, py::arg("sources"), py::arg("sinks"), py::arg("units"), py::arg("pieces"),
        py::arg("threads") = 0, py::arg("reference") = false,
        "Run a checkpoint-conversion copy plan. sources: file paths (memory-mapped) or buffers; sinks: "
        "(path, size) for a new file or (writable buffer, size); units int64 [n, 5] = (sink, begin, end, "
        "first_piece, last_piece); pieces int64 [n, 7] = (src or -1 for zeros, src_offset, src_stride, dst_offset, "
        "dst_stride, rows, row_bytes). threads=0 uses all OpenMP threads; reference=True runs the one-thread "
        "byte-loop reference. Raises ValueError for an invalid plan, OSError for a file error.");
}
