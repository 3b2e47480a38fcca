// A latency histogram that request threads add to without a lock, for the
// Prometheus metrics (lib/metrics.h): fixed bucket bounds, from 100 µs (a
// cached read) to 30 s (a disk retrying a bad sector without TLER).
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>

namespace dmremap {

class LatencyHistogram {
 public:
  // Upper bounds in seconds; a last, unbounded bucket follows.
  static constexpr std::array<double, 16> kBounds = {
      0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
      0.05,   0.1,     0.25,   0.5,   1,      2.5,   10,    30};

  struct Snapshot {
    std::array<uint64_t, kBounds.size() + 1> buckets{};  // per bucket, not cumulative
    uint64_t count = 0;
    double sum_seconds = 0;
  };

  void record(std::chrono::nanoseconds d) {
    const double s = std::chrono::duration<double>(d).count();
    size_t i = 0;
    while (i < kBounds.size() && s > kBounds[i]) ++i;
    buckets_[i].fetch_add(1, std::memory_order_relaxed);
    sum_ns_.fetch_add(static_cast<uint64_t>(d.count() < 0 ? 0 : d.count()),
                      std::memory_order_relaxed);
  }
  // Each bucket is read on its own, so a scrape may see one request in a
  // bucket but not yet in the sum: close enough for rates.
  Snapshot snapshot() const {
    Snapshot s;
    for (size_t i = 0; i < buckets_.size(); ++i) {
      s.buckets[i] = buckets_[i].load(std::memory_order_relaxed);
      s.count += s.buckets[i];
    }
    s.sum_seconds = static_cast<double>(sum_ns_.load(std::memory_order_relaxed)) / 1e9;
    return s;
  }

 private:
  std::array<std::atomic<uint64_t>, kBounds.size() + 1> buckets_{};
  std::atomic<uint64_t> sum_ns_{0};
};

// Adds the time from its making to its end to a histogram.
class LatencyTimer {
 public:
  explicit LatencyTimer(LatencyHistogram& h) : h_(h), start_(std::chrono::steady_clock::now()) {}
  ~LatencyTimer() { h_.record(std::chrono::steady_clock::now() - start_); }
  LatencyTimer(const LatencyTimer&) = delete;
  LatencyTimer& operator=(const LatencyTimer&) = delete;

 private:
  LatencyHistogram& h_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace dmremap
