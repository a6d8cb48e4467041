// Qwen2.5-Omni 3-D (t, h, w) rope index: transformers 4.53 `get_rope_index` as segment arithmetic in C++.
//
// The oracle is the numpy reference `omni_fast/ops/rope_index.py` (`get_rope_index_reference`), bit-exact with
// transformers; this kernel must equal it on every input, errors included (same message, same row and column).
// Its docstring lists the transformers quirks reproduced here. There is no C++ scalar twin: the numpy version
// already is the plain one, and the tests compare against it and against transformers directly.
//
// Rows are independent except for the flat media lists (grids, seconds, audio lengths), which are consumed in
// order of appearance over the whole batch. So the kernel runs in three steps inside one OpenMP region:
//   1. per row (parallel): find the attended tokens and scan them once, recording the multimodal items (bos
//      position, kind, length of their placeholder run) and counting how many grids / audio lengths each takes;
//   2. (one thread) exclusive prefix sums of those counts: where each row's items start in the flat lists;
//   3. per row (parallel): check each item against its grid / audio length and write the positions block by
//      block. Tokens are only written here, never read again (beyond the one or two end tokens of an item).
//
// Errors never throw across the OpenMP region: each row records its first error, and the batch reports the one
// the sequential reference would raise first (the mask check, then row by row the layout checks, then unused
// grids / audio lengths, then row by row the video t-offset range check).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

namespace omni_fast {

struct RopeIndexParams {
  // [batch, length] token ids; attention_mask of the same shape holding 0/1, or nullptr for all ones.
  const int64_t* input_ids = nullptr;
  const int64_t* attention_mask = nullptr;
  int64_t batch = 0;
  int64_t length = 0;
  // Flat media lists in order of appearance over the batch. A grid list given (even empty) selects the
  // multimodal path, like transformers; with neither, the text-only fallback (cumsum of the mask) is taken.
  const int64_t* image_grid_thw = nullptr;  // [n_images, 3]
  int64_t n_images = 0;
  bool has_image_grids = false;
  const int64_t* video_grid_thw = nullptr;  // [n_videos, 3]
  int64_t n_videos = 0;
  bool has_video_grids = false;
  const float* second_per_grids = nullptr;  // [n_seconds], float32 as transformers uses them
  int64_t n_seconds = 0;
  const int64_t* audio_seqlens = nullptr;  // [n_audios] mel frames
  int64_t n_audios = 0;
  bool use_audio_in_video = false;
  int64_t spatial_merge_size = 2;
  // Image t offsets are k * rate in int64 for an integer rate, float32 then truncation for a float one
  // (transformers multiplies an int64 arange by the python number); video t offsets are always float32.
  bool integer_rate = true;
  int64_t rate_int = 25;
  float rate_float = 25.0f;
  int64_t tokens_per_chunk = 50;  // int(position_id_per_seconds * seconds_per_chunk), >= 1
  int64_t image_token_id = 151655;
  int64_t video_token_id = 151656;
  int64_t audio_token_id = 151646;
  int64_t vision_start_token_id = 151652;
  int64_t audio_start_token_id = 151647;
  // Outputs: [3, batch, length] positions (padding gets 1) and [batch] deltas (max position + 1 - tokens).
  int64_t* position_ids = nullptr;
  int64_t* deltas = nullptr;
};

// The first error in the reference's order; `row` / `column` are -1 when the error is not about one token.
struct RopeIndexError {
  int64_t row = -1;
  int64_t column = -1;
  std::string message;
  bool ok() const { return message.empty(); }
};

namespace rope_detail {

// Offsets at or above this are a unit mistake (seconds vs frames); same bound as the numpy reference.
constexpr int64_t kMaxTOffset = int64_t(1) << 31;
// Below this many tokens in the batch (about 1 ms of work on one thread) the kernel stays on one thread: a second
// thread saved at most ~0.03 ms on 4 x 12k tokens (0.08 ms on one thread), but when the cores are busy an OpenMP
// region can wait a whole scheduler slice for it (measured 30 ms per call on the shared 2-core dev VM).
constexpr int64_t kParallelMinTokens = int64_t(1) << 19;

enum Kind : uint8_t { kImage, kVideo, kAudio, kAv };

inline const char* kind_name(Kind k) {
  static const char* names[] = {"image", "video", "audio", "av"};
  return names[k];
}

// float32 -> int64 truncation as numpy's astype does it on x86 (NaN and out-of-range give INT64_MIN).
inline int64_t trunc_to_int64(float x) {
  if (!(x > -9.2233720e18f && x < 9.2233720e18f)) return std::numeric_limits<int64_t>::min();
  return static_cast<int64_t>(x);
}

// How the reference's f-strings show a float32 value: repr() of the python float it widens to -- the fewest
// significant digits that read back to the same double, positional for 1e-4 <= |x| < 1e16 (with ".0" when
// integral), scientific otherwise ("1e-05", "3.0000000054977558e+38").
inline std::string python_float_repr(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  if (x == 0) return std::signbit(x) ? "-0.0" : "0.0";
  char buf[64];
  for (int precision = 0; precision < 17; ++precision) {  // "%.{p}e": p + 1 significant digits
    std::snprintf(buf, sizeof buf, "%.*e", precision, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  const std::string s = buf;
  const size_t e_at = s.find('e');
  const int exponent = std::atoi(s.c_str() + e_at + 1);
  std::string digits;
  for (size_t i = 0; i < e_at; ++i)
    if (s[i] >= '0' && s[i] <= '9') digits += s[i];
  const std::string sign = x < 0 ? "-" : "";
  const int n = static_cast<int>(digits.size());
  if (exponent < -4 || exponent >= 16) {
    std::string mantissa = digits.substr(0, 1) + (n > 1 ? "." + digits.substr(1) : "");
    const int a = std::abs(exponent);
    return sign + mantissa + (exponent < 0 ? "e-" : "e+") + (a < 10 ? "0" : "") + std::to_string(a);
  }
  if (exponent < 0) return sign + "0." + std::string(-exponent - 1, '0') + digits;
  if (n <= exponent + 1) return sign + digits + std::string(exponent + 1 - n, '0') + ".0";
  return sign + digits.substr(0, exponent + 1) + "." + digits.substr(exponent + 1);
}

inline std::string grid_str(const int64_t* g) {
  return "(" + std::to_string(g[0]) + ", " + std::to_string(g[1]) + ", " + std::to_string(g[2]) + ")";
}

// LLM tokens of an audio of `mel` frames (conv stride 2, then 2x pooling); >= 1 iff mel >= 3, and for those the
// C++ truncating division equals python's floor division.
inline int64_t audio_token_count(int64_t mel) { return mel < 3 ? 0 : ((mel - 1) / 2 + 1 - 2) / 2 + 1; }

struct Item {
  int64_t bos;      // vision_bos (image, video, av) or audio_bos (audio), index into the row's attended tokens
  int64_t run_end;  // one past the placeholder run that starts at bos + 1 (bos + 2 for av)
  int64_t n_video;  // <|VIDEO|> tokens in an av run
  Kind kind;
};

// Step 1's findings about one row.
struct RowScan {
  int64_t n = 0;          // attended tokens
  int64_t first_col = 0;  // column of the first attended token when they are contiguous
  bool contiguous = true;
  std::vector<int64_t> tokens, cols;  // the attended tokens and their columns, only when not contiguous
  std::vector<Item> items;
  int64_t n_image = 0, n_video = 0, n_audio = 0;  // grids / seconds / audio lengths this row consumes
  int64_t first_stray = -1;  // first placeholder outside every item's run
  bool bad_mask = false;
  // whole-row layout errors, checked before the items (as the reference does)
  bool vision_bos_last = false, audio_bos_last = false;
  int64_t first_av = -1, first_plain_video = -1;
  // step 2: where this row's items start in the flat lists
  int64_t image_base = 0, video_base = 0, audio_base = 0;
};

// ------------------------------------------------------------------------------------------ step 1: scan

constexpr int kBlock = 16;

inline bool block_has_special(const int64_t* p, uint64_t lo, uint64_t span) {
  unsigned hit = 0;
  for (int k = 0; k < kBlock; ++k) hit |= (static_cast<uint64_t>(p[k]) - lo) <= span;
  return hit != 0;
}

inline bool block_all_equal(const int64_t* p, int64_t v) {
  unsigned miss = 0;
  for (int k = 0; k < kBlock; ++k) miss |= p[k] != v;
  return miss == 0;
}

// One past the run of `v` tokens starting at i.
inline int64_t run_of(const int64_t* tok, int64_t i, int64_t n, int64_t v) {
  while (i + kBlock <= n && block_all_equal(tok + i, v)) i += kBlock;
  while (i < n && tok[i] == v) ++i;
  return i;
}

// One past the run of `video` / `audio` tokens starting at i; counts the `video` ones into *n_video.
inline int64_t av_run_of(const int64_t* tok, int64_t i, int64_t n, int64_t video, int64_t audio, int64_t* n_video) {
  int64_t count = 0;
  while (i + kBlock <= n) {
    unsigned miss = 0, videos = 0;
    for (int k = 0; k < kBlock; ++k) {
      miss |= (tok[i + k] != video) & (tok[i + k] != audio);
      videos += tok[i + k] == video;
    }
    if (miss) break;
    count += videos;
    i += kBlock;
  }
  for (; i < n && (tok[i] == video || tok[i] == audio); ++i) count += tok[i] == video;
  *n_video = count;
  return i;
}

inline void scan_row(const RopeIndexParams& p, int64_t b, RowScan& r) {
  const int64_t L = p.length;
  const int64_t* ids = p.input_ids + b * L;
  const int64_t* tok = ids;
  if (p.attention_mask == nullptr) {
    r.n = L;
  } else {
    const int64_t* m = p.attention_mask + b * L;
    int64_t count = 0, first = L, last = -1;
    bool bad = false;
    for (int64_t c = 0; c < L; ++c) {
      bad |= static_cast<uint64_t>(m[c]) > 1;
      count += m[c] == 1;
    }
    r.bad_mask = bad;
    if (bad) return;
    for (int64_t c = 0; c < L && first == L; ++c)
      if (m[c]) first = c;
    for (int64_t c = L - 1; c >= 0 && last < 0; --c)
      if (m[c]) last = c;
    r.n = count;
    if (count == 0) return;
    r.contiguous = count == last - first + 1;
    if (r.contiguous) {
      r.first_col = first;
      tok = ids + first;
    } else {  // scattered padding: work on a compacted copy, remember where each token goes
      r.tokens.reserve(count);
      r.cols.reserve(count);
      for (int64_t c = first; c <= last; ++c)
        if (m[c]) {
          r.tokens.push_back(ids[c]);
          r.cols.push_back(c);
        }
      tok = r.tokens.data();
    }
  }
  const int64_t n = r.n;
  const int64_t img = p.image_token_id, vid = p.video_token_id, aud = p.audio_token_id;
  const int64_t vbos = p.vision_start_token_id, abos = p.audio_start_token_id;
  const int64_t lo = std::min({img, vid, aud, vbos, abos}), hi = std::max({img, vid, aud, vbos, abos});
  const uint64_t ulo = static_cast<uint64_t>(lo), span = static_cast<uint64_t>(hi) - ulo;
  int64_t i = 0;
  while (i < n) {
    // text: skip whole blocks without any of the five special ids, then single tokens up to the next one
    while (i + kBlock <= n && !block_has_special(tok + i, ulo, span)) i += kBlock;
    while (i < n && static_cast<uint64_t>(tok[i]) - ulo > span) ++i;
    if (i >= n) break;
    const int64_t x = tok[i];
    if (x == vbos) {
      if (i == n - 1) {
        r.vision_bos_last = true;
        break;
      }
      const int64_t y = tok[i + 1];
      if (y == img || y == vid) {
        const Kind k = y == img ? kImage : kVideo;
        const int64_t end = run_of(tok, i + 1, n, y);
        r.items.push_back({i, end, 0, k});
        if (k == kImage) {
          ++r.n_image;
        } else {
          ++r.n_video;
          if (r.first_plain_video < 0) r.first_plain_video = i;
        }
        i = end;
      } else if (y == abos) {  // audio-in-video: <|vision_bos|><|audio_bos|> then interleaved chunks
        int64_t n_video = 0;
        const int64_t end = av_run_of(tok, i + 2, n, vid, aud, &n_video);
        r.items.push_back({i, end, n_video, kAv});
        ++r.n_video;
        ++r.n_audio;
        if (r.first_av < 0) r.first_av = i;
        i = end;
      } else {
        ++i;  // a vision_bos before anything else is not an item (its tokens are text), as in transformers
      }
    } else if (x == abos) {  // not preceded by a vision_bos: those were taken as audio-in-video above
      if (i == n - 1) {
        r.audio_bos_last = true;
        break;
      }
      const int64_t end = run_of(tok, i + 1, n, aud);
      r.items.push_back({i, end, 0, kAudio});
      ++r.n_audio;
      i = end;
    } else {
      if ((x == img || x == vid || x == aud) && r.first_stray < 0) r.first_stray = i;
      ++i;
    }
  }
}

// ------------------------------------------------------------------------------------------ step 3: write

// Writes one row's positions; `col(i)` maps an attended-token index to its column.
struct RowWriter {
  int64_t *t, *h, *w;
  const int64_t* cols;  // nullptr: contiguous from `first`
  int64_t first;

  // positions v, v+1, ... on all three axes for tokens [i, i + len)
  void line(int64_t i, int64_t len, int64_t v) const {
    if (cols == nullptr) {
      int64_t *tt = t + first + i, *hh = h + first + i, *ww = w + first + i;
      for (int64_t k = 0; k < len; ++k) tt[k] = hh[k] = ww[k] = v + k;
    } else {
      for (int64_t k = 0; k < len; ++k) {
        const int64_t c = cols[i + k];
        t[c] = h[c] = w[c] = v + k;
      }
    }
  }
  // tokens [i, i + len) of one row of a vision grid: t and h constant, w counting up from w0
  void grid_row(int64_t i, int64_t len, int64_t tv, int64_t hv, int64_t w0) const {
    if (cols == nullptr) {
      int64_t *tt = t + first + i, *hh = h + first + i, *ww = w + first + i;
      for (int64_t k = 0; k < len; ++k) {
        tt[k] = tv;
        hh[k] = hv;
        ww[k] = w0 + k;
      }
    } else {
      for (int64_t k = 0; k < len; ++k) {
        const int64_t c = cols[i + k];
        t[c] = tv;
        h[c] = hv;
        w[c] = w0 + k;
      }
    }
  }
};

// t offset of temporal slice k (before adding the block start).
struct TIndex {
  enum Mode { kIntRate, kFloatRate, kVideo } mode;
  int64_t rate_int;
  float rate_float;
  float second_per_grid;
  int64_t operator()(int64_t k) const {
    switch (mode) {
      case kIntRate:
        return k * rate_int;
      case kFloatRate:
        return trunc_to_int64(static_cast<float>(k) * rate_float);
      default: {
        // two separately rounded float32 products, then truncation toward zero (volatile: no fused or wider
        // arithmetic may sneak in)
        volatile float seconds = static_cast<float>(k) * second_per_grid;
        return trunc_to_int64(seconds * rate_float);
      }
    }
  }
};

// Video tokens [s, e) in raster order (t, h, w) of a merged grid gh x gw, written to tokens i, i+1, ...
inline void vision_range(const RowWriter& out, int64_t i, int64_t s, int64_t e, int64_t start, const TIndex& t_of,
                         int64_t gh, int64_t gw) {
  const int64_t per_t = gh * gw;
  while (s < e) {
    const int64_t k = s / per_t;
    const int64_t tv = start + t_of(k);
    const int64_t slice_end = std::min(e, (k + 1) * per_t);
    int64_t q = s - k * per_t;
    while (s < slice_end) {
      const int64_t row = q / gw, col = q % gw;
      const int64_t len = std::min(gw - col, slice_end - s);
      out.grid_row(i, len, tv, start + row, start + col);
      i += len;
      s += len;
      q += len;
    }
  }
}

// Where transformers' get_chunked_index starts a new chunk in a video's token list (t values relative to the
// block start): its counter c (from 1) opens a chunk at a token, and c += 1, while value >= c * tokens_per_chunk.
// A t slice of constant value v therefore opens its first min(per_t, max(0, v / tpc - c + 1)) tokens, one
// chunk each (so a t step above the chunk size splits a slice over several chunks).
inline void video_chunk_starts(const TIndex& t_of, int64_t grid_t, int64_t per_t, int64_t tpc,
                               std::vector<int64_t>& starts) {
  starts.clear();
  starts.push_back(0);
  int64_t c = 1;
  for (int64_t k = 0; k < grid_t; ++k) {
    const int64_t opens = std::min(per_t, std::max<int64_t>(0, t_of(k) / tpc - c + 1));
    for (int64_t q = 0; q < opens; ++q) starts.push_back(k * per_t + q);
    c += opens;
  }
  // token 0 (value 0) never opens, so starts[0] == 0 is not repeated; sentinel end
  starts.push_back(grid_t * per_t);
}

// The row's item checks (step 3) and, when `out` is given, its positions. Returns false after recording an error.
class RowPlanner {
 public:
  RowPlanner(const RopeIndexParams& p, const RowScan& r, int64_t row) : p_(p), r_(r), row_(row) {}

  std::string error;         // layout error (reported in row order before anything else)
  std::string offset_error;  // video t offset out of range (reported after the unused-entries check)
  int64_t error_column = -1;
  int64_t row_max = std::numeric_limits<int64_t>::min();

  bool run(const int64_t* tok, const RowWriter* out) {
    // whole-row layout checks first, in the reference's order
    if (r_.vision_bos_last) return fail(r_.n - 1, "<|vision_bos|> is the last token, nothing follows it");
    if (r_.first_av >= 0 && !p_.use_audio_in_video)
      return fail(r_.first_av, "<|vision_bos|><|audio_bos|> (an audio-in-video block) needs use_audio_in_video=True");
    if (r_.first_plain_video >= 0 && p_.use_audio_in_video)
      return fail(r_.first_plain_video,
                  "a video without interleaved audio while use_audio_in_video=True (transformers applies it to "
                  "every video of the batch)");
    if (r_.audio_bos_last) return fail(r_.n - 1, "<|audio_bos|> is the last token, nothing follows it");

    const int64_t merge = p_.spatial_merge_size;
    int64_t image_idx = r_.image_base, video_idx = r_.video_base, audio_idx = r_.audio_base;
    int64_t st = 0;   // first token not yet assigned to a block
    int64_t cur = 0;  // transformers' st_idx: max of the last appended block + 1
    std::vector<int64_t> chunk_starts;
    for (const Item& it : r_.items) {
      const int64_t bos = it.bos;
      const std::string kind = kind_name(it.kind);
      if (bos < st) return fail(bos, kind + " block starts inside the previous block (missing end token?)");
      const int64_t* grid = nullptr;
      float spg = 0.0f;
      int64_t mel = 0, audio_len = 0;
      if (it.kind != kAudio) {
        const bool image = it.kind == kImage;
        const int64_t idx = image ? image_idx : video_idx;
        const int64_t have = image ? p_.n_images : p_.n_videos;
        const std::string name = image ? "image_grid_thw" : "video_grid_thw";
        if (idx >= have)
          return fail(bos, kind + " #" + std::to_string(idx) + " of the batch has no " + name + " row (only " +
                               std::to_string(have) + " given)");
        grid = (image ? p_.image_grid_thw : p_.video_grid_thw) + 3 * idx;
        if (grid[0] < 1 || grid[1] < 1 || grid[2] < 1 || grid[1] % merge || grid[2] % merge)
          return fail(bos, name + "[" + std::to_string(idx) + "] = " + grid_str(grid) +
                               " must be positive with h and w divisible by spatial_merge_size=" +
                               std::to_string(merge));
        if (image) {
          ++image_idx;
        } else {
          ++video_idx;
          if (idx >= p_.n_seconds)
            return fail(bos, "video #" + std::to_string(idx) + " of the batch has no second_per_grids entry (only " +
                                 std::to_string(p_.n_seconds) + " given)");
          spg = p_.second_per_grids[idx];
          if (!std::isfinite(spg) || spg < 0)
            return fail(bos, "second_per_grids[" + std::to_string(idx) + "] = " + python_float_repr(spg) +
                                 " must be finite and >= 0");
        }
      }
      if (it.kind == kAudio || it.kind == kAv) {
        const int64_t idx = audio_idx;
        if (idx >= p_.n_audios)
          return fail(bos, "audio #" + std::to_string(idx) + " of the batch has no audio_seqlens entry (only " +
                               std::to_string(p_.n_audios) + " given)");
        mel = p_.audio_seqlens[idx];
        audio_len = audio_token_count(mel);
        if (audio_len < 1)
          return fail(bos, "audio_seqlens[" + std::to_string(idx) + "] = " + std::to_string(mel) +
                               " mel frames give no audio token (need >= 3)");
        ++audio_idx;
      }
      // placeholder tokens the grid asks for; an absurd grid that overflows int64 cannot match any run
      int64_t vision_len = 0;
      bool vision_overflow = false;
      if (grid != nullptr) {
        const int64_t gh = grid[1] / merge, gw = grid[2] / merge;
        vision_overflow = __builtin_mul_overflow(grid[0], gh, &vision_len) ||
                          __builtin_mul_overflow(vision_len, gw, &vision_len);
      }
      const std::string vision_str = vision_overflow ? "more than 2^63" : std::to_string(vision_len);

      int64_t first, n_end;
      if (it.kind == kAv) {
        first = bos + 2;
        const int64_t found = it.run_end - first;
        if (vision_overflow || found != vision_len + audio_len)
          return fail(bos, "audio-in-video block needs " + vision_str + " <|VIDEO|> + " + std::to_string(audio_len) +
                               " <|AUDIO|> tokens (grid " + grid_str(grid) + ", " + std::to_string(mel) +
                               " mel frames), found " + std::to_string(found));
        if (it.n_video != vision_len)
          return fail(bos, "audio-in-video block needs " + vision_str + " <|VIDEO|> tokens (grid " + grid_str(grid) +
                               "), found " + std::to_string(it.n_video) + " (and " +
                               std::to_string(found - it.n_video) + " <|AUDIO|>)");
        if (tok[first] != p_.video_token_id)
          return fail(first, "an audio-in-video block must start with a <|VIDEO|> chunk");
        n_end = 2;
      } else {
        first = bos + 1;
        const int64_t found = it.run_end - first;
        const int64_t need = it.kind == kAudio ? audio_len : vision_len;
        if ((it.kind != kAudio && vision_overflow) || found != need) {
          static const char* tokens[] = {"<|IMAGE|>", "<|VIDEO|>", "<|AUDIO|>"};
          const std::string source =
              it.kind == kAudio ? std::to_string(mel) + " mel frames" : "grid " + grid_str(grid);
          return fail(bos, kind + " needs " + (it.kind == kAudio ? std::to_string(need) : vision_str) + " " +
                               tokens[it.kind] + " tokens (" + source + "), found " + std::to_string(found));
        }
        n_end = 1;
      }
      const int64_t end = it.run_end + n_end;
      if (end > r_.n) return fail(bos, kind + " block is cut off, its end token(s) are missing");
      for (int64_t e = it.run_end; e < end; ++e) {
        const int64_t x = tok[e];
        if (x == p_.image_token_id || x == p_.video_token_id || x == p_.audio_token_id)
          return fail(e, "expected an end token after the " + kind + " block, found placeholder " + std::to_string(x));
      }

      // --- positions (segment arithmetic, mirroring transformers' block list)
      if (out != nullptr && offset_error.empty()) {
        if (bos > st) {
          out->line(st, bos - st, cur);
          cur += bos - st;
          row_max = std::max(row_max, cur - 1);
        }
        if (it.kind == kAudio) {  // bos, audio, eos: consecutive
          out->line(bos, audio_len + 2, cur);
          cur += audio_len + 2;
          row_max = std::max(row_max, cur - 1);
        } else {
          const int64_t gt = grid[0], gh = grid[1] / merge, gw = grid[2] / merge;
          TIndex t_of{TIndex::kVideo, p_.rate_int, p_.rate_float, spg};
          if (it.kind == kImage) t_of.mode = p_.integer_rate ? TIndex::kIntRate : TIndex::kFloatRate;
          const int64_t t_last = t_of(gt - 1);
          if (it.kind != kImage && !(t_last >= 0 && t_last < kMaxTOffset)) {
            offset_error = "row " + std::to_string(row_) + ": video t offset " + std::to_string(t_last) +
                           " out of range (second_per_grid " + python_float_repr(spg) + ", " + std::to_string(gt) +
                           " temporal patches)";
          } else {
            // t offsets are monotonic with t(0) = 0, so a grid's largest position is at its last t slice
            const int64_t grid_max = std::max({t_last, gh - 1, gw - 1});
            if (it.kind != kAv) {  // bos, grid, eos
              out->line(bos, 1, cur);
              const int64_t start = cur + 1;
              vision_range(*out, first, 0, vision_len, start, t_of, gh, gw);
              out->line(it.run_end, 1, start + grid_max + 1);
              cur = start + grid_max + 2;
              row_max = std::max(row_max, cur - 1);
            } else {
              cur = write_av(*out, bos, cur, t_of, gt, gh, gw, grid_max, audio_len, chunk_starts);
            }
          }
        }
      }
      st = end;
    }
    if (r_.first_stray >= 0) {
      return fail(r_.first_stray, "placeholder token " + std::to_string(tok[r_.first_stray]) +
                                      " outside any <|vision_bos|>/<|audio_bos|> block (or more placeholders than "
                                      "bos tokens)");
    }
    if (out != nullptr && offset_error.empty() && st < r_.n) {
      out->line(st, r_.n - st, cur);
      row_max = std::max(row_max, cur + r_.n - st - 1);
    }
    return true;
  }

 private:
  const RopeIndexParams& p_;
  const RowScan& r_;
  int64_t row_;

  bool fail(int64_t i, const std::string& what) {
    error_column = r_.contiguous ? r_.first_col + i : r_.cols[i];
    error = "row " + std::to_string(row_) + ", token " + std::to_string(error_column) + ": " + what;
    return false;
  }

  // Audio in video: both bos at cur; from base = cur + 1 video and audio share one time axis, cut into chunks of
  // tokens_per_chunk ids and emitted video chunk 0, audio chunk 0, video chunk 1, ...; both eos one past the
  // last *emitted* chunk's maximum (not the block's). Returns the next cur.
  int64_t write_av(const RowWriter& out, int64_t bos, int64_t cur, const TIndex& t_of, int64_t gt, int64_t gh,
                   int64_t gw, int64_t grid_max, int64_t audio_len, std::vector<int64_t>& starts) {
    const int64_t tpc = p_.tokens_per_chunk;
    const int64_t base = cur + 1;
    out.line(bos, 1, cur);
    out.line(bos + 1, 1, cur);
    video_chunk_starts(t_of, gt, gh * gw, tpc, starts);
    const int64_t video_chunks = static_cast<int64_t>(starts.size()) - 1;
    const int64_t audio_chunks = (audio_len + tpc - 1) / tpc;  // audio values step by 1 <= tpc: plain ranges
    int64_t i = bos + 2;
    for (int64_t j = 0; j < std::max(video_chunks, audio_chunks); ++j) {
      if (j < video_chunks) {
        vision_range(out, i, starts[j], starts[j + 1], base, t_of, gh, gw);
        i += starts[j + 1] - starts[j];
      }
      if (j < audio_chunks) {
        const int64_t a0 = j * tpc, a1 = std::min(audio_len, a0 + tpc);
        out.line(i, a1 - a0, base + a0);
        i += a1 - a0;
      }
    }
    // The last emitted chunk is the last audio chunk, unless the video has more chunks; the video's last chunk
    // holds its last token, so its maximum is the grid's.
    const int64_t last = base + (audio_chunks >= video_chunks ? audio_len - 1 : grid_max);
    out.line(i, 1, last + 1);
    out.line(i + 1, 1, last + 1);
    row_max = std::max({row_max, base + std::max(grid_max, audio_len - 1), last + 1});
    return last + 2;
  }
};

}  // namespace rope_detail

inline RopeIndexError rope_index(const RopeIndexParams& p) {
  using namespace rope_detail;
  const int64_t B = p.batch, L = p.length;
  const bool multimodal = p.has_image_grids || p.has_video_grids;
  std::vector<RowScan> scans(B);
  std::vector<std::string> errors(B), offset_errors(B);
  std::vector<int64_t> error_cols(B, -1);
  bool bad_mask = false;
  const int threads = (B > 1 && B * L >= kParallelMinTokens) ? std::min<int64_t>(omp_get_max_threads(), B) : 1;

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) scan_row(p, b, scans[b]);

#pragma omp single
    {
      int64_t image = 0, video = 0, audio = 0;
      for (int64_t b = 0; b < B; ++b) {
        bad_mask |= scans[b].bad_mask;
        scans[b].image_base = image;
        scans[b].video_base = video;
        scans[b].audio_base = audio;
        image += scans[b].n_image;
        video += scans[b].n_video;
        audio += scans[b].n_audio;
      }
    }  // implicit barrier

    if (!bad_mask) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < B; ++b) {
        const RowScan& r = scans[b];
        int64_t* t = p.position_ids + b * L;
        int64_t* h = t + B * L;
        int64_t* w = h + B * L;
        if (multimodal && r.n == 0) {
          errors[b] = "row " + std::to_string(b) + " has no attended tokens (transformers cannot index an empty row)";
          continue;
        }
        const int64_t* tok = r.contiguous ? p.input_ids + b * L + r.first_col : r.tokens.data();
        // padding is 1 on all three axes; the attended tokens are written below
        for (int64_t* axis : {t, h, w}) {
          if (r.contiguous) {
            std::fill(axis, axis + r.first_col, 1);
            std::fill(axis + r.first_col + r.n, axis + L, 1);
          } else {
            std::fill(axis, axis + L, 1);
          }
        }
        RowWriter out{t, h, w, r.contiguous ? nullptr : r.cols.data(), r.first_col};
        RowPlanner planner(p, r, b);
        if (!planner.run(tok, multimodal ? &out : nullptr)) {
          errors[b] = std::move(planner.error);
          error_cols[b] = planner.error_column;
          continue;
        }
        offset_errors[b] = std::move(planner.offset_error);
        if (!offset_errors[b].empty()) continue;  // no positions were written: the batch raises
        if (multimodal) {
          p.deltas[b] = planner.row_max + 1 - r.n;
        } else {
          // text-only fallback: cumsum of the mask - 1, pads 1, delta from the maximum *including* the pads
          out.line(0, r.n, 0);
          int64_t mx = r.n > 0 ? r.n - 1 : std::numeric_limits<int64_t>::min();
          if (r.n < L) mx = std::max<int64_t>(mx, 1);
          p.deltas[b] = mx + 1 - r.n;
        }
      }
    }
  }

  RopeIndexError err;
  if (bad_mask) {
    err.message = "attention_mask must hold only 0 and 1";
    return err;
  }
  for (int64_t b = 0; b < B; ++b) {
    if (!errors[b].empty()) {
      err.row = b;
      err.column = error_cols[b];
      err.message = errors[b];
      return err;
    }
  }
  int64_t used[3] = {0, 0, 0};
  for (const RowScan& r : scans) {
    used[0] += r.n_image;
    used[1] += r.n_video;
    used[2] += r.n_audio;
  }
  const struct {
    const char* name;
    bool given;
    int64_t have, used;
  } lists[] = {{"image_grid_thw", p.has_image_grids, p.n_images, used[0]},
               {"video_grid_thw", p.has_video_grids, p.n_videos, used[1]},
               {"audio_seqlens", true, p.n_audios, used[2]}};
  for (const auto& l : lists) {
    if (l.given && l.have > l.used) {
      err.message = std::string(l.name) + " has " + std::to_string(l.have) + " entries but the batch has only " +
                    std::to_string(l.used) + " such placeholders";
      return err;
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    if (!offset_errors[b].empty()) {
      err.row = b;
      err.message = offset_errors[b];
      return err;
    }
  }
  return err;
}

}  // namespace omni_fast
