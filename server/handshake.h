// The fixed-newstyle handshake: option haggling, from the greeting to
// NBD_OPT_GO (or EXPORT_NAME). Sans I/O: the session reads each option off
// its socket and writes back what option() appends, so the handshake is read,
// tested and fuzzed on its own.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "commands.h"
#include "export_info.h"

namespace dmremap::server {

class Handshake {
 public:
  // Option data up to this size is read and answered; a bigger option is
  // skipped and answered NBD_REP_ERR_TOO_BIG.
  static constexpr uint32_t kMaxOptionBytes = 64 * 1024;

  enum class Outcome {
    kMore,      // read the next option
    kTransmit,  // the handshake is over: transmission starts
    kEnd,       // close the connection (ABORT, or nothing else is possible)
    kStartTls,  // STARTTLS was acknowledged: the TLS handshake comes next
  };

  explicit Handshake(const ExportInfo& info) : info_(info) {}

  // The server's first 18 bytes.
  static std::string greeting();
  // The client's 4 flag bytes; false: a client this server cannot serve.
  bool client_flags(uint32_t flags);
  // One option, its data read whole; the replies are appended to `out`.
  Outcome option(uint32_t option, std::string_view data, std::string& out);
  // One option longer than kMaxOptionBytes, whose data the caller skips.
  Outcome oversized(uint32_t option, uint32_t length, std::string& out);
  // The server is shutting down: every later option but ABORT gets
  // NBD_REP_ERR_SHUTDOWN, so the client knows to go.
  void shut_down() { shutting_down_ = true; }
  // TLS is up (after kStartTls): options are served, and nothing
  // negotiated before it holds.
  bool tls_active() const { return tls_active_; }

  const Negotiated& negotiated() const { return n_; }

 private:
  Outcome info_or_go(uint32_t option, std::string_view data, std::string& out);
  void meta_context(uint32_t option, std::string_view data, std::string& out);
  // True when `name` is this export ("" always is); logs a refusal.
  bool known_export(std::string_view name) const;
  // FORCEDTLS (--tls=require) before STARTTLS: every option but STARTTLS
  // and ABORT is refused. True when `option` was refused (or, for
  // EXPORT_NAME, `end` is set: it cannot be refused).
  bool tls_required(uint32_t option, std::string& out, bool& end) const;
  Outcome start_tls(std::string_view data, std::string& out);

  const ExportInfo& info_;
  Negotiated n_;
  bool shutting_down_ = false;
  bool tls_active_ = false;
};

}  // namespace dmremap::server
