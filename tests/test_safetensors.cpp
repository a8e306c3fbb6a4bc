// Tests for deltakv/io/safetensors.hpp: round trips, half/bfloat16 widening, every validation
// failure of the reader, and interop with a file written by the Python safetensors package.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "deltakv/io/safetensors.hpp"
#include "support_io.hpp"

using namespace deltakv;
using namespace deltakv::io;
using dkt::TempDir;
using dkt::thrown;

namespace {

template <class T>
std::vector<std::byte> le_bytes(const std::vector<T>& v) {
  std::vector<std::byte> out;
  for (T x : v) {
    std::uint64_t u = 0;
    if constexpr (sizeof(T) == 8) u = std::bit_cast<std::uint64_t>(x);
    else if constexpr (sizeof(T) == 4) u = std::bit_cast<std::uint32_t>(x);
    else if constexpr (sizeof(T) == 2) u = std::bit_cast<std::uint16_t>(x);
    else u = std::bit_cast<std::uint8_t>(x);
    for (std::size_t k = 0; k < sizeof(T); ++k) out.push_back(static_cast<std::byte>((u >> (8 * k)) & 0xFF));
  }
  return out;
}

// A file with the given header text, declared header length (defaults to the real one) and
// `data_len` bytes of data buffer filled with a recognizable pattern.
std::vector<std::byte> make_file(const std::string& header, std::size_t data_len,
                                 std::uint64_t declared_len = std::numeric_limits<std::uint64_t>::max()) {
  const std::uint64_t n = declared_len == std::numeric_limits<std::uint64_t>::max() ? header.size() : declared_len;
  std::vector<std::byte> out;
  for (int k = 0; k < 8; ++k) out.push_back(static_cast<std::byte>((n >> (8 * k)) & 0xFF));
  for (char c : header) out.push_back(static_cast<std::byte>(c));
  for (std::size_t i = 0; i < data_len; ++i) out.push_back(static_cast<std::byte>(i & 0xFF));
  return out;
}

std::string format_error(const std::string& header, std::size_t data_len) {
  return thrown<FormatError>([&] { SafetensorsFile::from_bytes(make_file(header, data_len)); });
}

bool has(const std::string& s, const std::string& sub) { return dkt::contains(s, sub); }

}  // namespace

TEST_CASE("safetensors: dtype names and sizes") {
  CHECK(dtype_size(StDType::F64) == 8);
  CHECK(dtype_size(StDType::F32) == 4);
  CHECK(dtype_size(StDType::F16) == 2);
  CHECK(dtype_size(StDType::BF16) == 2);
  CHECK(dtype_size(StDType::I64) == 8);
  CHECK(dtype_size(StDType::I32) == 4);
  CHECK(dtype_size(StDType::I16) == 2);
  CHECK(dtype_size(StDType::I8) == 1);
  CHECK(dtype_size(StDType::U8) == 1);
  CHECK(dtype_size(StDType::BOOL) == 1);
  for (StDType t : {StDType::F64, StDType::F32, StDType::F16, StDType::BF16, StDType::I64, StDType::I32,
                    StDType::I16, StDType::I8, StDType::U8, StDType::BOOL})
    CHECK(dtype_from_name(dtype_name(t)) == t);
  CHECK_THROWS_AS(dtype_from_name("f32"), DTypeError);
  CHECK_THROWS_AS(dtype_from_name("F8_E4M3"), DTypeError);
}

TEST_CASE("safetensors: F16 and BF16 widening of known bit patterns") {
  CHECK(f16_bits_to_float(0x3C00) == 1.0f);
  CHECK(f16_bits_to_float(0xC100) == -2.5f);
  CHECK(f16_bits_to_float(0x7BFF) == 65504.0f);
  CHECK(f16_bits_to_float(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
  CHECK(f16_bits_to_float(0x03FF) == std::ldexp(1023.0f, -24));  // largest subnormal
  CHECK(f16_bits_to_float(0x0400) == std::ldexp(1.0f, -14));  // smallest normal
  CHECK(f16_bits_to_float(0x8001) == -std::ldexp(1.0f, -24));
  CHECK(f16_bits_to_float(0x3555) == 0.333251953125f);
  CHECK(std::bit_cast<std::uint32_t>(f16_bits_to_float(0x0000)) == 0u);
  CHECK(std::bit_cast<std::uint32_t>(f16_bits_to_float(0x8000)) == 0x80000000u);  // -0 keeps sign
  CHECK(f16_bits_to_float(0x7C00) == std::numeric_limits<float>::infinity());
  CHECK(f16_bits_to_float(0xFC00) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(f16_bits_to_float(0x7E00)));
  CHECK(std::isnan(f16_bits_to_float(0x7C01)));  // signalling-pattern NaN stays NaN, not inf
  CHECK(std::isnan(f16_bits_to_float(0xFE00)));

  CHECK(bf16_bits_to_float(0x3F80) == 1.0f);
  CHECK(bf16_bits_to_float(0xC020) == -2.5f);
  CHECK(bf16_bits_to_float(0x477F) == 65280.0f);
  CHECK(bf16_bits_to_float(0x7F7F) == std::ldexp(255.0f, 127 - 7));  // largest finite
  CHECK(bf16_bits_to_float(0x0001) == std::ldexp(1.0f, -133));  // smallest subnormal
  CHECK(bf16_bits_to_float(0x7F80) == std::numeric_limits<float>::infinity());
  CHECK(bf16_bits_to_float(0xFF80) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(bf16_bits_to_float(0x7FC0)));
  CHECK(std::isnan(bf16_bits_to_float(0x7F81)));
}

TEST_CASE("safetensors: f32_bytes is little-endian") {
  const std::vector<float> v = {1.0f, -2.0f};
  const auto b = f32_bytes(v);
  REQUIRE(b.size() == 8);
  CHECK(b[0] == std::byte{0x00});
  CHECK(b[3] == std::byte{0x3F});
  CHECK(b[7] == std::byte{0xC0});
}

TEST_CASE("safetensors: round trip of several dtypes, shapes and metadata") {
  const std::vector<double> f64 = {1.0 / 3.0, -1e300, 5e-324};
  const std::vector<float> f32 = {0.f, 1.5f, -2.25f, 3e38f, 1e-45f, 7.f};
  const std::vector<std::uint16_t> f16 = {0x3C00, 0xC100, 0x7BFF, 0x0001, 0x7C00, 0x7E00};  // bits
  const std::vector<std::uint16_t> bf16 = {0x3F80, 0xC020, 0x0001, 0xFF80};
  const std::vector<std::int64_t> i64 = {std::numeric_limits<std::int64_t>::min(), 42};
  const std::vector<std::int32_t> i32 = {-7, 8, 9};
  const std::vector<std::int16_t> i16 = {-300};
  const std::vector<std::int8_t> i8 = {-1, 2, -3, 4, -5};
  const std::vector<std::uint8_t> u8 = {255, 0, 128};
  const std::vector<std::uint8_t> bools = {1, 0, 1, 1};

  const auto b_f64 = le_bytes(f64), b_f32 = f32_bytes(f32), b_f16 = le_bytes(f16), b_bf16 = le_bytes(bf16),
             b_i64 = le_bytes(i64), b_i32 = le_bytes(i32), b_i16 = le_bytes(i16), b_i8 = le_bytes(i8),
             b_u8 = le_bytes(u8), b_bool = le_bytes(bools);
  const std::vector<TensorToWrite> in = {
      {"u8", StDType::U8, {3}, b_u8},
      {"f32", StDType::F32, {2, 3}, b_f32},
      {"f16", StDType::F16, {3, 2}, b_f16},
      {"layers.0.bf16", StDType::BF16, {2, 1, 2}, b_bf16},
      {"f64", StDType::F64, {3}, b_f64},
      {"i64", StDType::I64, {2}, b_i64},
      {"i32", StDType::I32, {1, 3}, b_i32},
      {"scalar_i16", StDType::I16, {}, b_i16},
      {"i8", StDType::I8, {5}, b_i8},
      {"mask", StDType::BOOL, {2, 2}, b_bool},
      {"empty", StDType::F32, {0, 4}, {}},
  };
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "é \"quoted\" \n"}};

  const auto bytes = serialize_safetensors(in, meta);
  // Header padded so that the data buffer starts 8-aligned.
  std::uint64_t n = 0;
  for (int k = 0; k < 8; ++k) n |= static_cast<std::uint64_t>(bytes[k]) << (8 * k);
  CHECK(n % 8 == 0);
  CHECK(static_cast<char>(bytes[8 + n - 1]) != '\0');

  const auto f = SafetensorsFile::from_bytes(bytes);
  CHECK(f.metadata() == meta);
  CHECK(f.names() == std::vector<std::string>{"empty", "f16", "f32", "f64", "i32", "i64", "i8",
                                              "layers.0.bf16", "mask", "scalar_i16", "u8"});
  for (const auto& t : in) {
    CAPTURE(t.name);
    REQUIRE(f.contains(t.name));
    const TensorInfo& info = f.info(t.name);
    CHECK(info.name == t.name);
    CHECK(info.dtype == t.dtype);
    CHECK(info.shape == t.shape);
    CHECK(info.nbytes == t.data.size());
    CHECK(info.offset % dtype_size(t.dtype) == 0);  // writer keeps elements aligned
    const auto raw = f.raw(t.name);
    CHECK(std::vector<std::byte>(raw.begin(), raw.end()) == std::vector<std::byte>(t.data.begin(), t.data.end()));
  }
  CHECK_FALSE(f.contains("missing"));

  CHECK(f.read_as<double>("f64") == f64);
  CHECK(f.read_as<float>("f32") == f32);
  CHECK(f.read_as<float>("empty").empty());
  const auto d32 = f.read_as<double>("f32");
  for (std::size_t i = 0; i < f32.size(); ++i) CHECK(d32[i] == static_cast<double>(f32[i]));
  const auto h = f.read_as<float>("f16");
  CHECK(h[0] == 1.0f);
  CHECK(h[1] == -2.5f);
  CHECK(h[2] == 65504.0f);
  CHECK(h[3] == std::ldexp(1.0f, -24));
  CHECK(std::isinf(h[4]));
  CHECK(std::isnan(h[5]));
  const auto bf = f.read_as<double>("layers.0.bf16");
  CHECK(bf == std::vector<double>{1.0, -2.5, std::ldexp(1.0, -133), -std::numeric_limits<double>::infinity()});
  CHECK(f.read_as<float>("f64")[0] == static_cast<float>(1.0 / 3.0));  // F64 -> float rounds

  for (const char* name : {"i64", "i32", "scalar_i16", "i8", "u8", "mask"}) {
    CAPTURE(name);
    CHECK_THROWS_AS(f.read_as<float>(name), DTypeError);
    CHECK_THROWS_AS(f.read_as<double>(name), DTypeError);
  }

  // No tensors and no metadata is a valid file too.
  const auto empty = SafetensorsFile::from_bytes(serialize_safetensors({}));
  CHECK(empty.names().empty());
  CHECK(empty.metadata().empty());
}

TEST_CASE("safetensors: write_safetensors replaces the file atomically") {
  const TempDir tmp("safetensors");
  const auto& dir = tmp.path;
  const auto path = tmp.file("ckpt.safetensors");
  const std::vector<float> v1 = {1, 2, 3}, v2 = {4, 5};
  const auto b1 = f32_bytes(v1), b2 = f32_bytes(v2);

  write_safetensors(path, {{"x", StDType::F32, {3}, b1}}, {{"step", "1"}});
  CHECK(SafetensorsFile::open(path).read_as<float>("x") == v1);
  write_safetensors(path, {{"y", StDType::F32, {2}, b2}});
  const auto f = SafetensorsFile::open(path);
  CHECK_FALSE(f.contains("x"));
  CHECK(f.read_as<float>("y") == v2);
  CHECK(f.metadata().empty());
  CHECK(serialize_safetensors({{"y", StDType::F32, {2}, b2}}).size() == std::filesystem::file_size(path));

  // A failed write (bad input) leaves the previous file untouched and no temp file behind.
  CHECK_THROWS_AS(write_safetensors(path, {{"z", StDType::F32, {5}, b2}}), ShapeError);
  CHECK(SafetensorsFile::open(path).read_as<float>("y") == v2);
  std::size_t entries = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir)) ++entries;
  CHECK(entries == 1);

  const std::string missing_dir = (dir / "no_such_dir" / "x.safetensors").string();
  CHECK_THROWS_AS(write_safetensors(missing_dir, {{"y", StDType::F32, {2}, b2}}), IoError);
  CHECK_THROWS_AS(SafetensorsFile::open((dir / "absent.safetensors").string()), IoError);
  CHECK_THROWS_AS(SafetensorsFile::open(dir.string()), IoError);  // a directory is not a file
}

TEST_CASE("safetensors: writer rejects inconsistent input") {
  const std::vector<float> v = {1, 2, 3, 4};
  const auto b = f32_bytes(v);
  CHECK_THROWS_AS(serialize_safetensors({{"x", StDType::F32, {3}, b}}), ShapeError);
  CHECK_THROWS_AS(serialize_safetensors({{"x", StDType::F64, {4}, b}}), ShapeError);
  CHECK_THROWS_AS(serialize_safetensors({{"x", StDType::F32, {-4}, b}}), ShapeError);
  CHECK_THROWS_AS(serialize_safetensors({{"x", StDType::F32, {1LL << 62, 1LL << 62}, b}}), ShapeError);
  CHECK_THROWS_AS(serialize_safetensors({{"x", StDType::F32, {4}, b}, {"x", StDType::F32, {4}, b}}), FormatError);
  CHECK_THROWS_AS(serialize_safetensors({{"__metadata__", StDType::F32, {4}, b}}), FormatError);
  CHECK_THROWS_AS(serialize_safetensors({{"bad\xff", StDType::F32, {4}, b}}), FormatError);
  CHECK(serialize_safetensors({{"x", StDType::F32, {2, 2}, b}}).size() > 16);
}

TEST_CASE("safetensors: truncated files and bad header lengths") {
  // Shorter than the 8-byte length prefix.
  CHECK(has(thrown<FormatError>([] { SafetensorsFile::from_bytes({}); }), "shorter"));
  CHECK(has(thrown<FormatError>([] { SafetensorsFile::from_bytes(std::vector<std::byte>(7)); }), "shorter"));
  // Header length larger than what follows.
  const std::string h = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  CHECK(has(thrown<FormatError>([&] { SafetensorsFile::from_bytes(make_file(h, 8, h.size() + 9)); }), "larger"));
  auto truncated = make_file(h, 8);
  truncated.resize(8 + h.size() / 2);  // cut inside the header
  CHECK(has(thrown<FormatError>([&] { SafetensorsFile::from_bytes(truncated); }), "larger"));
  // Data buffer cut short: the tensor's end now lies beyond it.
  auto short_data = make_file(h, 8);
  short_data.pop_back();
  CHECK(has(thrown<FormatError>([&] { SafetensorsFile::from_bytes(short_data); }), "beyond"));
  // Absurd header length (> 100 MB) is refused before anything is allocated.
  CHECK(has(thrown<FormatError>([&] { SafetensorsFile::from_bytes(make_file(h, 8, 200'000'000)); }), "limit"));
  CHECK(has(thrown<FormatError>([&] { SafetensorsFile::from_bytes(make_file(h, 8, ~std::uint64_t{0} - 1)); }),
            "limit"));
  // Zero-length header is not JSON.
  CHECK(has(format_error("", 0), "JSON"));
}

TEST_CASE("safetensors: malformed JSON headers") {
  CHECK(has(format_error(R"({"a": )", 0), "not valid JSON"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}} trailing)", 4), "not valid JSON"));
  CHECK(has(format_error(std::string("{\"a\xff\":{}}"), 0), "not valid JSON"));  // invalid UTF-8
  CHECK(has(format_error(R"([1, 2])", 0), "not an object"));
  CHECK(has(format_error(R"("str")", 0), "not an object"));
  CHECK(has(format_error(R"(null)", 0), "not an object"));
  CHECK(has(format_error(R"({"a": 5})", 0), "not an object"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                         R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8),
            "duplicate key 'a'"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","dtype":"F64","shape":[1],"data_offsets":[0,4]}})", 8),
            "duplicate key 'dtype'"));
  // Padding with trailing spaces, as writers do, is fine.
  CHECK_NOTHROW(SafetensorsFile::from_bytes(make_file("{}      ", 0)));
}

TEST_CASE("safetensors: tensor entries with missing fields or wrong JSON types") {
  CHECK(has(format_error(R"({"a":{"shape":[1],"data_offsets":[0,4]}})", 4), "missing field 'dtype'"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","data_offsets":[0,4]}})", 4), "missing field 'shape'"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[1]}})", 4), "missing field 'data_offsets'"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":1}})", 4),
            "unknown field 'extra'"));
  CHECK(has(format_error(R"({"a":{"dtype":5,"shape":[1],"data_offsets":[0,4]}})", 4), "'dtype'"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":"1","data_offsets":[0,4]}})", 4), "'shape'"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}})", 4), "not an integer"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}})", 4), "not an integer"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,4]}})", 4),
            "int64"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", 4), "two integers"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", 8), "two integers"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":{"0":4}}})", 4), "two integers"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0.0,4.0]}})", 4), "non-negative"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", 4), "non-negative"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":["0","4"]}})", 4), "non-negative"));
}

TEST_CASE("safetensors: shape and offset validation") {
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4), "negative dimension"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[2,-3],"data_offsets":[0,0]}})", 4), "negative dimension"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", 8), "after end"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8), "beyond"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551611,18446744073709551615]}})",
                         8),
            "beyond"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "needs 12 bytes"));
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[],"data_offsets":[0,0]}})", 8), "needs 4 bytes"));
  CHECK(has(format_error(R"({"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,4]}})", 8), "needs 8 bytes"));
  // product(shape) * 4 == 2^64 wraps to 0 in unchecked arithmetic; it must not pass as 0 bytes.
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[4294967296,1073741824],"data_offsets":[0,0]}})", 8),
            "overflows"));
  CHECK(has(format_error(R"({"a":{"dtype":"F64","shape":[4611686018427387904,4611686018427387904,4]},"x":1})", 8),
            "data_offsets"));
  // A zero dimension makes the tensor empty even if the other dimensions are huge.
  CHECK_NOTHROW(SafetensorsFile::from_bytes(
      make_file(R"({"a":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904,0],"data_offsets":[3,3]}})", 8)));
}

TEST_CASE("safetensors: overlapping tensors are rejected, gaps and empty tensors are not") {
  const std::string overlap =
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
  const auto msg = format_error(overlap, 12);
  CHECK(has(msg, "overlap"));
  CHECK(has(msg, "'a'"));
  CHECK(has(msg, "'b'"));
  // Identical ranges and a range nested in a larger one both overlap.
  CHECK(has(format_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("b":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}})", 8),
            "overlap"));
  CHECK(has(format_error(R"({"a":{"dtype":"U8","shape":[12],"data_offsets":[0,12]},)"
                         R"("b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},)"
                         R"("c":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}})", 12),
            "overlap"));
  CHECK(has(format_error(R"({"a":{"dtype":"U8","shape":[12],"data_offsets":[0,12]},)"
                         R"("b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},)"
                         R"("c":{"dtype":"U8","shape":[2],"data_offsets":[10,12]}})", 12),
            "overlap"));

  // Gaps, unused trailing bytes, out-of-order offsets and empty tensors are accepted.
  const auto f = SafetensorsFile::from_bytes(make_file(
      R"({"b":{"dtype":"U8","shape":[2],"data_offsets":[6,8]},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
      R"("e1":{"dtype":"F32","shape":[0],"data_offsets":[1,1]},"e2":{"dtype":"F32","shape":[0],"data_offsets":[1,1]}})",
      16));
  CHECK(f.names() == std::vector<std::string>{"a", "b", "e1", "e2"});
  CHECK(f.raw("b")[0] == std::byte{6});
  CHECK(f.raw("b")[1] == std::byte{7});
  CHECK(f.raw("e1").empty());
}

TEST_CASE("safetensors: metadata validation") {
  const auto ok = SafetensorsFile::from_bytes(make_file(R"({"__metadata__":{"k":"v","format":"pt"}})", 0));
  CHECK(ok.metadata() == std::map<std::string, std::string>{{"format", "pt"}, {"k", "v"}});
  CHECK(ok.names().empty());
  CHECK(has(format_error(R"({"__metadata__":{"k":1}})", 0), "not a string"));
  CHECK(has(format_error(R"({"__metadata__":{"k":null}})", 0), "not a string"));
  CHECK(has(format_error(R"({"__metadata__":{"k":{"n":"v"}}})", 0), "not a string"));
  CHECK(has(format_error(R"({"__metadata__":["k","v"]})", 0), "not an object"));
  CHECK(has(format_error(R"({"__metadata__":"kv"})", 0), "not an object"));
}

TEST_CASE("safetensors: unknown dtypes are DTypeError, missing tensors FormatError") {
  for (const char* dt : {"F8_E4M3", "U32", "f32", "", "complex64"}) {
    CAPTURE(dt);
    const std::string h =
        std::string(R"({"a":{"dtype":")") + dt + R"(","shape":[1],"data_offsets":[0,4]}})";
    CHECK(has(thrown<DTypeError>([&] { SafetensorsFile::from_bytes(make_file(h, 4)); }), "unsupported dtype"));
  }
  const auto f = SafetensorsFile::from_bytes(make_file(R"({"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})", 4));
  const auto msg = thrown<FormatError>([&] { (void)f.info("nope"); });
  CHECK(has(msg, "'nope'"));
  CHECK(has(msg, "<memory>"));
  CHECK_THROWS_AS((void)f.raw("nope"), FormatError);
  CHECK_THROWS_AS((void)f.read_as<float>("nope"), FormatError);
  CHECK(thrown<Error>([&] { (void)f.read_as<float>("a"); }).size() > 0);
  try {
    (void)f.read_as<double>("a");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::dtype);
  }
}

TEST_CASE("safetensors: reads a file written by Python's safetensors package") {
  const std::string path = DELTAKV_TEST_DATA_DIR "/py_written.safetensors";
  const auto f = SafetensorsFile::open(path);
  CHECK(f.metadata() == std::map<std::string, std::string>{{"format", "pt"}});
  CHECK(f.names() == std::vector<std::string>{"a", "b", "d"});

  const TensorInfo& a = f.info("a");
  CHECK(a.dtype == StDType::F32);
  CHECK(a.shape == std::vector<std::int64_t>{3, 4});
  const auto av = f.read_as<float>("a");
  REQUIRE(av.size() == 12);
  for (int i = 0; i < 12; ++i) CHECK(av[i] == static_cast<float>(i) * 0.5f - 1.0f);

  const TensorInfo& b = f.info("b");
  CHECK(b.dtype == StDType::F16);
  CHECK(b.shape == std::vector<std::int64_t>{5});
  CHECK(f.read_as<double>("b") ==
        std::vector<double>{1.0, -2.5, 65504.0, std::ldexp(1.0, -24), 0.3330078125});

  const TensorInfo& d = f.info("d");
  CHECK(d.dtype == StDType::I32);
  CHECK(d.shape == std::vector<std::int64_t>{2});
  const auto raw = f.raw("d");
  REQUIRE(raw.size() == 8);
  std::int32_t dv[2];
  for (int i = 0; i < 2; ++i) {
    std::uint32_t u = 0;
    for (int k = 0; k < 4; ++k) u |= static_cast<std::uint32_t>(raw[4 * i + k]) << (8 * k);
    dv[i] = static_cast<std::int32_t>(u);
  }
  CHECK(dv[0] == 7);
  CHECK(dv[1] == -3);
  CHECK_THROWS_AS(f.read_as<float>("d"), DTypeError);

  const auto msg = thrown<FormatError>([&] { (void)f.info("c"); });
  CHECK(has(msg, "py_written.safetensors"));
}
