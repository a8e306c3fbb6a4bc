// libFuzzer target: the safetensors reader and the checkpoint loaders on arbitrary bytes.
//
//   * SafetensorsFile::from_bytes; for every tensor: info/raw consistency, read_as<float> and
//     read_as<double> (DTypeError exactly for the integer/bool dtypes, same values either way);
//   * a parsed file must re-serialize (serialize_safetensors) and re-parse to the same tensors
//     and metadata;
//   * load_paper_checkpoint through the SafetensorsFile overload, for a few layer counts, with the
//     config.json taken from the metadata key "config.json" when it holds a JSON object; a loaded
//     compressor must be self-consistent and runnable (its encoders/decoders on the CPU device);
//   * load_compressor (our format, through a temp file) when the metadata says "deltakv.format";
//     a loaded compressor must save and load back identically.
// Only deltakv::Error is caught; anything else, a failed FUZZ_CHECK or a sanitizer report is a crash.
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <map>
#include <optional>
#include <algorithm>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "deltakv/compressor.hpp"
#include "deltakv/cpu/device.hpp"
#include "deltakv/error.hpp"
#include "deltakv/io/checkpoint.hpp"
#include "deltakv/io/safetensors.hpp"
#include "fuzz_common.hpp"

namespace {

using namespace deltakv;
using namespace deltakv::io;

bool is_float_dtype(StDType t) {
  return t == StDType::F64 || t == StDType::F32 || t == StDType::F16 || t == StDType::BF16;
}

std::uint64_t product(const std::vector<std::int64_t>& shape) {
  std::uint64_t n = 1;
  for (auto d : shape) n *= static_cast<std::uint64_t>(d);  // checked by the reader not to overflow
  return n;
}

template <class T>
void check_linear(const OwnedLinear<T>& m, int in, int out) {
  FUZZ_CHECK(!m.empty());
  FUZZ_CHECK(m.in == in && m.out == out);
  FUZZ_CHECK(m.w.size() == std::size_t(in) * std::size_t(out));
  FUZZ_CHECK(m.b.empty() || m.b.size() == std::size_t(out));
  for (T v : m.w) FUZZ_CHECK(std::isfinite(v));
  for (T v : m.b) FUZZ_CHECK(std::isfinite(v));
}

// A loaded compressor must be consistent, and its maps must run on the CPU device.
void check_compressor(const Compressor<float>& c, int n_layers) {
  FUZZ_CHECK(static_cast<int>(c.layers.size()) == n_layers);
  FUZZ_CHECK(c.kv_dim > 0 && c.latent_dim > 0);
  FUZZ_CHECK(c.kind == CodecKind::swiglu ? c.hidden > 0 : c.hidden == 0);
  for (const auto& l : c.layers) {
    if (l.down.empty() && l.up.empty() && l.w3.empty()) continue;  // exact layer
    if (c.kind == CodecKind::linear) {
      check_linear(l.down, c.kv_dim, c.latent_dim);
      FUZZ_CHECK(l.w3.empty());
    } else {
      check_linear(l.down, c.kv_dim, 2 * c.hidden);
      check_linear(l.w3, c.hidden, c.latent_dim);
    }
    check_linear(l.up, c.latent_dim, c.kv_dim);
  }
  // Keep the runnable check cheap: the reader bounds sizes by the input, but a product of two
  // dimensions can still be large.
  if (std::int64_t(c.kv_dim) * c.latent_dim > (1 << 20) || std::int64_t(c.hidden) * c.kv_dim > (1 << 20)) return;
  cpu::CpuDevice<float> dev;
  const std::int64_t n = 2;
  std::vector<float> x(std::size_t(n) * c.kv_dim, 0.5f), z(std::size_t(n) * c.latent_dim), y(std::size_t(n) * c.kv_dim);
  const auto decs = c.decoders();
  with_encoders(c, [&](const auto& encs) {
    FUZZ_CHECK(encs.size() == c.layers.size());
    for (std::size_t i = 0; i < encs.size(); ++i) {
      if (!c.layers[i].present()) continue;
      std::vector<float> scratch(std::size_t(encs[i].scratch_elems(n)) + 1);
      encs[i].encode(dev, MatrixView<const float>{x.data(), n, c.kv_dim, c.kv_dim},
                     MatrixView<float>{z.data(), n, c.latent_dim, c.latent_dim}, scratch.data());
      decs[i].decode(dev, MatrixView<const float>{z.data(), n, c.latent_dim, c.latent_dim},
                     MatrixView<float>{y.data(), n, c.kv_dim, c.kv_dim});
    }
    return 0;
  });
}

bool same_linear(const OwnedLinear<float>& a, const OwnedLinear<float>& b) {
  return a.in == b.in && a.out == b.out && a.w == b.w && a.b == b.b;
}

// A per-process temp directory for the file-based loaders, removed at exit.
std::string& temp_dir() {
  static std::string dir;
  return dir;
}
void remove_temp_dir() {
  std::error_code ec;
  if (!temp_dir().empty()) std::filesystem::remove_all(temp_dir(), ec);
}
std::string temp_path(const char* tag) {
  std::string& dir = temp_dir();
  if (dir.empty()) {
    const char* t = std::getenv("TMPDIR");
    std::string tmpl = std::string(t && *t ? t : "/tmp") + "/deltakv_fuzz_st_XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    FUZZ_CHECK(::mkdtemp(buf.data()) != nullptr);
    dir = buf.data();
    std::atexit(remove_temp_dir);
  }
  return dir + "/" + tag + ".safetensors";
}

void fuzz_our_format(const std::vector<std::byte>& bytes) {
  const std::string path = temp_path("in");
  {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    FUZZ_CHECK(f != nullptr);
    if (!bytes.empty()) FUZZ_CHECK(std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size());
    FUZZ_CHECK(std::fclose(f) == 0);
  }
  Compressor<float> c;
  try {
    c = load_compressor<float>(path);
  } catch (const Error&) {
    return;
  }
  FUZZ_CHECK(c.layers.size() >= 1);
  check_compressor(c, static_cast<int>(c.layers.size()));
  const std::string out = temp_path("out");
  save_compressor(out, c);  // a loaded compressor must save
  const Compressor<float> back = load_compressor<float>(out);
  FUZZ_CHECK(back.kind == c.kind && back.kv_dim == c.kv_dim && back.latent_dim == c.latent_dim &&
             back.hidden == c.hidden && back.layers.size() == c.layers.size());
  for (std::size_t i = 0; i < c.layers.size(); ++i)
    FUZZ_CHECK(same_linear(back.layers[i].down, c.layers[i].down) && same_linear(back.layers[i].w3, c.layers[i].w3) &&
               same_linear(back.layers[i].up, c.layers[i].up));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > (1u << 20)) return 0;
  const std::vector<std::byte> bytes = fuzz::to_bytes(data, size);
  std::optional<SafetensorsFile> parsed;
  try {
    parsed.emplace(SafetensorsFile::from_bytes(bytes));
  } catch (const Error&) {
    return 0;
  }
  const SafetensorsFile& f = *parsed;

  // ---- every tensor ------------------------------------------------------------------------
  std::vector<TensorToWrite> again;
  const std::vector<std::string> names = f.names();
  FUZZ_CHECK(std::is_sorted(names.begin(), names.end()));
  std::uint64_t total = 0;
  for (const std::string& name : names) {
    FUZZ_CHECK(f.contains(name));
    FUZZ_CHECK(name != "__metadata__");
    const TensorInfo& t = f.info(name);
    FUZZ_CHECK(t.name == name);
    FUZZ_CHECK(t.nbytes == product(t.shape) * dtype_size(t.dtype) || t.nbytes == 0);
    for (auto d : t.shape) FUZZ_CHECK(d >= 0);
    const auto raw = f.raw(name);
    FUZZ_CHECK(raw.size() == t.nbytes);
    FUZZ_CHECK(raw.size() <= bytes.size());
    unsigned sum = 0;
    for (std::byte b : raw) sum += std::to_integer<unsigned>(b);  // touch every byte (ASan)
    (void)sum;
    total += raw.size();
    FUZZ_CHECK(total <= bytes.size());  // tensors do not overlap, so they fit in the input
    if (is_float_dtype(t.dtype)) {
      const std::vector<float> vf = f.read_as<float>(name);
      const std::vector<double> vd = f.read_as<double>(name);
      FUZZ_CHECK(vf.size() == t.nbytes / dtype_size(t.dtype) && vd.size() == vf.size());
      for (std::size_t i = 0; i < vf.size(); ++i) {
        if (std::isnan(vd[i])) {
          FUZZ_CHECK(std::isnan(vf[i]));
        } else if (t.dtype != StDType::F64) {
          FUZZ_CHECK(double(vf[i]) == vd[i]);  // every narrower float widens exactly
        } else {
          FUZZ_CHECK(vf[i] == static_cast<float>(vd[i]));
        }
      }
    } else {
      bool threw = false;
      try {
        (void)f.read_as<float>(name);
      } catch (const DTypeError&) {
        threw = true;
      }
      FUZZ_CHECK(threw);
    }
    again.push_back(TensorToWrite{name, t.dtype, t.shape, raw});
  }
  if (!f.contains("\x01no such tensor")) {
    bool threw = false;
    try {
      (void)f.info("\x01no such tensor");
    } catch (const FormatError&) {
      threw = true;
    }
    FUZZ_CHECK(threw);
  }

  // ---- a parsed file re-serializes to an equivalent file -----------------------------------
  const std::vector<std::byte> out = serialize_safetensors(again, f.metadata());
  const SafetensorsFile g = SafetensorsFile::from_bytes(out);
  FUZZ_CHECK(g.names() == names);
  FUZZ_CHECK(g.metadata() == f.metadata());
  for (const std::string& name : names) {
    const TensorInfo &a = f.info(name), &b = g.info(name);
    FUZZ_CHECK(a.dtype == b.dtype && a.shape == b.shape && a.nbytes == b.nbytes);
    const auto ra = f.raw(name), rb = g.raw(name);
    FUZZ_CHECK(ra.size() == rb.size() && (ra.empty() || std::memcmp(ra.data(), rb.data(), ra.size()) == 0));
  }

  // ---- paper checkpoint loader --------------------------------------------------------------
  std::optional<nlohmann::json> config;
  if (auto it = f.metadata().find("config.json"); it != f.metadata().end()) {
    nlohmann::json j = nlohmann::json::parse(it->second, nullptr, /*allow_exceptions=*/false);
    if (!j.is_discarded()) config = std::move(j);
  }
  for (int n_layers : {0, 1, 3, 40}) {
    for (int expected_kv : {0, 8}) {
      try {
        const Compressor<float> c =
            load_paper_checkpoint<float>(f, n_layers, expected_kv, config ? &*config : nullptr);
        FUZZ_CHECK(n_layers >= 1);
        if (expected_kv > 0) FUZZ_CHECK(c.kv_dim == expected_kv);
        check_compressor(c, n_layers);
        bool any = false;
        for (const auto& l : c.layers) any = any || l.present();
        FUZZ_CHECK(any);  // the paper loader refuses a checkpoint without compressor tensors
      } catch (const Error&) {
      }
    }
  }
  try {
    (void)load_paper_checkpoint<double>(f, 2, -1);
    FUZZ_CHECK(false);  // a negative expected_kv_dim is a ConfigError
  } catch (const ConfigError&) {
  }

  // ---- our own format (file based) ---------------------------------------------------------
  if (f.metadata().count("deltakv.format")) fuzz_our_format(bytes);
  return 0;
}
