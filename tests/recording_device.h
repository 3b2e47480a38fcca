// A pass-through device that records every call, for tests that count or
// order I/O.
#pragma once

#include <mutex>
#include <string>
#include <vector>

#include "dmremap/block_device.h"

namespace dmremap::test {

class RecordingDevice final : public BlockDevice {
 public:
  struct Op {
    char kind;  // 'R', 'W', 'F', 'T', 'Z'
    uint64_t offset;
    uint64_t len;
  };
  explicit RecordingDevice(std::shared_ptr<BlockDevice> inner)
      : BlockDevice(inner->name()), inner_(std::move(inner)) {}
  uint64_t size() const override { return inner_->size(); }
  bool can_trim() const override { return inner_->can_trim(); }
  // As an NBD export when false: nothing locks it against a second opener.
  bool locked() const override { return locked_; }
  void set_locked(bool locked) { locked_ = locked; }

  std::vector<Op> ops() const {
    std::lock_guard l(mu_);
    return ops_;
  }
  void clear() {
    std::lock_guard l(mu_);
    ops_.clear();
  }
  // Calls of `kind` that touched [offset, offset+len).
  size_t count(char kind, uint64_t offset = 0, uint64_t len = ~uint64_t{0} / 2) const {
    std::lock_guard l(mu_);
    size_t n = 0;
    for (const Op& op : ops_) {
      if (op.kind == kind && op.offset < offset + len && offset < op.offset + op.len) ++n;
    }
    return n;
  }

 protected:
  Status do_read(void* b, size_t n, uint64_t o) override { return note('R', o, n, inner_->read(b, n, o)); }
  Status do_write(const void* b, size_t n, uint64_t o) override {
    return note('W', o, n, inner_->write(b, n, o));
  }
  Status do_flush() override { return note('F', 0, 0, inner_->flush()); }
  Status do_trim(size_t n, uint64_t o) override { return note('T', o, n, inner_->trim(n, o)); }
  Status do_write_zeroes(size_t n, uint64_t o) override {
    return note('Z', o, n, inner_->write_zeroes(n, o));
  }

 private:
  Status note(char kind, uint64_t o, uint64_t n, Status s) {
    std::lock_guard l(mu_);
    ops_.push_back(Op{kind, o, n});
    return s;
  }
  std::shared_ptr<BlockDevice> inner_;
  mutable std::mutex mu_;
  std::vector<Op> ops_;
  bool locked_ = true;
};

}  // namespace dmremap::test
