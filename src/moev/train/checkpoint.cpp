#include "moev/train/checkpoint.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <nlohmann/json.hpp>

#include <c10/core/CPUAllocator.h>
#include <caffe2/serialize/inline_container.h>
#include <caffe2/serialize/read_adapter_interface.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torch/csrc/jit/serialization/unpickler.h>
#include <torch/torch.h>

#include "moev/core/error.h"

namespace moev::train {

namespace {

c10::Dict<std::string, at::Tensor> to_dict(const std::map<std::string, at::Tensor>& m) {
  c10::Dict<std::string, at::Tensor> d;
  for (const auto& [k, v] : m) d.insert(k, v.detach().to(torch::kCPU));
  return d;
}

std::map<std::string, at::Tensor> from_dict(const c10::IValue& v, const std::string& what,
                                            const std::string& path) {
  MOEV_CHECK(v.isGenericDict(), "checkpoint ", path, ": '", what, "' is not a dict of tensors");
  std::map<std::string, at::Tensor> out;
  for (const auto& kv : v.toGenericDict()) out[kv.key().toStringRef()] = kv.value().toTensor();
  return out;
}

// The kinds of value the state's keys hold, checked when a checkpoint is read:
// a hand-edited or foreign state ("step": "x") failed later with the JSON
// library's words, naming no file or key.
enum class Kind { kCount, kNumber, kBool, kText, kTexts, kObject };

const std::map<std::string, Kind>& state_kinds() {
  static const std::map<std::string, Kind> kinds = {
      {"step", Kind::kCount},          {"epoch", Kind::kCount},       {"batch", Kind::kCount},
      {"world_size", Kind::kCount},    {"replicas", Kind::kCount},    {"planned_steps", Kind::kCount},
      {"train_elapsed_s", Kind::kNumber}, {"expert_parallel", Kind::kBool}, {"combine_weights", Kind::kText},
      {"class_names", Kind::kTexts},   {"log_window", Kind::kObject}, {"pretrain", Kind::kObject},
      {"train_data", Kind::kText},
      {"fusion", Kind::kObject},       {"log_window.loss", Kind::kNumber}, {"log_window.aux_loss", Kind::kNumber},
      {"log_window.grad_norm", Kind::kNumber}, {"log_window.correct", Kind::kCount},
      {"log_window.images", Kind::kCount}, {"log_window.seconds", Kind::kNumber},
      {"pretrain.step", Kind::kCount}, {"pretrain.queue_ptr", Kind::kCount}, {"pretrain.options", Kind::kObject},
      {"pretrain.knn_top1_init", Kind::kNumber}, {"pretrain.epoch_loss", Kind::kNumber},
      {"pretrain.epoch_steps", Kind::kCount}, {"pretrain.window_loss", Kind::kNumber},
      {"pretrain.window_steps", Kind::kCount}};
  return kinds;
}

bool is_kind(const nlohmann::json& v, Kind k) {
  switch (k) {
    case Kind::kCount: return v.is_number_integer() && v.get<int64_t>() >= 0;
    case Kind::kNumber: return v.is_number();
    case Kind::kBool: return v.is_boolean();
    case Kind::kText: return v.is_string();
    case Kind::kTexts:
      return v.is_array() && std::all_of(v.begin(), v.end(), [](const nlohmann::json& e) { return e.is_string(); });
    case Kind::kObject: return v.is_object();
  }
  return false;
}

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kCount: return "an integer >= 0";
    case Kind::kNumber: return "a number";
    case Kind::kBool: return "true or false";
    case Kind::kText: return "a string";
    case Kind::kTexts: return "a list of strings";
    case Kind::kObject: return "an object";
  }
  return "";
}

// The config and state entries: JSON objects, the state's known keys of their kinds.
void check_metadata(const c10::IValue& config, const c10::IValue& state, const std::string& path) {
  for (const auto& [name, v] : {std::pair<const char*, const c10::IValue*>{"config", &config}, {"state", &state}}) {
    MOEV_CHECK(v->isString(), "checkpoint ", path, ": its '", name, "' entry is not JSON text but a value of type ",
               v->tagKind());
    const auto j = nlohmann::json::parse(v->toStringRef(), nullptr, /*allow_exceptions=*/false);
    MOEV_CHECK(j.is_object(), "checkpoint ", path, ": its '", name, "' entry is not a JSON object");
    if (std::string(name) != "state") continue;
    for (const auto& [key, kind] : state_kinds()) {
      const auto dot = key.find('.');
      const auto* parent = &j;
      if (dot != std::string::npos) {
        const auto top = key.substr(0, dot);
        if (!j.contains(top) || !j[top].is_object()) continue;
        parent = &j[top];
      }
      const auto leaf = dot == std::string::npos ? key : key.substr(dot + 1);
      if (!parent->contains(leaf)) continue;
      MOEV_CHECK(is_kind((*parent)[leaf], kind), "checkpoint ", path, ": state.", key, " = ",
                 (*parent)[leaf].dump(), ": expected ", kind_name(kind));
    }
  }
}

// CRC-32 of n bytes continued from crc; zlib takes at most 4 GiB per call.
uLong crc32_of(uLong crc, const void* p, uint64_t n) {
  const auto* b = static_cast<const Bytef*>(p);
  for (uint64_t done = 0; done < n;) {
    const auto chunk = static_cast<uInt>(std::min<uint64_t>(n - done, 1u << 30));
    crc = crc32(crc, b + done, chunk);
    done += chunk;
  }
  return crc;
}

// A checkpoint file opened once: its zip directory, torch's reader (the
// pickle) and the tensor reads all go through the same descriptor, so the file
// checked is the file loaded even if a running training renames a new
// checkpoint into place meanwhile.
class ZipFile : public caffe2::serialize::ReadAdapterInterface {
 public:
  explicit ZipFile(const std::string& path) : path_(path), fd_(::open(path.c_str(), O_RDONLY | O_CLOEXEC)) {
    MOEV_CHECK(fd_ >= 0, "checkpoint ", path, ": cannot open (no such file?)");
    struct stat st {};
    if (::fstat(fd_, &st) != 0) {
      ::close(fd_);
      fail("checkpoint ", path, ": cannot stat");
    }
    size_ = static_cast<uint64_t>(st.st_size);
  }
  ~ZipFile() override { ::close(fd_); }
  ZipFile(const ZipFile&) = delete;
  ZipFile& operator=(const ZipFile&) = delete;

  size_t size() const override { return size_; }
  size_t read(uint64_t pos, void* buf, size_t n, const char* /*what*/) const override {
    size_t done = 0;
    while (done < n) {
      const ssize_t got = ::pread(fd_, static_cast<char*>(buf) + done, n - done, static_cast<off_t>(pos + done));
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) break;
      done += static_cast<size_t>(got);
    }
    return done;
  }

  // Bounds-checked reads: a truncated file reads as "not a zip" or "cut short"
  // rather than past its end.
  bool has(uint64_t at, uint64_t n) const { return at <= size_ && n <= size_ - at; }
  void read_exact(uint64_t at, uint64_t n, char* out) const {
    MOEV_CHECK(has(at, n) && read(at, out, n, "") == n, "checkpoint ", path_, ": read failed at byte ", at,
               " (cut short?)");
  }
  uint64_t le(uint64_t at, int n) const {
    unsigned char b[8];
    read_exact(at, static_cast<uint64_t>(n), reinterpret_cast<char*>(b));
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = (v << 8) | b[i];
    return v;
  }

 private:
  std::string path_;
  int fd_;
  uint64_t size_ = 0;
};

// A stored member of the zip: where its bytes start, how many, their CRC-32.
struct Member {
  uint64_t data = 0, size = 0, crc = 0;
  bool stored = true;  // not compressed (torch writes every member so)
};

// The zip's members by name, from its central directory, each checked to lie
// within the file; a file that is not a readable zip gives none and is left
// for torch to refuse. has_directory says whether an end record was found, so
// a directory listing nothing is told apart from one cut off.
std::map<std::string, Member> zip_members(const ZipFile& z, const std::string& path, bool& has_directory) {
  std::map<std::string, Member> out;
  has_directory = false;
  if (z.size() < 22) return out;
  // End of central directory: the last record with its signature (after it, at most a comment).
  const uint64_t lowest = z.size() > 22 + 65535 ? z.size() - 22 - 65535 : 0;
  std::vector<char> tail(z.size() - lowest);
  z.read_exact(lowest, tail.size(), tail.data());
  int64_t eocd = -1;
  for (uint64_t at = tail.size() - 22 + 1; at-- > 0;)
    if (std::memcmp(tail.data() + at, "PK\x05\x06", 4) == 0) {
      eocd = static_cast<int64_t>(lowest + at);
      break;
    }
  if (eocd < 0) return out;
  uint64_t entries = z.le(eocd + 10, 2), cd = z.le(eocd + 16, 4);
  if ((entries == 0xFFFF || cd == 0xFFFFFFFF) && eocd >= 20 && z.le(eocd - 20, 4) == 0x07064b50) {  // zip64
    const uint64_t rec = z.le(eocd - 20 + 8, 8);
    if (!z.has(rec, 56) || z.le(rec, 4) != 0x06064b50) return out;  // no directory to be read: as if cut
    entries = z.le(rec + 32, 8);
    cd = z.le(rec + 48, 8);
  }
  has_directory = true;
  for (uint64_t e = 0, at = cd; e < entries; ++e) {
    MOEV_CHECK(z.has(at, 46) && z.le(at, 4) == 0x02014b50, "checkpoint ", path,
               ": its zip directory is damaged (entry ", e, " of ", entries, "); the file is corrupt");
    const uint64_t name_len = z.le(at + 28, 2), extra_len = z.le(at + 30, 2), comment_len = z.le(at + 32, 2);
    Member m;
    m.stored = z.le(at + 10, 2) == 0;
    m.crc = z.le(at + 16, 4);
    m.size = z.le(at + 20, 4);
    uint64_t local = z.le(at + 42, 4);
    MOEV_CHECK(z.has(at + 46, name_len + extra_len), "checkpoint ", path, ": its zip directory is cut short");
    std::string name(name_len, '\0');
    z.read_exact(at + 46, name_len, name.data());
    // Zip64 sizes and offset, in the order of the fields that hold 0xFFFFFFFF.
    for (uint64_t x = at + 46 + name_len, end = x + extra_len; x + 4 <= end;) {
      const uint64_t id = z.le(x, 2), len = z.le(x + 2, 2);
      if (id == 0x0001) {
        uint64_t f = x + 4;
        auto field = [&] {  // the next 8-byte field, within this extra record
          MOEV_CHECK(f + 8 <= x + 4 + len, "checkpoint ", path, ": member '", name,
                     "' has a damaged zip64 record; the file is corrupt");
          const uint64_t v = z.le(f, 8);
          f += 8;
          return v;
        };
        if (z.le(at + 24, 4) == 0xFFFFFFFF) field();  // uncompressed size first
        if (z.le(at + 20, 4) == 0xFFFFFFFF) m.size = field();
        if (z.le(at + 42, 4) == 0xFFFFFFFF) local = field();
      }
      x += 4 + len;
    }
    MOEV_CHECK(z.has(local, 30) && z.le(local, 4) == 0x04034b50, "checkpoint ", path, ": member '", name,
               "' points outside the file; the file is corrupt or cut short");
    m.data = local + 30 + z.le(local + 26, 2) + z.le(local + 28, 2);
    MOEV_CHECK(z.has(m.data, m.size), "checkpoint ", path, ": member '", name,
               "' runs past the end of the file; the file is cut short (an interrupted copy?)");
    out[name] = m;
    at += 46 + name_len + extra_len + comment_len;
  }
  return out;
}

// Reads a stored member into out (m.size bytes), or through a bounded buffer
// when out is null, checking its CRC-32 against the directory's: torch's zip
// reader is built without its CRC checks, so a flipped byte in a tensor would
// load as a wrong weight. Each block of at most 4 MB (a multiple of any
// element's size) also goes to on_block while it is in cache.
void read_checked(const ZipFile& z, const std::string& name, const Member& m, char* out, const std::string& path,
                  const std::function<void(const char*, uint64_t)>& on_block = {}) {
  if (!m.stored) return;  // torch reads (and refuses) what it cannot take as stored
  std::vector<char> buffer(out ? 0 : std::min<uint64_t>(m.size, 4u << 20));
  uLong got = crc32(0L, Z_NULL, 0);
  for (uint64_t done = 0; done < m.size;) {
    const uint64_t n = std::min<uint64_t>(m.size - done, uint64_t{4} << 20);
    char* dst = out ? out + done : buffer.data();
    z.read_exact(m.data + done, n, dst);
    got = crc32_of(got, dst, n);
    if (on_block) on_block(dst, n);
    done += n;
  }
  MOEV_CHECK((got & 0xffffffffUL) == m.crc, "checkpoint ", path, ": member '", name,
             "' fails its CRC-32 check; the file is damaged (a disk error or a bad copy)");
}

// Whether the n bytes at p, values of a floating type, are all finite: one
// pass, no allocation. A value is NaN or infinite exactly when its exponent
// bits are all ones. (torch::isfinite made an abs() copy and a bool copy of
// the tensor: +5 GB and tens of seconds on a checkpoint with a 4 GB weight.)
template <typename Bits>
bool exponents_finite(const char* p, uint64_t n, Bits exponent) {
  bool bad = false;
  for (uint64_t i = 0; i + sizeof(Bits) <= n; i += sizeof(Bits)) {
    Bits v;
    std::memcpy(&v, p + i, sizeof v);
    bad |= (v & exponent) == exponent;
  }
  return !bad;
}

bool all_finite(const char* p, uint64_t n, at::ScalarType type) {
  switch (type) {
    case at::kFloat: return exponents_finite<uint32_t>(p, n, 0x7f800000u);
    case at::kDouble: return exponents_finite<uint64_t>(p, n, 0x7ff0000000000000ull);
    case at::kHalf: return exponents_finite<uint16_t>(p, n, 0x7c00);
    case at::kBFloat16: return exponents_finite<uint16_t>(p, n, 0x7f80);
    default: return true;  // integers and bools; moev stores no other floating type
  }
}

// Storage for a tensor record whose bytes are read only if its tensor is
// wanted: large ones on anonymous pages, which take no memory until written.
at::DataPtr unread_storage(uint64_t bytes) {
  if (bytes < (uint64_t{1} << 20)) return c10::GetCPUAllocator()->allocate(bytes);
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  MOEV_CHECK(p != MAP_FAILED, "checkpoint: cannot reserve ", bytes, " bytes for a tensor");
  ::madvise(p, bytes, MADV_HUGEPAGE);  // read ones fault in 2 MB at a time (a quarter of the load, in 4 KB)
  struct Mapping {
    void* p;
    size_t n;
  };
  return at::DataPtr(p, new Mapping{p, bytes}, [](void* c) {
    auto* m = static_cast<Mapping*>(c);
    ::munmap(m->p, m->n);
    delete m;
  }, at::Device(at::kCPU));
}

}  // namespace

void save_checkpoint(const std::string& path, const Checkpoint& ckpt) {
  c10::impl::GenericDict top(c10::StringType::get(), c10::AnyType::get());
  top.insert(std::string("format"), std::string(kCheckpointFormat));
  top.insert(std::string("config"), ckpt.config_json);
  top.insert(std::string("state"), ckpt.state_json);
  top.insert(std::string("model"), to_dict(ckpt.model));
  top.insert(std::string("optimizer"), to_dict(ckpt.optimizer));
  top.insert(std::string("rng"), ckpt.rng.defined() ? ckpt.rng : torch::zeros({0}, torch::kByte));
  if (!ckpt.ema.empty()) top.insert(std::string("ema"), to_dict(ckpt.ema));
  // torch::pickle_save's file, streamed: the pickle (small) first, then the
  // zip, written as it is made. pickle_save built the whole file in memory, a
  // second copy of every tensor: +16 GB at the checkpoint of a model whose
  // weights, AdamW moments and average take 16 GB, which a machine that
  // trains it may not have.
  std::vector<char> pickle;
  torch::jit::Pickler pickler([&](const char* b, size_t n) { pickle.insert(pickle.end(), b, b + n); });
  pickler.protocol();
  pickler.pushIValue(c10::IValue(top));
  pickler.stop();

  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  MOEV_CHECK(fd >= 0, "checkpoint ", tmp, ": cannot open for writing (", std::strerror(errno), ")");
  // A failed write is remembered and the rest of the file passed over: told
  // of a short write, torch's zip writer throws, and throws again from its
  // destructor (std::terminate) when it finishes the file there.
  int write_errno = 0;
  auto write_all = [&](const void* data, size_t n) -> size_t {
    for (size_t done = 0; done < n && write_errno == 0;) {
      const ssize_t k = ::write(fd, static_cast<const char*>(data) + done, n - done);
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) write_errno = k < 0 ? errno : ENOSPC;
      else done += static_cast<size_t>(k);
    }
    return n;
  };
  std::string error;
  try {
    caffe2::serialize::PyTorchStreamWriter writer(write_all);
    torch::jit::writeArchiveAndTensors("data", pickle.data(), pickle.size(), pickler.tensorData(), writer);
    writer.writeEndOfFile();
  } catch (const std::exception& e) {
    error = e.what();
  }
  if (write_errno != 0 || !error.empty() || ::fsync(fd) != 0) {
    const std::string why = write_errno != 0 ? std::strerror(write_errno)
                            : !error.empty() ? error
                                             : std::strerror(errno);
    ::close(fd);
    ::unlink(tmp.c_str());
    fail("checkpoint ", tmp, ": write failed (", why, "); the last checkpoint is left as it was");
  }
  ::close(fd);
  MOEV_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, "checkpoint ", path,
             ": cannot rename from ", tmp);
}

Checkpoint load_checkpoint(const std::string& path, CheckpointLoad what) {
  MOEV_CHECK(!path.empty(), "checkpoint path is empty: expected a checkpoint file");
  if (std::filesystem::is_directory(path)) {
    namespace fs = std::filesystem;
    const fs::path dir(path);
    std::error_code ec;
    for (const char* model : {"hardmoe.json", "checkpoint.pt"})  // a hard MoE's directory, a run's
      if (fs::exists(dir / model, ec))
        fail("checkpoint ", path, ": is a directory; expected a checkpoint file (", (dir / model).string(), "?)");
    // A sweep's or an ablation's directory holds a run per directory: "<dir>/checkpoint.pt?" was no file.
    std::vector<std::string> runs;
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
      std::error_code entry_ec;  // an unreadable entry is passed over, not the end of the listing
      if (fs::exists(it->path() / "checkpoint.pt", entry_ec)) runs.push_back((it->path() / "checkpoint.pt").string());
    }
    std::sort(runs.begin(), runs.end());
    MOEV_CHECK(runs.empty(), "checkpoint ", path, ": is a directory of ", runs.size(), " run", runs.size() == 1 ? "" : "s",
               " (a sweep's or an ablation's?); expected one run's checkpoint file, e.g. ", runs.front());
    fail("checkpoint ", path, ": is a directory with no checkpoint.pt in it; expected a checkpoint file (a run's is ",
         "<run>/checkpoint.pt)");
  }
  // A pipe would block the open below (a FIFO without a writer) or fail its seeks.
  MOEV_CHECK(!std::filesystem::exists(path) || std::filesystem::is_regular_file(path), "checkpoint ", path,
             ": not a regular file (a pipe or a device?); expected a checkpoint file");
  auto file = std::make_shared<ZipFile>(path);
  MOEV_CHECK(file->size() > 0, "checkpoint ", path, ": an empty file (0 bytes; an interrupted copy?)");
  bool has_directory = false;
  const auto members = zip_members(*file, path, has_directory);
  // A zip's directory is at its end: a file that starts as one but has none was cut short, not another format.
  const bool starts_as_zip = file->size() >= 4 && file->le(0, 4) == 0x04034b50;
  MOEV_CHECK(!members.empty() || !starts_as_zip || has_directory, "checkpoint ", path, ": cut short (",
             file->size(), " bytes and no zip directory at the end; an interrupted copy?)");
  MOEV_CHECK(!members.empty() || !starts_as_zip, "checkpoint ", path,
             ": its zip directory lists no members though the file holds some; the file is corrupt");
  // The pickle and torch's small records are checked now; each tensor record
  // as it is read, and only if its tensor is wanted.
  std::string records;  // "<archive>/data/": torch names the tensor records <archive>/data/<key>
  for (const auto& [name, m] : members)
    if (name.size() >= 9 && name.compare(name.size() - 9, 9, "/data.pkl") == 0)
      records = name.substr(0, name.size() - 4) + "/";
  for (const auto& [name, m] : members)
    if (records.empty() || name.compare(0, records.size(), records) != 0) read_checked(*file, name, m, nullptr, path);
  std::map<const void*, std::pair<std::string, const Member*>> unread;  // storage -> its record
  c10::IValue v;
  try {
    caffe2::serialize::PyTorchStreamReader reader(file);
    const auto [pickle, pickle_size] = reader.getRecord("data.pkl");
    size_t consumed = 0;
    auto read_pickle = [&, data = static_cast<const char*>(pickle.get()), n = pickle_size](char* buf, size_t len) {
      const size_t k = std::min(len, n - consumed);
      std::memcpy(buf, data + consumed, k);
      consumed += k;
      return k;
    };
    auto read_record = [&](const std::string& key) {
      const auto it = members.find(records + key);
      MOEV_CHECK(it != members.end(), "checkpoint ", path, ": tensor record '", key,
                 "' is missing; the file is corrupt");
      MOEV_CHECK(it->second.stored, "checkpoint ", path, ": tensor record '", key,
                 "' is compressed, as neither moev nor torch.save writes one (re-zipped by another tool?)");
      if (what == CheckpointLoad::kConfig) return at::DataPtr(nullptr, at::Device(at::kCPU));  // never read
      auto dp = unread_storage(it->second.size);
      unread[dp.get()] = {it->first, &it->second};
      return dp;
    };
    torch::jit::Unpickler unpickler(read_pickle, nullptr, nullptr, read_record, c10::nullopt);
    unpickler.set_version(reader.version());
    v = unpickler.parse_ivalue();
  } catch (const Error&) {
    throw;
  } catch (const std::exception&) {
    fail("checkpoint ", path, ": not a moev checkpoint (unreadable torch pickle)");
  }
  MOEV_CHECK(v.isGenericDict(), "checkpoint ", path, ": not a moev checkpoint");
  auto d = v.toGenericDict();
  for (const char* key : {"format", "config", "state", "model", "optimizer", "rng"})
    MOEV_CHECK(d.contains(std::string(key)), "checkpoint ", path, ": missing entry '", key, "'");
  MOEV_CHECK(d.at(std::string("format")).isString() && d.at(std::string("format")).toStringRef() == kCheckpointFormat,
             "checkpoint ", path, ": format is not ", kCheckpointFormat);
  check_metadata(d.at(std::string("config")), d.at(std::string("state")), path);
  Checkpoint c;
  c.config_json = d.at(std::string("config")).toStringRef();
  c.state_json = d.at(std::string("state")).toStringRef();
  if (what == CheckpointLoad::kConfig) return c;
  // The tensors wanted, read into the storages the pickle made for them. A
  // weight's bytes are also checked to be finite as they are read: a model
  // with NaN weights would evaluate, fuse and teach at exit 0 with
  // chance-level figures, and no moev model stores a non-finite weight or
  // buffer. The weights are read first, so one whose storage another tensor
  // shares is still checked.
  auto fill = [&](const at::Tensor& t, const std::string* weight) {
    auto it = unread.find(t.storage().data());
    if (it == unread.end()) return;  // read already (a storage shared by tensors), or empty
    MOEV_CHECK(t.storage().nbytes() == it->second.second->size, "checkpoint ", path, ": record '", it->second.first,
               "' holds ", it->second.second->size, " bytes but its tensor wants ", t.storage().nbytes(),
               "; the file is corrupt");
    // Judged after the CRC-32: a flipped exponent bit is damage, not a diverged run.
    bool finite = true;
    std::function<void(const char*, uint64_t)> check;
    if (weight && t.is_floating_point())
      check = [&, type = t.scalar_type()](const char* p, uint64_t n) { finite = finite && all_finite(p, n, type); };
    read_checked(*file, it->second.first, *it->second.second, static_cast<char*>(t.storage().data()), path, check);
    MOEV_CHECK(finite, "checkpoint ", path, ": tensor '", *weight,
               "' holds NaN or infinite values (saved from a diverged run?)");
    unread.erase(it);
  };
  auto take = [&](const char* key, std::map<std::string, at::Tensor>& into, bool weights) {
    into = from_dict(d.at(std::string(key)), key, path);
    for (const auto& [name, t] : into) fill(t, weights ? &name : nullptr);
  };
  const bool has_ema = d.contains(std::string("ema"));
  if (what != CheckpointLoad::kInference || !has_ema) take("model", c.model, true);
  if (has_ema) take("ema", c.ema, true);
  if (what == CheckpointLoad::kEverything) take("optimizer", c.optimizer, false);
  c.rng = d.at(std::string("rng")).toTensor();
  fill(c.rng, nullptr);
  return c;
}

std::string weights_fingerprint(const std::map<std::string, at::Tensor>& tensors) {
  uLong crc = crc32(0L, Z_NULL, 0);
  auto add = [&](const void* p, size_t n) { crc = crc32_of(crc, p, n); };
  for (const auto& [name, t] : tensors) {
    add(name.data(), name.size() + 1);
    for (auto d : t.sizes()) add(&d, sizeof d);
    const auto c = t.cpu().contiguous();
    add(c.data_ptr(), c.numel() * c.element_size());
  }
  char hex[9];
  std::snprintf(hex, sizeof hex, "%08lx", static_cast<unsigned long>(crc & 0xffffffffUL));
  return hex;
}

const std::map<std::string, at::Tensor>& inference_weights(const Checkpoint& ckpt) {
  // Empty only when loaded without its weights (CheckpointLoad::kConfig): a bug, not a model.
  MOEV_CHECK(!ckpt.model.empty() || !ckpt.ema.empty(), "inference_weights: the checkpoint was loaded without weights");
  return ckpt.ema.empty() ? ckpt.model : ckpt.ema;
}

std::map<std::string, at::Tensor> module_tensors(const torch::nn::Module& module) {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : module.named_parameters()) out[p.key()] = p.value();
  for (const auto& b : module.named_buffers()) out[b.key()] = b.value();
  return out;
}

void load_module_tensors(torch::nn::Module& module, const std::map<std::string, at::Tensor>& t,
                         const std::string& source) {
  torch::NoGradGuard no_grad;
  auto mine = module_tensors(module);
  for (auto& [name, dst] : mine) {
    auto it = t.find(name);
    MOEV_CHECK(it != t.end(), source, ": tensor '", name,
               "' of this model is missing from the checkpoint (another architecture?)");
    MOEV_CHECK(it->second.sizes() == dst.sizes(), source, ": tensor '", name, "' has shape ",
               it->second.sizes(), " in the checkpoint but ", dst.sizes(),
               " in this model (another architecture?)");
    dst.copy_(it->second);
  }
  for (const auto& [name, _] : t)
    MOEV_CHECK(mine.count(name), source, ": checkpoint tensor '", name,
               "' has no place in this model (another architecture?)");
}

at::Tensor cpu_rng_state() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_cpu_rng_state(const at::Tensor& s) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(s);
}

}  // namespace moev::train
