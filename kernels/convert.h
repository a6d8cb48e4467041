// Checkpoint conversion copy engine: fills output files (or buffers) with rectangles of bytes taken from
// memory-mapped input files (or buffers), with no per-element work.
//
// Every rule of the HF <-> MindSpeed-MM conversion (renames, q/k/v interleave, gate/up concat, zero K bias,
// row/column/GLU tensor-parallel splits and merges) is a move of whole rows or row slices, so the Python planner
// (omni_fast/convert/engine.py) lowers a conversion to a list of pieces: `rows` rows of `row_bytes` bytes, read
// at `src_offset + i * src_stride` and written at `dst_offset + i * dst_stride` (src < 0: zeros). dtypes never
// matter here: bf16/fp16/fp32 bytes pass through unchanged.
//
// Pieces are grouped in units: a unit covers one contiguous byte range [begin, end) of one sink exactly, and its
// pieces lie inside it. Each sink byte belongs to exactly one unit, so every output byte is written once. Units
// are 2 MiB windows aligned at 2 MiB (the planner's choice), taken by the threads one by one, with writes to any
// one file serialised (see Lane). A unit is filled like this:
//  * file sink, unit = one contiguous range of one source: pwrite straight from the source mapping (one copy, no
//    staging and no page faults on the output side);
//  * file sink, anything else: the pieces are gathered into a per-thread staging buffer, then pwrite;
//  * memory sink: memcpy into place.
// Writing files with pwrite rather than through a shared mapping avoids a write fault per 4 KiB page (measured
// 2-3x slower on the VM this was built on) and turns a full disk into an error instead of a SIGBUS. copy_file_range
// for the one-source units was measured too: slower than pwrite from the (pre-faulted) mapping in 256 KiB writes.
#pragma once

#include <fcntl.h>
#include <omp.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace omni_fast {

struct CopyPiece {
  int64_t src;  // source index, or -1 for zeros
  int64_t src_offset;
  int64_t src_stride;
  int64_t dst_offset;  // absolute offset in the sink
  int64_t dst_stride;
  int64_t rows;
  int64_t row_bytes;
};

struct CopyUnit {
  int64_t sink;
  int64_t begin;
  int64_t end;
  int64_t first_piece;
  int64_t last_piece;  // one past the last
};

struct ByteSource {
  const uint8_t* data = nullptr;
  int64_t size = 0;
};

// A memory sink has `data`; a file sink has `fd` (and `path` for error messages).
struct ByteSink {
  uint8_t* data = nullptr;
  int fd = -1;
  int64_t size = 0;
  std::string path;
};

struct CopyPlan {
  std::vector<ByteSource> sources;
  std::vector<ByteSink> sinks;
  const CopyUnit* units = nullptr;
  int64_t n_units = 0;
  const CopyPiece* pieces = nullptr;
  int64_t n_pieces = 0;
};

// ---------------------------------------------------------------- files

// A whole file mapped read-only. Empty files map to nothing (mmap rejects length 0).
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw std::runtime_error(path + ": cannot open (" + std::strerror(errno) + ")");
    struct stat st;
    if (::fstat(fd_, &st) != 0) {
      const int err = errno;
      ::close(fd_);
      throw std::runtime_error(path + ": cannot stat (" + std::strerror(err) + ")");
    }
    size_ = static_cast<int64_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, static_cast<size_t>(size_), PROT_READ, MAP_SHARED, fd_, 0);
      if (p == MAP_FAILED) {
        const int err = errno;
        ::close(fd_);
        throw std::runtime_error(path + ": cannot mmap (" + std::strerror(err) + ")");
      }
      // No madvise: measured on a cold 1 GB shard, WILLNEED did not beat plain faults from the copy threads
      // (which read in parallel), and SEQUENTIAL was 1.7x slower.
      data_ = static_cast<const uint8_t*>(p);
    }
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() {
    if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), static_cast<size_t>(size_));
    if (fd_ >= 0) ::close(fd_);
  }
  ByteSource source() const { return ByteSource{data_, size_}; }

 private:
  std::string path_;
  int fd_ = -1;
  const uint8_t* data_ = nullptr;
  int64_t size_ = 0;
};

// A new file (never an existing one: O_EXCL), written with pwrite and checked for its final size on close.
class OutputFile {
 public:
  OutputFile(const std::string& path, int64_t size) : path_(path), size_(size) {
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd_ < 0) throw std::runtime_error(path + ": cannot create (" + std::strerror(errno) + ")");
  }
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;
  ~OutputFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  ByteSink sink() const { return ByteSink{nullptr, fd_, size_, path_}; }
  // Close and verify; throws on a failed close (delayed write errors surface here) or a short file.
  void finish() {
    struct stat st;
    const bool stat_ok = ::fstat(fd_, &st) == 0;
    const int rc = ::close(fd_);
    fd_ = -1;
    if (rc != 0) throw std::runtime_error(path_ + ": close failed (" + std::strerror(errno) + ")");
    if (!stat_ok || static_cast<int64_t>(st.st_size) != size_) {
      throw std::runtime_error(path_ + ": written size does not match the plan");
    }
  }

 private:
  std::string path_;
  int fd_ = -1;
  int64_t size_ = 0;
};

namespace detail {

inline int64_t piece_bytes(const CopyPiece& p) { return p.rows * p.row_bytes; }

inline bool piece_contiguous(const CopyPiece& p) {
  return p.rows <= 1 || (p.src_stride == p.row_bytes && p.dst_stride == p.row_bytes);
}

// Last byte (exclusive) touched by `rows` rows of `row_bytes` starting at `offset` with `stride`.
inline int64_t span_end(int64_t offset, int64_t stride, int64_t rows, int64_t row_bytes) {
  return rows == 0 || row_bytes == 0 ? offset : offset + (rows - 1) * stride + row_bytes;
}

// Maps the pages of [p, p + n) into this process by reading one byte of each. pwrite from a memory-mapped source
// needs it: Linux 6.x's generic_perform_write no longer faults the user buffer in before copying, so a copy that
// meets an unmapped source page comes back short, the page-cache folio is zeroed and the copy retried, chunk by
// chunk (measured: ~25% more CPU time than with this, with memset ~15% of the profile).
inline void prefault(const uint8_t* p, int64_t n) {
  const volatile uint8_t* v = p;
  for (int64_t i = 0; i < n; i += 4096) (void)v[i];
  if (n > 0) (void)v[n - 1];
}

// Largest single write. The page cache sizes a new folio by the write: 2 MiB writes make 2 MiB folios, which on
// this VM (free memory handed back to the host, fragmented by other jobs) cost 5-10x more to allocate than the
// copy itself; 256 KiB writes ran at 3-4 GB/s where 2 MiB ones ran at 0.4-0.5 GB/s (and copy_file_range, which
// splices in pipe-buffer pieces, at ~2 GB/s).
constexpr int64_t kMaxWrite = 256 << 10;

// Writes all of buf to fd at offset, in writes of at most kMaxWrite, retrying short writes and EINTR. Returns
// errno, or 0.
inline int pwrite_all(int fd, const uint8_t* buf, int64_t len, int64_t offset) {
  while (len > 0) {
    const size_t chunk = static_cast<size_t>(std::min(len, kMaxWrite));
    const ssize_t n = ::pwrite(fd, buf, chunk, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return EIO;
    buf += n;
    len -= n;
    offset += n;
  }
  return 0;
}

inline std::string write_error(const ByteSink& sink, int err) {
  return sink.path + ": write failed (" + std::strerror(err) + ")";
}

}  // namespace detail

// Empty string if the plan is safe to run: every piece inside its unit and its source, every unit's pieces adding
// up to its size, and the units of each sink tiling [0, size) without gaps or overlaps.
inline std::string copy_plan_check(const CopyPlan& plan) {
  const int64_t n_src = static_cast<int64_t>(plan.sources.size());
  const int64_t n_sink = static_cast<int64_t>(plan.sinks.size());
  std::vector<std::vector<std::pair<int64_t, int64_t>>> ranges(static_cast<size_t>(n_sink));
  int64_t next_piece = 0;
  for (int64_t u = 0; u < plan.n_units; ++u) {
    const CopyUnit& unit = plan.units[u];
    const std::string where = "unit " + std::to_string(u);
    if (unit.sink < 0 || unit.sink >= n_sink) return where + ": sink index out of range";
    if (unit.begin < 0 || unit.end < unit.begin || unit.end > plan.sinks[unit.sink].size) {
      return where + ": byte range outside its sink";
    }
    if (unit.first_piece != next_piece || unit.last_piece < unit.first_piece || unit.last_piece > plan.n_pieces) {
      return where + ": pieces must follow the previous unit's";
    }
    next_piece = unit.last_piece;
    int64_t total = 0;
    for (int64_t i = unit.first_piece; i < unit.last_piece; ++i) {
      const CopyPiece& p = plan.pieces[i];
      const std::string pw = where + ", piece " + std::to_string(i);
      if (p.rows < 0 || p.row_bytes < 0 || p.src_stride < 0 || p.dst_stride < 0) return pw + ": negative size";
      if (p.rows > 1 && p.dst_stride < p.row_bytes) return pw + ": destination rows overlap";
      if (p.dst_offset < unit.begin || detail::span_end(p.dst_offset, p.dst_stride, p.rows, p.row_bytes) > unit.end) {
        return pw + ": destination outside its unit";
      }
      if (p.src >= n_src || p.src < -1) return pw + ": source index out of range";
      if (p.src >= 0 && (p.src_offset < 0 || detail::span_end(p.src_offset, p.src_stride, p.rows, p.row_bytes) >
                                                 plan.sources[p.src].size)) {
        return pw + ": source bytes outside the source";
      }
      total += detail::piece_bytes(p);
    }
    if (total != unit.end - unit.begin) return where + ": pieces do not add up to the unit's size";
    ranges[unit.sink].emplace_back(unit.begin, unit.end);
  }
  if (next_piece != plan.n_pieces) return "pieces left over after the last unit";
  for (int64_t s = 0; s < n_sink; ++s) {
    auto& r = ranges[s];
    std::sort(r.begin(), r.end());
    int64_t at = 0;
    for (const auto& [b, e] : r) {
      if (b != at) return "sink " + std::to_string(s) + ": units leave a gap or overlap at byte " + std::to_string(at);
      at = e;
    }
    if (at != plan.sinks[s].size) return "sink " + std::to_string(s) + ": units do not reach its end";
  }
  return "";
}

// ---------------------------------------------------------------- reference (one thread, byte loops)

// Builds each unit byte by byte in a buffer, then writes the buffer out: obviously right, slow.
inline void copy_plan_run_reference(const CopyPlan& plan) {
  std::vector<uint8_t> buf;
  for (int64_t u = 0; u < plan.n_units; ++u) {
    const CopyUnit& unit = plan.units[u];
    buf.assign(static_cast<size_t>(unit.end - unit.begin), 0);
    for (int64_t i = unit.first_piece; i < unit.last_piece; ++i) {
      const CopyPiece& p = plan.pieces[i];
      for (int64_t r = 0; r < p.rows; ++r) {
        for (int64_t b = 0; b < p.row_bytes; ++b) {
          const uint8_t v = p.src < 0 ? 0 : plan.sources[p.src].data[p.src_offset + r * p.src_stride + b];
          buf[static_cast<size_t>(p.dst_offset + r * p.dst_stride + b - unit.begin)] = v;
        }
      }
    }
    const ByteSink& sink = plan.sinks[unit.sink];
    if (sink.data != nullptr) {
      for (int64_t b = 0; b < unit.end - unit.begin; ++b) sink.data[unit.begin + b] = buf[static_cast<size_t>(b)];
    } else if (const int err = detail::pwrite_all(sink.fd, buf.data(), unit.end - unit.begin, unit.begin)) {
      throw std::runtime_error(detail::write_error(sink, err));
    }
  }
}

// ---------------------------------------------------------------- fast path

namespace detail {

// Copies piece p into `out`, which holds the sink's bytes from `origin` on.
inline void copy_piece_to(const CopyPlan& plan, const CopyPiece& p, uint8_t* out, int64_t origin) {
  uint8_t* dst = out + (p.dst_offset - origin);
  if (piece_contiguous(p)) {
    const int64_t n = piece_bytes(p);
    if (p.src < 0) {
      std::memset(dst, 0, static_cast<size_t>(n));
    } else {
      std::memcpy(dst, plan.sources[p.src].data + p.src_offset, static_cast<size_t>(n));
    }
    return;
  }
  const uint8_t* src = p.src < 0 ? nullptr : plan.sources[p.src].data + p.src_offset;
  for (int64_t r = 0; r < p.rows; ++r) {
    if (src == nullptr) {
      std::memset(dst + r * p.dst_stride, 0, static_cast<size_t>(p.row_bytes));
    } else {
      std::memcpy(dst + r * p.dst_stride, src + r * p.src_stride, static_cast<size_t>(p.row_bytes));
    }
  }
}

// The units of one sink, in plan order, taken one by one by any thread. Writes to one file are serialised by a
// mutex: the kernel serialises buffered writes to one file under its inode lock anyway, and a second writer waits
// there by spinning (measured: two threads writing one file used 2-3x the CPU time of one). Outside the mutex,
// threads gather their next units in parallel, and threads writing different files run in parallel.
struct Lane {
  std::vector<int64_t> units;
  int64_t bytes = 0;
  std::atomic<int64_t> next{0};
  std::mutex write_lock;
};

// Fills one unit; returns errno of a failed write, or 0.
inline int run_unit(const CopyPlan& plan, const CopyUnit& unit, Lane& lane, std::vector<uint8_t>& staging,
                    int64_t max_unit) {
  const ByteSink& sink = plan.sinks[unit.sink];
  const int64_t n = unit.end - unit.begin;
  if (n == 0) return 0;
  if (sink.data != nullptr) {
    for (int64_t i = unit.first_piece; i < unit.last_piece; ++i) copy_piece_to(plan, plan.pieces[i], sink.data, 0);
    return 0;
  }
  const CopyPiece& first = plan.pieces[unit.first_piece];
  if (unit.last_piece - unit.first_piece == 1 && first.src >= 0 && piece_contiguous(first)) {
    // The unit is one contiguous range of one source (checked: its bytes add up to the unit): write it from there.
    const uint8_t* src = plan.sources[first.src].data + first.src_offset;
    prefault(src, n);
    std::lock_guard<std::mutex> hold(lane.write_lock);
    return pwrite_all(sink.fd, src, n, unit.begin);
  }
  if (staging.size() < static_cast<size_t>(max_unit)) staging.resize(static_cast<size_t>(max_unit));
  for (int64_t i = unit.first_piece; i < unit.last_piece; ++i) {
    copy_piece_to(plan, plan.pieces[i], staging.data(), unit.begin);
  }
  std::lock_guard<std::mutex> hold(lane.write_lock);
  return pwrite_all(sink.fd, staging.data(), n, unit.begin);
}

}  // namespace detail

// One lane per sink, biggest first; thread t starts with lane t and then helps in the others, so different files
// are written in parallel and no thread idles while units are left.
inline void copy_plan_run(const CopyPlan& plan, int threads) {
  if (threads <= 0) threads = omp_get_max_threads();
  int64_t max_unit = 0;
  std::vector<std::unique_ptr<detail::Lane>> lanes;
  for (size_t s = 0; s < plan.sinks.size(); ++s) lanes.push_back(std::make_unique<detail::Lane>());
  for (int64_t u = 0; u < plan.n_units; ++u) {
    const CopyUnit& unit = plan.units[u];
    lanes[unit.sink]->units.push_back(u);
    lanes[unit.sink]->bytes += unit.end - unit.begin;
    max_unit = std::max(max_unit, unit.end - unit.begin);
  }
  std::stable_sort(lanes.begin(), lanes.end(), [](const auto& a, const auto& b) { return a->bytes > b->bytes; });
  const int64_t n_lanes = static_cast<int64_t>(lanes.size());
  std::atomic<bool> failed{false};
  std::string error;
#pragma omp parallel num_threads(threads)
  {
    std::vector<uint8_t> staging;  // allocated on first use: memory-only plans never need it
    const int64_t start = omp_get_thread_num();
    for (int64_t k = 0; k < n_lanes && !failed.load(); ++k) {
      detail::Lane& lane = *lanes[(start + k) % n_lanes];
      while (!failed.load(std::memory_order_relaxed)) {
        const int64_t i = lane.next.fetch_add(1);
        if (i >= static_cast<int64_t>(lane.units.size())) break;
        const CopyUnit& unit = plan.units[lane.units[i]];
        const int err = detail::run_unit(plan, unit, lane, staging, max_unit);
        if (err != 0 && !failed.exchange(true)) {
#pragma omp critical(omni_fast_convert_error)
          error = detail::write_error(plan.sinks[unit.sink], err);
        }
      }
    }
  }
  if (failed.load()) throw std::runtime_error(error);
}

}  // namespace omni_fast
