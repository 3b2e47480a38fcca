#include "dmremap/log.h"

#include <cstdio>

namespace dmremap {
namespace {
// Function-local, so a sink set during another file's static initialisation
// is not wiped out by this one's.
LogSink& sink() {
  static LogSink s;
  return s;
}
bool g_debug = false;
}  // namespace

void set_log_sink(LogSink s) { sink() = std::move(s); }
void set_log_debug(bool enabled) { g_debug = enabled; }

void log(LogLevel level, const std::string& message) {
  if (level == LogLevel::kDebug && !g_debug) return;
  if (sink()) {
    sink()(level, message);
    return;
  }
  static const char* const kNames[] = {"debug", "info", "warning", "error"};
  std::fprintf(stderr, "dmremap: %s: %s\n", kNames[static_cast<int>(level)], message.c_str());
}

}  // namespace dmremap
