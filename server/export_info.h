// What every session of one dmremap-server shares: the export, its limits,
// and the list of live sessions that a shutdown drains.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dmremap/engine.h"
#include "dmremap/export.h"
#include "tls.h"

namespace dmremap {
class Evacuator;
}

namespace dmremap::server {

class SessionBase {
 public:
  virtual ~SessionBase() = default;
  // Stop taking requests: those in flight are answered, later ones get
  // ESHUTDOWN (options: NBD_REP_ERR_SHUTDOWN), then the session closes.
  // Thread-safe.
  virtual void drain() = 0;
  // Starts another lane if the session's lanes are all stuck, or sends
  // replies that wait behind a slow request. Thread-safe.
  virtual void watch(int64_t now_ns) = 0;
};

struct ExportInfo {
  Engine* engine = nullptr;
  // The set's evacuation (writable sets): x-dmremap:copied describes it.
  Evacuator* evacuator = nullptr;
  unsigned max_lanes = 32;  // threads per connection (--threads)
  std::string name;          // the export's name ("" is the default export)
  std::string description;
  bool read_only = false;  // no write, trim or zero is offered or served
  uint32_t accept_request = kAcceptedPayload;  // larger reads and writes are refused
  uint32_t max_reply_chunk = kMaxPayload;      // structured reads: data per chunk (advertised)
  uint64_t max_in_flight_bytes = 256 << 20;    // per session, then reading pauses
  std::chrono::milliseconds handshake_timeout{30000};
  // --tls: the mode, and the credentials when it is not off.
  TlsMode tls = TlsMode::kOff;
  const TlsCredentials* tls_credentials = nullptr;


  // Live sessions, so that a shutdown can drain them.
  void add(const std::shared_ptr<SessionBase>& s);
  void remove(const SessionBase* s);
  // Drains every session; from now on new sessions are drained at once.
  void drain_all();
  size_t live() const;
  // Runs watch() of every session; main calls it every few milliseconds.
  void watch_all();

 private:
  // The sessions still alive.
  std::vector<std::shared_ptr<SessionBase>> snapshot() const;

  mutable std::mutex mu_;
  std::vector<std::weak_ptr<SessionBase>> live_;
  bool draining_ = false;
};

int64_t now_ns();

}  // namespace dmremap::server
