// Where the library's log lines go. Frontends point this at their own logger
// (nbdkit_error, the server's stderr); the default writes to stderr.
#pragma once

#include <functional>
#include <string>

namespace dmremap {

enum class LogLevel { kDebug, kInfo, kWarning, kError };
using LogSink = std::function<void(LogLevel, const std::string&)>;

// Replaces the sink; pass nullptr for the default. Not thread-safe against
// concurrent log() calls: set it once at start-up.
void set_log_sink(LogSink sink);
// Debug lines are dropped unless enabled.
void set_log_debug(bool enabled);
void log(LogLevel level, const std::string& message);

}  // namespace dmremap
