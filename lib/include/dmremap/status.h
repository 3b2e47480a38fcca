// Error values that keep the errno and the context of a failure.
#pragma once

#include <cerrno>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace dmremap {

// The outcome of an operation: ok, or an errno with a message that says where
// it happened ("main: read at offset 8192"). Cheap to pass around when ok (one
// null pointer). Thread-compatible.
class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(const Status& other) { *this = other; }
  Status& operator=(const Status& other) {
    if (this != &other) rep_ = other.rep_ ? std::make_unique<Rep>(*other.rep_) : nullptr;
    return *this;
  }
  Status(Status&&) noexcept = default;
  Status& operator=(Status&&) noexcept = default;

  static Status ok() { return Status(); }
  // `err` must be a positive errno value.
  static Status error(int err, std::string message);
  // The errno of the current thread, as set by a failed system call.
  static Status from_errno(std::string message) { return error(errno, std::move(message)); }

  bool is_ok() const { return rep_ == nullptr; }
  // The errno; 0 when ok.
  int code() const { return rep_ ? rep_->code : 0; }
  const std::string& message() const;
  // For reads: the byte offset (in the request's address space) of the first
  // byte that could not be read, if known.
  std::optional<uint64_t> error_offset() const {
    return rep_ ? rep_->offset : std::nullopt;
  }
  Status with_offset(uint64_t offset) &&;
  // Prepends "prefix: " to the message.
  Status with_context(std::string_view prefix) &&;
  // "message: strerror(code)", or "ok".
  std::string to_string() const;

 private:
  struct Rep {
    int code;
    std::string message;
    std::optional<uint64_t> offset;
  };
  std::unique_ptr<Rep> rep_;
};

// A value or the Status that says why there is none.
template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : status_(std::move(status)) {}  // NOLINT: must be an error

  bool is_ok() const { return value_.has_value(); }
  const Status& status() const { return status_; }
  Status take_status() { return std::move(status_); }
  T& value() { return *value_; }
  const T& value() const { return *value_; }
  T* operator->() { return &*value_; }
  T& operator*() { return *value_; }

 private:
  std::optional<T> value_;
  Status status_;
};

}  // namespace dmremap
