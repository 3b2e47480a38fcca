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

void log_to_stderr(std::string program, LogLevel least) {
  set_log_debug(least == LogLevel::kDebug);
  set_log_sink([program = std::move(program), least](LogLevel level, const std::string& line) {
    if (level < least) return;
    static const char* const kTag[] = {"debug: ", "", "warning: ", "error: "};
    std::fprintf(stderr, "%s: %s%s\n", program.c_str(), kTag[static_cast<int>(level)],
                 line.c_str());
  });
}

}  // namespace dmremap
