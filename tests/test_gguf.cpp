// Tests for deltakv/io/gguf.hpp: metadata of every value type and tensors of every supported type
// against a fixture written and dequantized by the Python `gguf` package
// (tests/data/make_gguf_fixture.py), hand-built blocks checking the block layouts independently,
// and every validation failure (truncation at every cut point, bad magic/version, huge counts,
// misaligned/overlapping/out-of-bounds tensors, bad shapes and types, random byte corruption).
// The real model (models/SmolLM2-135M-Instruct.Q4_1.gguf or $DELTAKV_MODEL) is checked when present.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "deltakv/io/gguf.hpp"
#include "support_io.hpp"

using namespace deltakv;
using namespace deltakv::io;
using dkt::contains;
using dkt::read_bytes;
using dkt::TempDir;

namespace {

const std::string kDataDir = DELTAKV_TEST_DATA_DIR;

// Writes GGUF bytes piece by piece (little-endian), for hand-made valid and invalid files.
struct Builder {
  std::vector<std::byte> b;
  void u8(std::uint8_t v) { b.push_back(static_cast<std::byte>(v)); }
  void u16(std::uint16_t v) { for (int k = 0; k < 2; ++k) u8(static_cast<std::uint8_t>(v >> (8 * k))); }
  void u32(std::uint32_t v) { for (int k = 0; k < 4; ++k) u8(static_cast<std::uint8_t>(v >> (8 * k))); }
  void u64(std::uint64_t v) { for (int k = 0; k < 8; ++k) u8(static_cast<std::uint8_t>(v >> (8 * k))); }
  void f32(float v) { u32(std::bit_cast<std::uint32_t>(v)); }
  void str(const std::string& s) {
    u64(s.size());
    for (char c : s) u8(static_cast<std::uint8_t>(c));
  }
  void header(std::uint32_t version, std::uint64_t n_tensors, std::uint64_t n_kv) {
    for (char c : std::string("GGUF")) u8(static_cast<std::uint8_t>(c));
    u32(version);
    u64(n_tensors);
    u64(n_kv);
  }
  void kv_u32(const std::string& k, std::uint32_t v) { str(k); u32(4); u32(v); }
  void kv_str(const std::string& k, const std::string& v) { str(k); u32(8); str(v); }
  void tensor(const std::string& name, std::vector<std::uint64_t> ne, std::uint32_t type, std::uint64_t offset) {
    str(name);
    u32(static_cast<std::uint32_t>(ne.size()));
    for (auto e : ne) u64(e);
    u32(type);
    u64(offset);
  }
  void pad(std::size_t align) { while (b.size() % align) u8(0); }
  void fill(std::size_t n, std::uint8_t v = 0) { for (std::size_t i = 0; i < n; ++i) u8(v); }
};

// A valid file: one key, two F32 tensors [4] and [8, 2] (data section 16 + pad 16 + 64 bytes).
std::vector<std::byte> two_tensor_file(std::uint64_t off_a = 0, std::uint64_t off_b = 32, std::uint32_t version = 3) {
  Builder w;
  w.header(version, 2, 1);
  w.kv_str("general.architecture", "x");
  w.tensor("a", {4}, 0, off_a);
  w.tensor("b", {8, 2}, 0, off_b);
  w.pad(32);
  for (int i = 0; i < 4; ++i) w.f32(float(i));
  w.fill(16);
  for (int i = 0; i < 16; ++i) w.f32(100.0f + float(i));
  return w.b;
}

}  // namespace

TEST_CASE("gguf: type table") {
  CHECK(std::string(ggml_type_name(GgmlType::Q4_1)) == "Q4_1");
  CHECK(std::string(ggml_type_name(GgmlType::Q8_0)) == "Q8_0");
  CHECK(std::string(ggml_type_name(static_cast<GgmlType>(77))) == "unknown");
  CHECK(ggml_row_bytes(GgmlType::F32, 10) == 40);
  CHECK(ggml_row_bytes(GgmlType::F16, 10) == 20);
  CHECK(ggml_row_bytes(GgmlType::Q4_0, 64) == 36);
  CHECK(ggml_row_bytes(GgmlType::Q4_1, 576) == 18 * 20);
  CHECK(ggml_row_bytes(GgmlType::Q5_0, 32) == 22);
  CHECK(ggml_row_bytes(GgmlType::Q5_1, 32) == 24);
  CHECK(ggml_row_bytes(GgmlType::Q8_0, 576) == 18 * 34);
  CHECK(ggml_row_bytes(GgmlType::Q4_K, 256) == 144);
  CHECK(ggml_row_bytes(GgmlType::Q6_K, 512) == 420);
  CHECK_THROWS_AS(ggml_row_bytes(GgmlType::Q4_0, 33), ShapeError);
  CHECK_THROWS_AS(ggml_row_bytes(GgmlType::Q4_0, -32), ShapeError);
  CHECK_THROWS_AS(ggml_row_bytes(static_cast<GgmlType>(77), 32), DTypeError);
  CHECK_THROWS_AS(ggml_row_bytes(GgmlType::Q8_1, 32), DTypeError);
  std::vector<std::byte> zeros(256);
  std::vector<float> out(256);
  CHECK_THROWS_AS(dequantize_row(GgmlType::Q4_K, zeros.data(), out.data(), 256), DTypeError);
  CHECK_THROWS_AS(dequantize_row(GgmlType::Q8_0, zeros.data(), out.data(), 31), ShapeError);
}

TEST_CASE("gguf: block layouts from hand-made blocks") {
  auto half = [](float f) -> std::uint16_t {  // exact for the small values used here
    const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
    const int e = int((u >> 23) & 0xFF) - 127 + 15;
    return static_cast<std::uint16_t>(((u >> 16) & 0x8000u) | (std::uint32_t(e) << 10) | ((u >> 13) & 0x3FFu));
  };
  std::vector<float> y(32);
  SUBCASE("Q4_0: low nibbles are elements 0..15, high nibbles 16..31, x = d (q - 8)") {
    Builder w;
    w.u16(half(0.5f));
    for (int j = 0; j < 16; ++j) w.u8(static_cast<std::uint8_t>(j | ((15 - j) << 4)));
    dequantize_row(GgmlType::Q4_0, w.b.data(), y.data(), 32);
    for (int j = 0; j < 16; ++j) {
      CHECK(y[j] == 0.5f * float(j - 8));
      CHECK(y[16 + j] == 0.5f * float(15 - j - 8));
    }
  }
  SUBCASE("Q4_1: x = d q + m") {
    Builder w;
    w.u16(half(0.25f));
    w.u16(half(-1.5f));
    for (int j = 0; j < 16; ++j) w.u8(static_cast<std::uint8_t>(j | ((15 - j) << 4)));
    dequantize_row(GgmlType::Q4_1, w.b.data(), y.data(), 32);
    for (int j = 0; j < 16; ++j) {
      CHECK(y[j] == 0.25f * float(j) - 1.5f);
      CHECK(y[16 + j] == 0.25f * float(15 - j) - 1.5f);
    }
  }
  SUBCASE("Q5_0 / Q5_1: bit j of the u32 is the fifth bit of element j") {
    const std::uint32_t qh = 0xA5C3F00Fu;
    for (bool with_min : {false, true}) {
      Builder w;
      w.u16(half(2.0f));
      if (with_min) w.u16(half(0.5f));
      w.u32(qh);
      for (int j = 0; j < 16; ++j) w.u8(static_cast<std::uint8_t>(j | ((15 - j) << 4)));
      dequantize_row(with_min ? GgmlType::Q5_1 : GgmlType::Q5_0, w.b.data(), y.data(), 32);
      for (int j = 0; j < 32; ++j) {
        const int q = (j < 16 ? j : 15 - (j - 16)) | int(((qh >> j) & 1u) << 4);
        CHECK(y[j] == (with_min ? 2.0f * float(q) + 0.5f : 2.0f * float(q - 16)));
      }
    }
  }
  SUBCASE("Q8_0: signed bytes") {
    Builder w;
    w.u16(half(0.125f));
    for (int j = 0; j < 32; ++j) w.u8(static_cast<std::uint8_t>(static_cast<std::int8_t>(j * 8 - 128)));
    dequantize_row(GgmlType::Q8_0, w.b.data(), y.data(), 32);
    for (int j = 0; j < 32; ++j) CHECK(y[j] == 0.125f * float(j * 8 - 128));
  }
  SUBCASE("F16 and BF16 special values") {
    Builder w;
    for (std::uint16_t h : {0x3C00, 0x0001, 0x03FF, 0x7BFF, 0x7C00, 0xFC00, 0x8000, 0x7E00}) w.u16(h);
    dequantize_row(GgmlType::F16, w.b.data(), y.data(), 8);
    CHECK(y[0] == 1.0f);
    CHECK(y[1] == std::ldexp(1.0f, -24));
    CHECK(y[2] == std::ldexp(1023.0f, -24));
    CHECK(y[3] == 65504.0f);
    CHECK(y[4] == std::numeric_limits<float>::infinity());
    CHECK(y[5] == -std::numeric_limits<float>::infinity());
    CHECK(std::bit_cast<std::uint32_t>(y[6]) == 0x80000000u);
    CHECK(std::isnan(y[7]));
    Builder v;
    for (std::uint16_t h : {0x3F80, 0xC020}) v.u16(h);
    dequantize_row(GgmlType::BF16, v.b.data(), y.data(), 2);
    CHECK(y[0] == 1.0f);
    CHECK(y[1] == -2.5f);
  }
}

TEST_CASE("gguf: fixture metadata of every value type (written by the gguf package)") {
  const GgufFile f = GgufFile::open(kDataDir + "/small.gguf");
  CHECK(f.version() == 3);
  CHECK(f.alignment() == 32);
  CHECK(f.get_string("general.architecture") == "testarch");
  CHECK(f.get_int("test.u8") == 200);
  CHECK(f.get_int("test.i8") == -100);
  CHECK(f.get_int("test.u16") == 60000);
  CHECK(f.get_int("test.i16") == -30000);
  CHECK(f.get_int("test.u32") == 4000000000LL);
  CHECK(f.get_int("test.i32") == -2000000000LL);
  CHECK(f.get_int("test.u64") == (std::int64_t{1} << 40));
  CHECK(f.get_int("test.i64") == -(std::int64_t{1} << 50));
  CHECK(f.get_float("test.f32") == 0.15625);
  CHECK(f.get_float("test.f64") == -2.718281828459045);
  CHECK(f.get_float("test.i16") == -30000.0);  // integers convert
  CHECK(f.get_bool("test.bool_true"));
  CHECK_FALSE(f.get_bool("test.bool_false"));
  CHECK(f.get_string("test.string") == "hello gguf \xE2\x9C\x93");
  CHECK(f.get_string_array("test.string_array") == std::vector<std::string>{"alpha", "", "gamma \xCE\xB4"});
  CHECK(f.get_int_array("test.int_array") == std::vector<std::int64_t>{3, -1, 4, -1, 5});
  CHECK(f.get_int_array("test.u8_array") == std::vector<std::int64_t>{0, 255, 7});
  CHECK(f.get_float_array("test.float_array") == std::vector<double>{0.5, -1.25, 3.0});
  CHECK(f.get_float_array("test.int_array") == std::vector<double>{3, -1, 4, -1, 5});
  CHECK(f.type_of("test.nested_array") == GgufValueType::ARRAY);
  CHECK(f.array_type_of("test.nested_array") == GgufValueType::ARRAY);
  CHECK(f.array_size("test.nested_array") == 2);
  CHECK(f.keys().front() == "general.architecture");
  CHECK(f.keys().size() == 19);

  CHECK(f.has("test.u8"));
  CHECK_FALSE(f.has("test.missing"));
  CHECK(contains(dkt::thrown<FormatError>([&] { (void)f.get_int("test.missing"); }), "test.missing"));
  CHECK(contains(dkt::thrown<FormatError>([&] { (void)f.get_string("test.u8"); }), "test.u8"));
  CHECK_THROWS_AS((void)f.get_int("test.f32"), FormatError);
  CHECK_THROWS_AS((void)f.get_int("test.bool_true"), FormatError);
  CHECK_THROWS_AS((void)f.get_bool("test.u8"), FormatError);
  CHECK_THROWS_AS((void)f.get_float("test.string"), FormatError);
  CHECK_THROWS_AS((void)f.get_int_array("test.string_array"), FormatError);
  CHECK_THROWS_AS((void)f.get_string_array("test.int_array"), FormatError);
  CHECK_THROWS_AS((void)f.get_int_array("test.float_array"), FormatError);
  CHECK_THROWS_AS((void)f.get_int_array("test.nested_array"), FormatError);
  CHECK_THROWS_AS((void)f.get_string_array("test.string"), FormatError);
}

TEST_CASE("gguf: fixture tensors dequantize exactly like gguf.quants.dequantize") {
  const GgufFile f = GgufFile::open(kDataDir + "/small.gguf");
  const auto bytes = read_bytes(kDataDir + "/small_expected.bin");
  std::ifstream js(kDataDir + "/small_expected.json");
  REQUIRE(js.good());
  const auto index = nlohmann::json::parse(js);
  std::vector<float> expected(bytes.size() / 4);
  for (std::size_t i = 0; i < expected.size(); ++i)
    expected[i] = std::bit_cast<float>(load_le<std::uint32_t>(bytes.data() + 4 * i));

  REQUIRE(f.tensors().size() == index["tensors"].size());
  std::size_t i = 0;
  for (const auto& e : index["tensors"]) {
    const std::string name = e["name"];
    CAPTURE(name);
    REQUIRE(f.has_tensor(name));
    const GgufTensorInfo& t = f.tensor(name);
    CHECK(f.tensors()[i++].name == name);
    CHECK(std::string(ggml_type_name(t.type)) == e["type"].get<std::string>());
    CHECK(t.ne == e["ne"].get<std::vector<std::int64_t>>());
    CHECK(t.offset % 32 == 0);
    CHECK(t.nbytes == ggml_row_bytes(t.type, t.ne[0]) * std::size_t(t.n_elements() / t.ne[0]));
    CHECK(f.tensor_data(name).size() == t.nbytes);
    const std::vector<float> got = f.dequantize(name);
    const std::size_t off = e["offset"], count = e["count"];
    REQUIRE(got.size() == count);
    std::size_t mismatches = 0;
    for (std::size_t k = 0; k < count; ++k) mismatches += got[k] != expected[off + k];
    CHECK(mismatches == 0);
    // Row by row through the free function gives the same values.
    const auto data = f.tensor_data(name);
    const std::size_t rb = ggml_row_bytes(t.type, t.ne[0]);
    std::vector<float> row(static_cast<std::size_t>(t.ne[0]));
    const std::int64_t rows = t.n_elements() / t.ne[0];
    for (std::int64_t r = 0; r < rows; ++r) {
      dequantize_row(t.type, data.data() + std::size_t(r) * rb, row.data(), t.ne[0]);
      for (std::int64_t k = 0; k < t.ne[0]; ++k) mismatches += row[std::size_t(k)] != got[std::size_t(r * t.ne[0] + k)];
    }
    CHECK(mismatches == 0);
  }
  CHECK_FALSE(f.has_tensor("t.missing"));
  CHECK(contains(dkt::thrown<FormatError>([&] { (void)f.tensor("t.missing"); }), "t.missing"));
  CHECK(contains(dkt::thrown<FormatError>([&] { (void)f.dequantize("t.missing"); }), "t.missing"));

  // from_bytes sees the same file.
  const GgufFile g = GgufFile::from_bytes(read_bytes(kDataDir + "/small.gguf"));
  CHECK(g.tensors().size() == f.tensors().size());
  CHECK(g.dequantize("t.q4_1") == f.dequantize("t.q4_1"));
  // Copies share the bytes and stay valid after the original is gone.
  std::vector<float> before = f.dequantize("t.q5_1");
  GgufFile copy = f;
  { GgufFile moved = std::move(copy); CHECK(moved.dequantize("t.q5_1") == before); }
}

TEST_CASE("gguf: a hand-made v2 file, custom alignment, zero tensors") {
  {
    const GgufFile f = GgufFile::from_bytes(two_tensor_file(0, 32, 2));
    CHECK(f.version() == 2);
    CHECK(f.dequantize("a") == std::vector<float>{0, 1, 2, 3});
    CHECK(f.dequantize("b")[15] == 115.0f);
  }
  {
    Builder w;
    w.header(3, 1, 1);
    w.kv_u32("general.alignment", 64);
    w.tensor("t", {2}, 0, 0);
    w.pad(64);
    w.f32(1.5f);
    w.f32(-2.0f);
    const GgufFile f = GgufFile::from_bytes(w.b);
    CHECK(f.alignment() == 64);
    CHECK(f.data_offset() % 64 == 0);
    CHECK(f.dequantize("t") == std::vector<float>{1.5f, -2.0f});
  }
  {
    Builder w;  // alignment 64 but the data placed at a 32-byte boundary only: the reader must honour 64
    w.header(3, 1, 1);
    w.kv_u32("general.alignment", 64);
    w.tensor("t", {2}, 0, 32);
    w.pad(64);
    w.fill(32);
    w.f32(1.0f);
    w.f32(2.0f);
    CHECK(contains(dkt::thrown<FormatError>([&] { GgufFile::from_bytes(w.b); }), "aligned"));
  }
  {
    Builder w;  // metadata only, no padding after it
    w.header(3, 0, 1);
    w.kv_str("general.architecture", "x");
    const GgufFile f = GgufFile::from_bytes(w.b);
    CHECK(f.tensors().empty());
    CHECK(f.get_string("general.architecture") == "x");
  }
  for (std::uint32_t bad : {0u, 3u, 48u}) {
    Builder w;
    w.header(3, 0, 1);
    w.kv_u32("general.alignment", bad);
    CHECK_THROWS_AS(GgufFile::from_bytes(w.b), FormatError);
  }
  {
    Builder w;
    w.header(3, 0, 1);
    w.kv_str("general.alignment", "32");
    CHECK_THROWS_AS(GgufFile::from_bytes(w.b), FormatError);
  }
}

TEST_CASE("gguf: truncation at every cut point is a FormatError") {
  const auto full = read_bytes(kDataDir + "/small.gguf");
  const GgufFile f = GgufFile::from_bytes(full);
  std::size_t data_end = 0;  // end of the last tensor's bytes: cuts after it only remove padding
  for (const auto& t : f.tensors()) data_end = std::max<std::size_t>(data_end, f.data_offset() + t.offset + t.nbytes);
  REQUIRE(data_end <= full.size());
  int failures = 0;
  for (std::size_t cut = 0; cut < full.size(); ++cut) {
    std::vector<std::byte> part(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(cut));
    if (cut < data_end) {
      try {
        GgufFile::from_bytes(std::move(part));
        ++failures;
        MESSAGE("cut at " << cut << " was accepted");
      } catch (const FormatError&) {
      }
    } else {
      CHECK_NOTHROW(GgufFile::from_bytes(std::move(part)));
    }
  }
  CHECK(failures == 0);
}

TEST_CASE("gguf: header validation") {
  auto good = two_tensor_file();
  CHECK_NOTHROW(GgufFile::from_bytes(good));
  {
    auto b = good;
    b[0] = std::byte{'X'};
    CHECK(contains(dkt::thrown<FormatError>([&] { GgufFile::from_bytes(b); }), "magic"));
  }
  for (std::uint32_t v : {0u, 1u, 4u, 0x03000000u}) {
    auto b = good;
    for (int k = 0; k < 4; ++k) b[4 + k] = static_cast<std::byte>((v >> (8 * k)) & 0xFF);
    const std::string msg = dkt::thrown<FormatError>([&] { GgufFile::from_bytes(b); });
    CHECK(contains(msg, "version"));
    if (v == 0x03000000u) CHECK(contains(msg, "big-endian"));
  }
  CHECK_THROWS_AS(GgufFile::from_bytes({}), FormatError);
  auto set_u64 = [](std::vector<std::byte>& b, std::size_t at, std::uint64_t v) {
    for (int k = 0; k < 8; ++k) b[at + k] = static_cast<std::byte>((v >> (8 * k)) & 0xFF);
  };
  for (std::uint64_t huge : {std::uint64_t{1} << 40, std::numeric_limits<std::uint64_t>::max(), std::uint64_t{3}}) {
    auto b = good;
    set_u64(b, 8, huge);  // tensor count
    CHECK_THROWS_AS(GgufFile::from_bytes(b), FormatError);
    b = good;
    set_u64(b, 16, huge);  // kv count
    CHECK_THROWS_AS(GgufFile::from_bytes(b), FormatError);
  }
  {
    auto b = good;  // the key's string length
    set_u64(b, 24, std::numeric_limits<std::uint64_t>::max());
    CHECK_THROWS_AS(GgufFile::from_bytes(b), FormatError);
    set_u64(b, 24, b.size());
    CHECK_THROWS_AS(GgufFile::from_bytes(b), FormatError);
  }
}

TEST_CASE("gguf: metadata validation") {
  auto one_kv = [](auto&& write_value) {
    Builder w;
    w.header(3, 0, 1);
    write_value(w);
    return w.b;
  };
  // invalid value type
  CHECK_THROWS_AS(GgufFile::from_bytes(one_kv([](Builder& w) { w.str("k"); w.u32(13); w.u32(0); })), FormatError);
  // huge array counts of each element kind
  for (std::uint32_t et : {0u, 4u, 8u, 9u, 12u})
    for (std::uint64_t n : {std::uint64_t{1} << 62, std::numeric_limits<std::uint64_t>::max(), std::uint64_t{1000}}) {
      CAPTURE(et);
      CAPTURE(n);
      CHECK_THROWS_AS(GgufFile::from_bytes(one_kv([&](Builder& w) {
                        w.str("k");
                        w.u32(9);
                        w.u32(et);
                        w.u64(n);
                        w.fill(64);
                      })),
                      FormatError);
    }
  // invalid array element type
  CHECK_THROWS_AS(GgufFile::from_bytes(one_kv([](Builder& w) { w.str("k"); w.u32(9); w.u32(99); w.u64(0); })), FormatError);
  // string inside an array running past the end
  CHECK_THROWS_AS(GgufFile::from_bytes(one_kv([](Builder& w) {
                    w.str("k");
                    w.u32(9);
                    w.u32(8);
                    w.u64(2);
                    w.str("ok");
                    w.u64(1000);
                    w.fill(8);
                  })),
                  FormatError);
  // nesting: depth 3 is fine, very deep nesting is rejected instead of recursing without bound
  auto nested = [&](int depth) {
    return one_kv([&](Builder& w) {
      w.str("k");
      w.u32(9);
      for (int d = 1; d < depth; ++d) {
        w.u32(9);
        w.u64(1);
      }
      w.u32(5);
      w.u64(2);
      w.u32(7);
      w.u32(8);
    });
  };
  {
    const GgufFile f = GgufFile::from_bytes(nested(3));
    CHECK(f.array_type_of("k") == GgufValueType::ARRAY);
    CHECK_THROWS_AS((void)f.get_int_array("k"), FormatError);
  }
  CHECK(contains(dkt::thrown<FormatError>([&] { GgufFile::from_bytes(nested(100000)); }), "nested"));
  // duplicate keys
  {
    Builder w;
    w.header(3, 0, 2);
    w.kv_u32("k", 1);
    w.kv_u32("k", 2);
    CHECK(contains(dkt::thrown<FormatError>([&] { GgufFile::from_bytes(w.b); }), "duplicate"));
  }
  // u64 beyond int64 through get_int, fine through get_float
  {
    const GgufFile f = GgufFile::from_bytes(one_kv([](Builder& w) { w.str("k"); w.u32(10); w.u64(~std::uint64_t{0}); }));
    CHECK_THROWS_AS((void)f.get_int("k"), FormatError);
    CHECK(f.get_float("k") == 18446744073709551615.0);
  }
}

TEST_CASE("gguf: tensor info validation") {
  // One tensor of the given shape/type/offset and `data` bytes of data section.
  auto file = [](std::vector<std::uint64_t> ne, std::uint32_t type, std::uint64_t offset, std::size_t data) {
    Builder w;
    w.header(3, 1, 0);
    w.tensor("t", std::move(ne), type, offset);
    w.pad(32);
    w.fill(data, 0x11);
    return w.b;
  };
  CHECK_NOTHROW(GgufFile::from_bytes(file({32, 2}, 8, 0, 68)));
  CHECK_THROWS_AS(GgufFile::from_bytes(file({32, 2}, 8, 0, 67)), FormatError);        // one byte short
  CHECK_THROWS_AS(GgufFile::from_bytes(file({32, 2}, 8, 32, 68)), FormatError);       // beyond the end
  CHECK(contains(dkt::thrown<FormatError>([&] { GgufFile::from_bytes(file({32, 2}, 8, 1, 200)); }), "aligned"));
  CHECK_THROWS_AS(GgufFile::from_bytes(file({32, 2}, 8, ~std::uint64_t{0} - 31, 68)), FormatError);  // offset overflow
  CHECK_THROWS_AS(GgufFile::from_bytes(file({33, 2}, 8, 0, 200)), FormatError);       // not a block multiple
  CHECK_THROWS_AS(GgufFile::from_bytes(file({32, 0}, 8, 0, 68)), FormatError);        // zero dimension
  CHECK_THROWS_AS(GgufFile::from_bytes(file({}, 0, 0, 68)), FormatError);             // no dimensions
  CHECK_THROWS_AS(GgufFile::from_bytes(file({1, 1, 1, 1, 1}, 0, 0, 68)), FormatError);  // 5 dimensions
  CHECK_NOTHROW(GgufFile::from_bytes(file({1, 1, 1, 4}, 0, 0, 16)));
  CHECK_THROWS_AS(GgufFile::from_bytes(file({1ull << 32, 1ull << 32}, 0, 0, 64)), FormatError);  // too big
  CHECK_THROWS_AS(GgufFile::from_bytes(file({1ull << 62, 4}, 0, 0, 64)), FormatError);  // element count overflow
  CHECK_THROWS_AS(GgufFile::from_bytes(file({1ull << 63, 1}, 0, 0, 64)), FormatError);  // beyond int64
  CHECK_THROWS_AS(GgufFile::from_bytes(file({32}, 99, 0, 64)), DTypeError);           // unknown type
  CHECK_THROWS_AS(GgufFile::from_bytes(file({32}, 9, 0, 64)), DTypeError);            // Q8_1 is not stored
  {
    const GgufFile f = GgufFile::from_bytes(file({256}, 12, 0, 144));  // Q4_K: readable, not dequantizable
    CHECK(f.tensor("t").nbytes == 144);
    CHECK(f.tensor_data("t").size() == 144);
    CHECK(contains(dkt::thrown<DTypeError>([&] { (void)f.dequantize("t"); }), "Q4_K"));
  }
  // overlapping and duplicate tensors
  CHECK_THROWS_AS(GgufFile::from_bytes(two_tensor_file(0, 0)), FormatError);
  {
    Builder w;
    w.header(3, 2, 0);
    w.tensor("a", {4}, 0, 0);
    w.tensor("a", {4}, 0, 32);
    w.pad(32);
    w.fill(64);
    CHECK(contains(dkt::thrown<FormatError>([&] { GgufFile::from_bytes(w.b); }), "duplicate"));
  }
  {
    Builder w;  // b starts inside a's bytes
    w.header(3, 2, 0);
    w.tensor("a", {16}, 0, 0);
    w.tensor("b", {4}, 0, 32);
    w.pad(32);
    w.fill(128);
    CHECK(contains(dkt::thrown<FormatError>([&] { GgufFile::from_bytes(w.b); }), "overlap"));
  }
}

TEST_CASE("gguf: random corruption ends in a typed error or a consistent file") {
  const auto full = read_bytes(kDataDir + "/small.gguf");
  std::mt19937 rng(77);
  int opened = 0, rejected = 0;
  for (int it = 0; it < 3000; ++it) {
    auto b = full;
    const int flips = 1 + int(rng() % 4);
    for (int k = 0; k < flips; ++k) {
      // Bias towards the header and tensor infos, where corruption matters most.
      const std::size_t at = rng() % 3 == 0 ? rng() % b.size() : rng() % std::min<std::size_t>(b.size(), 1200);
      b[at] = static_cast<std::byte>(rng() & 0xFF);
    }
    if (rng() % 5 == 0) b.resize(rng() % b.size());
    try {
      const GgufFile f = GgufFile::from_bytes(std::move(b));
      for (const auto& key : f.keys()) {
        try {
          switch (f.type_of(key)) {
            case GgufValueType::STRING: (void)f.get_string(key); break;
            case GgufValueType::ARRAY:
              if (f.array_type_of(key) == GgufValueType::STRING) (void)f.get_string_array(key);
              else (void)f.get_float_array(key);
              break;
            case GgufValueType::BOOL: (void)f.get_bool(key); break;
            default: (void)f.get_float(key);
          }
        } catch (const FormatError&) {
        }
      }
      for (const auto& t : f.tensors()) {
        try {
          const auto v = f.dequantize(t.name);
          CHECK(v.size() == std::size_t(t.n_elements()));
        } catch (const DTypeError&) {
        }
      }
      ++opened;
    } catch (const FormatError&) {
      ++rejected;
    } catch (const DTypeError&) {
      ++rejected;
    }
  }
  MESSAGE("random corruption: " << opened << " opened, " << rejected << " rejected");
  CHECK(opened + rejected == 3000);
  CHECK(rejected > 0);
}

TEST_CASE("gguf: OS errors are IoError") {
  CHECK_THROWS_AS(GgufFile::open(kDataDir + "/does_not_exist.gguf"), IoError);
  CHECK_THROWS_AS(GgufFile::open(kDataDir), IoError);  // a directory
  const TempDir tmp("gguf");
  const std::string path = tmp.file("empty.gguf");
  { std::ofstream(path, std::ios::binary).flush(); }
  CHECK_THROWS_AS(GgufFile::open(path), FormatError);  // empty: not an OS failure
}

TEST_CASE("gguf: the real model (SmolLM2-135M-Instruct Q4_1) when present") {
  const char* env = std::getenv("DELTAKV_MODEL");
  const std::string path = env && *env ? env : kDataDir + "/../../models/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (!std::filesystem::exists(path)) {
    MESSAGE("SKIPPED: model file not found at " << path
                                                << " (set DELTAKV_MODEL or copy SmolLM2-135M-Instruct.Q4_1.gguf into models/)");
    return;
  }
  const GgufFile f = GgufFile::open(path);
  const std::string arch = f.get_string("general.architecture");
  CHECK(f.get_int(arch + ".block_count") > 0);
  REQUIRE(f.has_tensor("token_embd.weight"));
  for (const auto& t : f.tensors())
    CHECK(t.nbytes == ggml_row_bytes(t.type, t.ne[0]) * std::size_t(t.n_elements() / t.ne[0]));
  const auto emb = f.dequantize("token_embd.weight");
  std::size_t bad = 0;
  for (float x : emb) bad += !std::isfinite(x);
  CHECK(bad == 0);
  CHECK(emb.size() == std::size_t(f.tensor("token_embd.weight").n_elements()));
  if (env && *env) return;  // a user-provided model: only the generic checks above

  CHECK(f.version() == 3);
  CHECK(arch == "llama");
  CHECK(f.get_int("llama.block_count") == 30);
  CHECK(f.get_int("llama.embedding_length") == 576);
  CHECK(f.get_int("llama.feed_forward_length") == 1536);
  CHECK(f.get_int("llama.attention.head_count") == 9);
  CHECK(f.get_int("llama.attention.head_count_kv") == 3);
  CHECK(f.get_int("llama.vocab_size") == 49152);
  CHECK(f.get_float("llama.rope.freq_base") == 100000.0);
  CHECK(std::abs(f.get_float("llama.attention.layer_norm_rms_epsilon") - 1e-5) < 1e-9);
  CHECK(f.get_string("tokenizer.ggml.model") == "gpt2");
  CHECK_FALSE(f.get_bool("tokenizer.ggml.add_bos_token"));
  const auto tokens = f.get_string_array("tokenizer.ggml.tokens");
  CHECK(tokens.size() == 49152);
  CHECK(tokens[1] == "<|im_start|>");
  CHECK(f.get_int_array("tokenizer.ggml.token_type").size() == 49152);
  CHECK(f.tensors().size() == 272);
  CHECK_FALSE(f.has_tensor("output.weight"));  // tied embeddings
  const auto& te = f.tensor("token_embd.weight");
  CHECK(te.type == GgmlType::Q8_0);
  CHECK(te.ne == std::vector<std::int64_t>{576, 49152});
  const auto& wq = f.tensor("blk.0.attn_q.weight");
  CHECK(wq.type == GgmlType::Q4_1);
  CHECK(wq.ne == std::vector<std::int64_t>{576, 576});
  CHECK(f.tensor("blk.29.attn_k.weight").ne == std::vector<std::int64_t>{576, 192});
  CHECK(f.tensor("blk.0.ffn_down.weight").ne == std::vector<std::int64_t>{1536, 576});
  const auto q = f.dequantize("blk.0.attn_q.weight");
  bad = 0;
  for (float x : q) bad += !std::isfinite(x);
  CHECK(bad == 0);
}
