#pragma once
// Typed errors. Every failure the library can report is one of these; the code lets an engine
// branch without string matching, the subclass lets it catch one class only.
#include <stdexcept>
#include <string>

namespace deltakv {

enum class ErrorCode {
  shape,       // a view's shape or stride does not match what the call needs
  dtype,       // wrong element type (e.g. a checkpoint tensor in an unsupported dtype)
  non_finite,  // NaN or Inf in input values
  format,      // a file is truncated, corrupt or not in the expected layout
  capacity,    // the cache or a caller buffer is too small for the request
  order,       // positions not contiguous / out of order / out of range
  config,      // an invalid configuration or component combination
  io,          // the operating system failed to read or write a file
};

inline const char* to_string(ErrorCode c) noexcept {
  switch (c) {
    case ErrorCode::shape: return "shape";
    case ErrorCode::dtype: return "dtype";
    case ErrorCode::non_finite: return "non_finite";
    case ErrorCode::format: return "format";
    case ErrorCode::capacity: return "capacity";
    case ErrorCode::order: return "order";
    case ErrorCode::config: return "config";
    case ErrorCode::io: return "io";
  }
  return "unknown";
}

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& what)
      : std::runtime_error(std::string("deltakv ") + to_string(code) + " error: " + what), code_(code) {}
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

#define DELTAKV_DEFINE_ERROR(Name, code_)                                            \
  class Name : public Error {                                                        \
   public:                                                                           \
    explicit Name(const std::string& what) : Error(ErrorCode::code_, what) {}        \
  };
DELTAKV_DEFINE_ERROR(ShapeError, shape)
DELTAKV_DEFINE_ERROR(DTypeError, dtype)
DELTAKV_DEFINE_ERROR(NonFiniteError, non_finite)
DELTAKV_DEFINE_ERROR(FormatError, format)
DELTAKV_DEFINE_ERROR(CapacityError, capacity)
DELTAKV_DEFINE_ERROR(OrderError, order)
DELTAKV_DEFINE_ERROR(ConfigError, config)
DELTAKV_DEFINE_ERROR(IoError, io)
#undef DELTAKV_DEFINE_ERROR

}  // namespace deltakv
