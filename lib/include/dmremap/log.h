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

// The sink of a command-line program: "PROGRAM: warning: LINE" on stderr,
// dropping lines below `least` (debug lines are enabled when `least` is
// kDebug). Both dmremap and dmremap-server use it; their -v sets kDebug.
void log_to_stderr(std::string program, LogLevel least);

}  // namespace dmremap
