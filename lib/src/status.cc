#include "dmremap/status.h"

#include <cstring>

namespace dmremap {

Status Status::error(int err, std::string message) {
  Status s;
  s.rep_ = std::make_unique<Rep>(Rep{err > 0 ? err : EIO, std::move(message), std::nullopt});
  return s;
}

const std::string& Status::message() const {
  static const std::string kEmpty;
  return rep_ ? rep_->message : kEmpty;
}

Status Status::with_offset(uint64_t offset) && {
  if (rep_) rep_->offset = offset;
  return std::move(*this);
}

Status Status::with_context(std::string_view prefix) && {
  if (rep_) rep_->message = std::string(prefix) + ": " + rep_->message;
  return std::move(*this);
}

std::string Status::to_string() const {
  if (!rep_) return "ok";
  std::string out = rep_->message;
  if (!out.empty()) out += ": ";
  out += std::strerror(rep_->code);
  return out;
}

}  // namespace dmremap
