#include "dmremap/unix_socket.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>

namespace dmremap {

Result<sockaddr_un> unix_address(const std::string& path, const std::string& what) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path) {
    return Status::error(ENAMETOOLONG, what + " " + path + ": a Unix socket path must be 1 to " +
                                           std::to_string(sizeof addr.sun_path - 1) + " bytes");
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

Result<int> connect_unix(const std::string& path, std::chrono::steady_clock::time_point deadline,
                         const std::string& what) {
  auto addr = unix_address(path, what);
  if (!addr.is_ok()) return addr.take_status();
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return Status::from_errno(what + " " + path);
  for (;;) {
    if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr.value()), sizeof(sockaddr_un)) ==
        0) {
      break;
    }
    const int err = errno;
    if ((err == EAGAIN || err == EINTR) && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    ::close(fd);
    return Status::error(err == EAGAIN ? ETIMEDOUT : err,
                         what + " " + path +
                             (err == EAGAIN ? ": the server accepts no connection" : ""));
  }
  const int flags = ::fcntl(fd, F_GETFL);
  (void)::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  return fd;
}

Status make_way_for_socket(const std::string& path, const std::string& what) {
  auto addr = unix_address(path, what);
  if (!addr.is_ok()) return addr.take_status();
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return Status::ok();
    return Status::from_errno(what + " " + path);
  }
  if (!S_ISSOCK(st.st_mode)) {
    return Status::error(EEXIST, what + " " + path +
                                     ": a file that is not a socket is in the way; it is kept "
                                     "(choose another path)");
  }
  // Only a refused connection proves the owner gone. A busy server
  // (ETIMEDOUT: its backlog is full) is alive.
  auto other = connect_unix(path, std::chrono::steady_clock::now() + std::chrono::seconds(1), what);
  if (other.is_ok() || other.status().code() == ETIMEDOUT) {
    if (other.is_ok()) ::close(other.value());
    return Status::error(EADDRINUSE, what + " " + path + ": another running server answers on it");
  }
  if (other.status().code() != ECONNREFUSED) return other.take_status();
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    return Status::from_errno(what + " " + path + ": removing the stale socket");
  }
  return Status::ok();
}

SocketFile SocketFile::bound_at(const std::string& path) {
  SocketFile f;
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) f = {path, st.st_dev, st.st_ino};
  return f;
}

void SocketFile::remove() const {
  if (path.empty()) return;
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode) && st.st_dev == dev &&
      st.st_ino == ino) {
    ::unlink(path.c_str());
  }
}

}  // namespace dmremap
