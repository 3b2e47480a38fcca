#include "export_info.h"

#include <algorithm>

namespace dmremap::server {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void ExportInfo::add(const std::shared_ptr<SessionBase>& s) {
  bool drain_now = false;
  {
    std::lock_guard lock(mu_);
    std::erase_if(live_, [](const auto& w) { return w.expired(); });
    live_.push_back(s);
    drain_now = draining_;
  }
  if (drain_now) s->drain();
}

void ExportInfo::remove(const SessionBase* s) {
  std::lock_guard lock(mu_);
  std::erase_if(live_, [s](const auto& w) {
    auto p = w.lock();
    return !p || p.get() == s;
  });
}

std::vector<std::shared_ptr<SessionBase>> ExportInfo::snapshot() const {
  std::vector<std::shared_ptr<SessionBase>> sessions;
  std::lock_guard lock(mu_);
  for (const auto& w : live_) {
    if (auto p = w.lock()) sessions.push_back(std::move(p));
  }
  return sessions;
}

void ExportInfo::drain_all() {
  {
    std::lock_guard lock(mu_);
    draining_ = true;  // sessions added from now on drain at once
  }
  for (auto& s : snapshot()) s->drain();
}

void ExportInfo::watch_all() {
  const int64_t now = now_ns();
  for (auto& s : snapshot()) s->watch(now);
}

size_t ExportInfo::live() const {
  std::lock_guard lock(mu_);
  return static_cast<size_t>(std::count_if(live_.begin(), live_.end(),
                                           [](const auto& w) { return !w.expired(); }));
}

}  // namespace dmremap::server
