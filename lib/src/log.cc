#include "dmremap/log.h"

#include <cstdio>

namespace dmremap {
namespace {
LogSink g_sink;
bool g_debug = false;
}  // namespace

void set_log_sink(LogSink sink) { g_sink = std::move(sink); }
void set_log_debug(bool enabled) { g_debug = enabled; }

void log(LogLevel level, const std::string& message) {
  if (level == LogLevel::kDebug && !g_debug) return;
  if (g_sink) {
    g_sink(level, message);
    return;
  }
  static const char* const kNames[] = {"debug", "info", "warning", "error"};
  std::fprintf(stderr, "dmremap: %s: %s\n", kNames[static_cast<int>(level)], message.c_str());
}

}  // namespace dmremap
