// Qwen2.5-Omni 3-D rope index on numpy arrays: a host op (omni_fast.ops.get_rope_index calls it on every device).
#include <pybind11/stl.h>

#include <optional>
#include <vector>

#include "csrc/bindings.h"
#include "kernels/rope_index.h"

namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;

// The Python face validates dtypes and normalises shapes first; these checks keep a direct caller from handing
// the kernel buffers of the wrong size.
int64_t rows_of(const std::optional<I64Array>& a, const char* name, int ndim) {
  if (!a) return 0;
  if (a->ndim() != ndim || (ndim == 2 && a->shape(1) != 3))
    throw py::value_error(std::string("rope_index: ") + name + (ndim == 2 ? " must have shape (n, 3)" : " must be 1-D"));
  return a->shape(0);
}

py::tuple rope_index(const I64Array& input_ids, const std::optional<I64Array>& attention_mask,
                     const std::optional<I64Array>& image_grid_thw, const std::optional<I64Array>& video_grid_thw,
                     const std::optional<F32Array>& second_per_grids, const std::optional<I64Array>& audio_seqlens,
                     bool use_audio_in_video, int64_t spatial_merge_size, double position_id_per_seconds,
                     bool integer_rate, int64_t tokens_per_chunk, int64_t image_token_id, int64_t video_token_id,
                     int64_t audio_token_id, int64_t vision_start_token_id, int64_t audio_start_token_id) {
  if (input_ids.ndim() != 2 || input_ids.size() == 0) throw py::value_error("rope_index: input_ids must be 2-D, non-empty");
  const int64_t B = input_ids.shape(0), L = input_ids.shape(1);
  if (attention_mask && (attention_mask->ndim() != 2 || attention_mask->shape(0) != B || attention_mask->shape(1) != L))
    throw py::value_error("rope_index: attention_mask must have input_ids' shape");
  if (second_per_grids && second_per_grids->ndim() != 1) throw py::value_error("rope_index: second_per_grids must be 1-D");
  if (spatial_merge_size < 1) throw py::value_error("rope_index: spatial_merge_size must be >= 1");
  if (tokens_per_chunk < 1) throw py::value_error("rope_index: tokens_per_chunk must be >= 1");

  omni_fast::RopeIndexParams p;
  p.input_ids = input_ids.data();
  p.attention_mask = attention_mask ? attention_mask->data() : nullptr;
  p.batch = B;
  p.length = L;
  p.n_images = rows_of(image_grid_thw, "image_grid_thw", 2);
  p.image_grid_thw = image_grid_thw ? image_grid_thw->data() : nullptr;
  p.has_image_grids = image_grid_thw.has_value();
  p.n_videos = rows_of(video_grid_thw, "video_grid_thw", 2);
  p.video_grid_thw = video_grid_thw ? video_grid_thw->data() : nullptr;
  p.has_video_grids = video_grid_thw.has_value();
  p.n_seconds = second_per_grids ? second_per_grids->shape(0) : 0;
  p.second_per_grids = second_per_grids ? second_per_grids->data() : nullptr;
  p.n_audios = rows_of(audio_seqlens, "audio_seqlens", 1);
  p.audio_seqlens = audio_seqlens ? audio_seqlens->data() : nullptr;
  p.use_audio_in_video = use_audio_in_video;
  p.spatial_merge_size = spatial_merge_size;
  p.integer_rate = integer_rate;
  p.rate_int = static_cast<int64_t>(position_id_per_seconds);
  p.rate_float = static_cast<float>(position_id_per_seconds);
  p.tokens_per_chunk = tokens_per_chunk;
  p.image_token_id = image_token_id;
  p.video_token_id = video_token_id;
  p.audio_token_id = audio_token_id;
  p.vision_start_token_id = vision_start_token_id;
  p.audio_start_token_id = audio_start_token_id;

  py::array_t<int64_t> position_ids(std::vector<py::ssize_t>{3, B, L});
  py::array_t<int64_t> deltas(std::vector<py::ssize_t>{B, 1});
  p.position_ids = position_ids.mutable_data();
  p.deltas = deltas.mutable_data();
  omni_fast::RopeIndexError err;
  {
    py::gil_scoped_release release;
    err = omni_fast::rope_index(p);
  }
  // The message already names the row and the token column, in the numpy reference's words.
  if (!err.ok()) throw py::value_error(err.message);
  return py::make_tuple(position_ids, deltas);
}

}  // namespace

void register_rope_index(py::module_& m) {
  m.attr("ROPE_INDEX_PARALLEL_MIN_TOKENS") = omni_fast::rope_detail::kParallelMinTokens;
  m.def("rope_index", &rope_index, py::arg("input_ids"), py::arg("attention_mask"), py::arg("image_grid_thw"),
        py::arg("video_grid_thw"), py::arg("second_per_grids"), py::arg("audio_seqlens"),
        py::arg("use_audio_in_video"), py::arg("spatial_merge_size"), py::arg("position_id_per_seconds"),
        py::arg("integer_rate"), py::arg("tokens_per_chunk"), py::arg("image_token_id"), py::arg("video_token_id"),
        py::arg("audio_token_id"), py::arg("vision_start_token_id"), py::arg("audio_start_token_id"),
        "Qwen2.5-Omni 3-D rope index -> (position_ids int64 [3, B, L], deltas int64 [B, 1]); raises ValueError "
        "naming the row and token column of malformed input. Use omni_fast.ops.get_rope_index.");
}
