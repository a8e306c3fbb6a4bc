#pragma once
// Test helpers for files and bytes, shared by the I/O, checkpoint and thread tests: read a file
// whole, unique temporary directories, typed-exception capture. Light on purpose (no Eigen, no
// cache): tests of the readers include only this. support.hpp includes it too.
#include <doctest/doctest.h>

#include <cstddef>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <system_error>
#include <vector>

namespace dkt {

#ifdef DELTAKV_TEST_DATA_DIR
// tests/data/<name> (the build compiles the directory in as DELTAKV_TEST_DATA_DIR; a test program
// without it simply has no data_path).
inline std::string data_path(const std::string& name) { return std::string(DELTAKV_TEST_DATA_DIR) + "/" + name; }
#endif

// The whole file as bytes; fails the test (REQUIRE) if it cannot be read.
inline std::vector<std::byte> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE_MESSAGE(in.good(), "cannot read " << path);
  const std::vector<char> c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> out(c.size());
  if (!c.empty()) std::memcpy(out.data(), c.data(), c.size());
  return out;
}

inline void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  REQUIRE_MESSAGE(out.good(), "cannot write " << path);
}

// A fresh, uniquely named directory under the system temp dir, removed (best effort) at scope
// exit. Unique names keep concurrent test processes (ctest -j, other builds on the machine) apart.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& tag = "test") {
    std::random_device rd;
    path = std::filesystem::temp_directory_path() /
           ("deltakv_" + tag + "_" + std::to_string(rd()) + "_" + std::to_string(rd()));
    std::filesystem::create_directories(path);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

// Runs f, requires it to throw E (or a class derived from it), and returns what() for inspection.
template <class E, class F>
std::string thrown(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    FAIL("wrong exception type: " << e.what());
    return {};
  }
  FAIL("no exception thrown");
  return {};
}

inline bool contains(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }

}  // namespace dkt
