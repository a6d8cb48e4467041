// omni_fast._C: each op registers its functions from its own <op>_bindings.cpp.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_activation(py::module_& m);
void register_adamw(py::module_& m);
void register_attention(py::module_& m);
void register_convert(py::module_& m);
void register_layer_norm(py::module_& m);
void register_rms_norm(py::module_& m);
void register_rope_index(py::module_& m);
void register_rotary(py::module_& m);
void register_scatter(py::module_& m);
