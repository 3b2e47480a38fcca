// Unix sockets that dmremap listens on (dmremap-server's --unix, the
// control channel): making way for one without harming what is there, and
// connecting without hanging on a full backlog.
#pragma once

#include <chrono>
#include <string>
#include <sys/types.h>
#include <sys/un.h>

#include "dmremap/status.h"

namespace dmremap {

// The address of `path`; ENAMETOOLONG when it does not fit. `what` names
// the socket in messages ("control socket", "--unix").
Result<sockaddr_un> unix_address(const std::string& path, const std::string& what);

// A connected, blocking socket to `path`, or the connect's errno. A
// listener whose queue is full would make a blocking connect wait for ever;
// this one gives up at `deadline` with ETIMEDOUT.
Result<int> connect_unix(const std::string& path, std::chrono::steady_clock::time_point deadline,
                         const std::string& what);

// Makes way for a socket to be bound at `path`: ok when nothing is there,
// or a stale socket, which is removed (only a refused connection proves its
// owner gone). A file that is not a socket: EEXIST, kept; a socket where a
// server answers or is busy: EADDRINUSE.
Status make_way_for_socket(const std::string& path, const std::string& what);

// The identity of the socket file just bound at `path`, and its removal at
// exit only if `path` is still that file (another server may have taken
// the path over since).
struct SocketFile {
  std::string path;
  dev_t dev = 0;
  ino_t ino = 0;
  static SocketFile bound_at(const std::string& path);
  void remove() const;
};

}  // namespace dmremap
