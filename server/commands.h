// Transmission commands: what the handshake agreed, the flags advertised,
// each request's validation, and its execution on the engine. No socket and
// no threads: a lane calls answer() with a request in hand, and the fuzzer
// calls it directly.
#pragma once

#include <cstdint>
#include <string>

#include "export_info.h"
#include "protocol.h"
#include "replies.h"

namespace dmremap::server {

// What the handshake agreed with the client.
struct Negotiated {
  bool structured = false;
  bool no_zeroes = false;
  // Selected by the last SET_META_CONTEXT.
  bool allocation = false;  // base:allocation
  bool remapped = false;    // x-dmremap:remapped (or its old name)
  bool copied = false;      // x-dmremap:copied (sets that can be evacuated)
};

// NBD transmission flags for this export and client.
uint16_t transmission_flags(const ExportInfo& info, bool structured);

// Why a request is not run: an NBD error (0: it is run) and a reason.
struct Verdict {
  uint32_t error = 0;
  const char* why = "";
};

// Checks a request against the export and what was negotiated. The order of
// the checks follows nbdkit's, so that both frontends give the same answer to
// the same bad request: read-only, then command and range, then flags, then
// size.
Verdict validate(const nbd::Request& r, const Negotiated& n, const ExportInfo& info);

// The reply to a request that is not run (a Verdict, or ESHUTDOWN). With
// structured replies it is an ERROR chunk that carries the reason.
Reply refuse(const nbd::Request& r, const Verdict& v, const Negotiated& n);

// Runs a valid request on the engine and encodes its reply. Never throws.
Reply execute(const nbd::Request& r, Buffer& payload, const Negotiated& n,
              const ExportInfo& info);

}  // namespace dmremap::server
