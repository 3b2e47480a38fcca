#include "tls.h"

#include <gnutls/x509.h>
#include <poll.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <utility>

namespace dmremap::server {

namespace {

// What the lanes' receiver asks the socket for at once (see pull()).
constexpr size_t kReadChunk = 64 * 1024;

std::string gnutls_why(int rc) { return gnutls_strerror(rc); }

bool readable(const std::string& path) { return ::access(path.c_str(), R_OK) == 0; }

// Whether anything is at `path`, readable or not: an optional file that
// exists but cannot be read (a CRL) is an error, never skipped.
bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 || errno != ENOENT;
}

void need_file(const std::string& path, const char* what) {
  if (!readable(path)) {
    throw std::runtime_error("TLS: cannot read " + std::string(what) + " " + path + ": " +
                             std::strerror(errno));
  }
}

// psktool writes "username:hexkey" lines; GnuTLS reads the file at each
// handshake, so a file it cannot use is found here rather than by the first
// client.
void check_psk_file(const std::string& path) {
  need_file(path, "the PSK file");
  std::ifstream in(path);
  std::string line;
  unsigned good = 0, number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (line.empty()) continue;
    const size_t colon = line.find(':');
    const std::string key = colon == std::string::npos ? "" : line.substr(colon + 1);
    const bool hex = !key.empty() && key.size() % 2 == 0 &&
                     std::all_of(key.begin(), key.end(), [](unsigned char c) {
                       return std::isxdigit(c) != 0;
                     });
    if (colon == 0 || !hex) {
      throw std::runtime_error("TLS: " + path + " line " + std::to_string(number) +
                               " is not 'username:hexkey' (make the file with psktool)");
    }
    ++good;
  }
  if (good == 0) {
    throw std::runtime_error("TLS: " + path + " holds no key (make it with psktool -u NAME -p " +
                             path + ")");
  }
}

}  // namespace

std::string default_certificates_dir() {
  if (::geteuid() == 0) return "/etc/pki/dmremap";
  const char* home = std::getenv("HOME");
  return std::string(home ? home : "") + "/.pki/dmremap";
}

std::unique_ptr<TlsCredentials> TlsCredentials::load(const TlsConfig& config) {
  std::unique_ptr<TlsCredentials> c(new TlsCredentials);
  c->verify_peer_ = config.verify_peer;
  std::string priority = config.priority;
  int rc;
  if (!config.psk_file.empty()) {
    check_psk_file(config.psk_file);
    rc = gnutls_psk_allocate_server_credentials(&c->psk_);
    if (rc < 0) throw std::runtime_error("TLS: " + gnutls_why(rc));
    rc = gnutls_psk_set_server_credentials_file(c->psk_, config.psk_file.c_str());
    if (rc < 0) throw std::runtime_error("TLS: " + config.psk_file + ": " + gnutls_why(rc));
    // TLS 1.2 negotiates PSK only when the priority names its key exchanges.
    (void)gnutls_psk_set_server_known_dh_params(c->psk_, GNUTLS_SEC_PARAM_MEDIUM);
    priority += ":+ECDHE-PSK:+DHE-PSK:+PSK";
    c->source_ = "PSK file " + config.psk_file;
  } else {
    const std::string dir =
        config.certificates.empty() ? default_certificates_dir() : config.certificates;
    const std::string ca = dir + "/ca-cert.pem", cert = dir + "/server-cert.pem",
                      key = dir + "/server-key.pem", crl = dir + "/ca-crl.pem";
    need_file(cert, "the server's certificate");
    need_file(key, "the server's key");
    rc = gnutls_certificate_allocate_credentials(&c->x509_);
    if (rc < 0) throw std::runtime_error("TLS: " + gnutls_why(rc));
    rc = gnutls_certificate_set_x509_key_file(c->x509_, cert.c_str(), key.c_str(),
                                              GNUTLS_X509_FMT_PEM);
    if (rc < 0) {
      throw std::runtime_error("TLS: " + cert + " with " + key + ": " + gnutls_why(rc));
    }
    // The CA checks clients' certificates (--tls-verify-peer): needed then.
    if (config.verify_peer || exists(ca)) {
      need_file(ca, "the CA certificate");
      rc = gnutls_certificate_set_x509_trust_file(c->x509_, ca.c_str(), GNUTLS_X509_FMT_PEM);
      if (rc <= 0) {
        throw std::runtime_error("TLS: " + ca + ": " +
                                 (rc == 0 ? std::string("no certificate in it") : gnutls_why(rc)));
      }
    }
    if (exists(crl)) {
      need_file(crl, "the certificate revocation list");
      rc = gnutls_certificate_set_x509_crl_file(c->x509_, crl.c_str(), GNUTLS_X509_FMT_PEM);
      if (rc < 0) throw std::runtime_error("TLS: " + crl + ": " + gnutls_why(rc));
    }
    (void)gnutls_certificate_set_known_dh_params(c->x509_, GNUTLS_SEC_PARAM_MEDIUM);
    c->source_ = "X.509 certificates in " + dir;
  }
  const char* bad = nullptr;
  rc = gnutls_priority_init(&c->priority_, priority.c_str(), &bad);
  if (rc < 0) {
    throw std::runtime_error("TLS: --tls-priority '" + config.priority + "': " + gnutls_why(rc) +
                             (bad ? std::string(" at '") + bad + "'" : std::string()));
  }
  return c;
}

TlsCredentials::~TlsCredentials() {
  if (priority_) gnutls_priority_deinit(priority_);
  if (x509_) gnutls_certificate_free_credentials(x509_);
  if (psk_) gnutls_psk_free_server_credentials(psk_);
}

std::string TlsCredentials::describe() const {
  return source_ + (verify_peer_ ? ", client certificates checked against the CA" : "");
}

TlsSession::TlsSession(const TlsCredentials& credentials) : credentials_(credentials) {
  int rc = gnutls_init(&s_, GNUTLS_SERVER | GNUTLS_NONBLOCK);
  if (rc < 0) throw std::runtime_error("TLS: " + gnutls_why(rc));
  rc = gnutls_priority_set(s_, credentials.priority_);
  if (rc >= 0) {
    rc = credentials.psk_ ? gnutls_credentials_set(s_, GNUTLS_CRD_PSK, credentials.psk_)
                          : gnutls_credentials_set(s_, GNUTLS_CRD_CERTIFICATE, credentials.x509_);
  }
  if (rc < 0) {
    gnutls_deinit(s_);
    throw std::runtime_error("TLS: " + gnutls_why(rc));
  }
  if (credentials.x509_ && credentials.verify_peer_) {
    // The handshake itself fails on a certificate the CA did not issue.
    gnutls_certificate_server_set_request(s_, GNUTLS_CERT_REQUIRE);
    gnutls_session_set_verify_cert(s_, nullptr, 0);
  }
  // The session's own deadline (--handshake-timeout) bounds the handshake.
  gnutls_handshake_set_timeout(s_, 0);
  gnutls_transport_set_ptr(s_, this);
  gnutls_transport_set_pull_function(s_, &TlsSession::pull);
  gnutls_transport_set_pull_timeout_function(s_, &TlsSession::pull_timeout);
  gnutls_transport_set_vec_push_function(s_, &TlsSession::vec_push);
}

TlsSession::~TlsSession() { gnutls_deinit(s_); }

void TlsSession::feed(const char* data, size_t n) {
  if (in_pos_ == in_.size()) {
    in_.clear();
    in_pos_ = 0;
  }
  in_.insert(in_.end(), data, data + n);
}

std::string TlsSession::take_output() { return std::exchange(out_, {}); }

ssize_t TlsSession::pull(gnutls_transport_ptr_t p, void* data, size_t n) {
  auto* self = static_cast<TlsSession*>(p);
  if (self->in_pos_ < self->in_.size()) {
    const size_t take = std::min(n, self->in_.size() - self->in_pos_);
    std::memcpy(data, self->in_.data() + self->in_pos_, take);
    self->in_pos_ += take;
    return static_cast<ssize_t>(take);
  }
  if (self->fd_ < 0) {
    gnutls_transport_set_errno(self->s_, EAGAIN);
    return -1;
  }
  // GnuTLS asks for a record's header, then its body: one receive of all
  // that has arrived serves many records.
  if (n < kReadChunk) {
    self->in_.resize(kReadChunk);
    const ssize_t got = ::recv(self->fd_, self->in_.data(), kReadChunk, MSG_DONTWAIT);
    if (got <= 0) {
      self->in_.clear();
      self->in_pos_ = 0;
      if (got < 0) gnutls_transport_set_errno(self->s_, errno);
      return got;
    }
    self->in_.resize(static_cast<size_t>(got));
    self->in_pos_ = 0;
    return pull(p, data, n);
  }
  const ssize_t got = ::recv(self->fd_, data, n, MSG_DONTWAIT);
  if (got < 0) gnutls_transport_set_errno(self->s_, errno);
  return got;
}

int TlsSession::pull_timeout(gnutls_transport_ptr_t p, unsigned ms) {
  auto* self = static_cast<TlsSession*>(p);
  if (self->in_pos_ < self->in_.size()) return 1;
  if (self->fd_ < 0) return 0;
  pollfd in{self->fd_, POLLIN, 0};
  const int timeout = ms == GNUTLS_INDEFINITE_TIMEOUT ? -1 : static_cast<int>(ms);
  return ::poll(&in, 1, timeout);
}

ssize_t TlsSession::vec_push(gnutls_transport_ptr_t p, const giovec_t* iov, int count) {
  auto* self = static_cast<TlsSession*>(p);
  if (self->fd_ < 0) {
    size_t total = 0;
    for (int i = 0; i < count; ++i) {
      self->out_.append(static_cast<const char*>(iov[i].iov_base), iov[i].iov_len);
      total += iov[i].iov_len;
    }
    return static_cast<ssize_t>(total);
  }
  return self->push_all(iov, count);
}

// Sends the whole vector, waiting in poll() for room: a GnuTLS call never
// returns with a record half sent. (GnuTLS would take the next call for a
// retry of the record it holds, and a KeyUpdate the receiver met in
// between would then send that record's data twice.) Under mu_; after
// bye(), never waits.
ssize_t TlsSession::push_all(const giovec_t* iov, int count) {
  std::vector<iovec> v(reinterpret_cast<const iovec*>(iov),
                       reinterpret_cast<const iovec*>(iov) + count);
  size_t total = 0;
  for (const auto& e : v) total += e.iov_len;
  size_t first = 0;
  while (first < v.size()) {
    msghdr msg{};
    msg.msg_iov = v.data() + first;
    msg.msg_iovlen = v.size() - first;
    const ssize_t sent = ::sendmsg(fd_, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (sent < 0) {
      if (errno == EINTR) continue;
      if ((errno == EAGAIN || errno == EWOULDBLOCK) && !closing_) {
        pollfd out{fd_, POLLOUT, 0};
        if (::poll(&out, 1, -1) >= 0 || errno == EINTR) continue;
      }
      gnutls_transport_set_errno(s_, errno);
      return -1;
    }
    size_t left = static_cast<size_t>(sent);
    while (first < v.size() && left >= v[first].iov_len) left -= v[first++].iov_len;
    if (first < v.size()) {
      v[first].iov_base = static_cast<char*>(v[first].iov_base) + left;
      v[first].iov_len -= left;
    }
  }
  return static_cast<ssize_t>(total);
}

TlsSession::Step TlsSession::handshake(std::string& why) {
  const int rc = gnutls_handshake(s_);
  if (rc == GNUTLS_E_SUCCESS) return Step::kDone;
  if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED) return Step::kNeedInput;
  if (gnutls_error_is_fatal(rc) == 0) return Step::kNeedInput;  // a warning alert
  why = gnutls_why(rc);
  // The client learns why (bad_certificate, decrypt_error...) from a fatal
  // alert, which TLS 1.2 requires before the close.
  (void)gnutls_alert_send_appropriate(s_, rc);
  if (rc == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
    gnutls_datum_t text{};
    if (gnutls_certificate_verification_status_print(gnutls_session_get_verify_cert_status(s_),
                                                     GNUTLS_CRT_X509, &text, 0) == 0) {
      why += std::string(" (") + reinterpret_cast<const char*>(text.data) + ")";
      gnutls_free(text.data);
    }
  }
  return Step::kFailed;
}

ssize_t TlsSession::recv(char* out, size_t n) {
  std::lock_guard lock(mu_);
  while (true) {
    const ssize_t got = gnutls_record_recv(s_, out, n);
    if (got >= 0) return got;
    switch (got) {
      case GNUTLS_E_INTERRUPTED:
        continue;
      case GNUTLS_E_AGAIN:
        return -EAGAIN;
      case GNUTLS_E_PREMATURE_TERMINATION:
        return 0;  // the client closed without close_notify: still its end
      default:
        if (gnutls_error_is_fatal(static_cast<int>(got)) == 0) continue;  // warning alerts
        last_error_ = static_cast<int>(got);
        return -EPROTO;
    }
  }
}

std::string TlsSession::last_error() const {
  std::lock_guard lock(mu_);
  return last_error_ ? gnutls_why(last_error_) : "no error";
}

bool TlsSession::send(const char* data, size_t n) {
  std::lock_guard lock(mu_);
  while (n > 0) {
    const ssize_t sent = gnutls_record_send(s_, data, n);
    if (sent == GNUTLS_E_INTERRUPTED) continue;
    if (sent < 0) return false;  // the push waits for room: never AGAIN here
    data += sent;
    n -= static_cast<size_t>(sent);
  }
  return true;
}

void TlsSession::attach(int fd) { fd_ = fd; }

bool TlsSession::sendv(const iovec* iov, size_t count) {
  // Small pieces (headers, short replies) are gathered into records of up
  // to 16 KiB, so many replies take a few records; bigger ones are
  // encrypted straight from their buffers. (Not gnutls_record_cork: it
  // copies every byte, and drops a KeyUpdate that is due.)
  constexpr size_t kRecord = 16 * 1024;
  gather_.clear();
  auto flush = [&] {
    const bool ok = send(gather_.data(), gather_.size());
    gather_.clear();
    return ok;
  };
  for (size_t i = 0; i < count; ++i) {
    const auto* data = static_cast<const char*>(iov[i].iov_base);
    const size_t len = iov[i].iov_len;
    if (len >= kRecord) {
      if (!flush() || !send(data, len)) return false;
      continue;
    }
    if (gather_.size() + len > kRecord && !flush()) return false;
    gather_.insert(gather_.end(), data, data + len);
  }
  return flush();
}

void TlsSession::bye() {
  std::lock_guard lock(mu_);
  closing_ = true;
  (void)gnutls_bye(s_, GNUTLS_SHUT_WR);  // the push never waits
}

size_t TlsSession::pending() const {
  std::lock_guard lock(mu_);
  return gnutls_record_check_pending(s_) + (in_.size() - in_pos_);
}

std::string TlsSession::describe() const {
  // GnuTLS's own summary: "(TLS1.3-PSK)-(ECDHE-SECP256R1)-(AES-256-GCM)".
  char* desc = gnutls_session_get_desc(s_);
  std::string s = desc ? desc : "?";
  gnutls_free(desc);
  if (credentials_.psk()) {
    const char* user = gnutls_psk_server_get_username(s_);
    s += std::string(", PSK user ") + (user ? user : "?");
  } else if (credentials_.verify_peer()) {
    s += ", client certificate verified";
  }
  return s;
}

}  // namespace dmremap::server
