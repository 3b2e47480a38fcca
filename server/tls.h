// TLS for dmremap-server, with GnuTLS: the library every NBD peer uses
// (nbdkit, libnbd, qemu, nbd-client), so PSK files are psktool's, X.509
// credentials sit in nbdkit's directory layout, and TLS 1.2 and 1.3 behave
// as the clients expect.
//
// A TlsSession runs over two transports in turn. During the handshake the
// session's Asio coroutine moves the ciphertext (feed() and take_output()),
// so the handshake timeout covers the TLS handshake too. For transmission
// the session's lanes use the connected socket's descriptor directly
// (attach()): one lane receives while another sends. GnuTLS does not allow
// that on its own: a TLS 1.3 KeyUpdate received (or an automatic rekey)
// switches the keys under the other thread, which would then encrypt two
// records with one nonce. So every GnuTLS call on the session holds one
// mutex. The receiver never waits under it (the descriptor is
// non-blocking); a sender does, for room in the socket, so that no call
// returns with a record half sent (see push_all()). While the client does
// not read, its requests are not read either.
#pragma once

#include <gnutls/gnutls.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace dmremap::server {

// --tls: off (STARTTLS is refused), on (TLS if the client asks), require
// (every option but STARTTLS and ABORT is refused until TLS is up).
enum class TlsMode { kOff, kOn, kRequire };

struct TlsConfig {
  TlsMode mode = TlsMode::kOff;
  // X.509: ca-cert.pem, server-cert.pem, server-key.pem, optional ca-crl.pem.
  std::string certificates;
  bool verify_peer = false;  // clients must show a certificate the CA issued
  std::string psk_file;      // psktool's "username:hexkey" lines; wins over certificates
  // GnuTLS priority string (--tls-priority): TLS 1.3 and 1.2, not older
  // (the NBD protocol: older versions SHOULD NOT be enabled by default).
  std::string priority = "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2";
};

// Where --tls=on|require looks for certificates when no directory is given:
// /etc/pki/dmremap for root, else $HOME/.pki/dmremap.
std::string default_certificates_dir();

// The server's credentials, loaded at start-up and shared by every session.
// Immutable after load(); thread-safe. (GnuTLS reads a PSK file again at
// each handshake: a key added to it serves the next client.)
class TlsCredentials {
 public:
  // Throws std::runtime_error naming the file and what is wrong with it.
  static std::unique_ptr<TlsCredentials> load(const TlsConfig& config);
  ~TlsCredentials();
  TlsCredentials(const TlsCredentials&) = delete;
  TlsCredentials& operator=(const TlsCredentials&) = delete;

  bool psk() const { return psk_ != nullptr; }
  bool verify_peer() const { return verify_peer_; }
  gnutls_priority_t priority() const { return priority_; }
  // One line for the start-up log: what clients must present.
  std::string describe() const;

 private:
  TlsCredentials() = default;
  friend class TlsSession;

  gnutls_certificate_credentials_t x509_ = nullptr;
  gnutls_psk_server_credentials_t psk_ = nullptr;
  gnutls_priority_t priority_ = nullptr;
  bool verify_peer_ = false;
  std::string source_;  // the directory or PSK file, for describe()
};

// One client's TLS session (server side).
class TlsSession {
 public:
  explicit TlsSession(const TlsCredentials& credentials);
  ~TlsSession();
  TlsSession(const TlsSession&) = delete;
  TlsSession& operator=(const TlsSession&) = delete;

  // --- Before attach(): ciphertext passes through memory.
  // Bytes received from the client.
  void feed(const char* data, size_t n);
  // Bytes to send to the client; empties the output.
  std::string take_output();
  enum class Step { kDone, kNeedInput, kFailed };
  // Advances the TLS handshake; kFailed sets `why`.
  Step handshake(std::string& why);
  // Plaintext: >0 bytes, 0 end of the stream, -EAGAIN (feed more), or
  // another negative errno. In memory or on the descriptor.
  ssize_t recv(char* out, size_t n);
  // Plaintext out, as records, under the session's lock; false when the
  // session has failed. Before attach() the ciphertext waits in the output.
  bool send(const char* data, size_t n);

  // --- Transmission: from now on the ciphertext goes through `fd` (left
  // non-blocking; sends wait in poll() for room). Input fed but not yet
  // decrypted is read first.
  void attach(int fd);
  // Sends every iovec, small ones gathered into full records; false when
  // the client is gone. One sender at a time.
  bool sendv(const iovec* iov, size_t count);
  // Says goodbye (close_notify) without waiting for a client that does not
  // read.
  void bye();

  // Bytes received but not yet returned by recv(): input fed and not
  // decrypted, and plaintext GnuTLS holds. The receiver's thread.
  size_t pending() const;

  // Why the last recv() failed (GnuTLS's words), for the log.
  std::string last_error() const;

  // "TLS1.3, ECDHE-PSK, AES-256-GCM, PSK user alice" and the like.
  std::string describe() const;

 private:
  static ssize_t pull(gnutls_transport_ptr_t self, void* data, size_t n);
  static ssize_t vec_push(gnutls_transport_ptr_t self, const giovec_t* iov, int count);
  static int pull_timeout(gnutls_transport_ptr_t self, unsigned ms);
  ssize_t push_all(const giovec_t* iov, int count);

  gnutls_session_t s_ = nullptr;
  const TlsCredentials& credentials_;
  mutable std::mutex mu_;  // every GnuTLS call on s_, and what follows
  std::vector<char> in_;   // ciphertext received, not yet taken by GnuTLS
  size_t in_pos_ = 0;
  std::string out_;        // ciphertext for the coroutine to send
  int fd_ = -1;
  bool closing_ = false;   // bye(): never wait for the client
  int last_error_ = 0;
  std::vector<char> gather_;  // the sender's small pieces, one record's worth
};

}  // namespace dmremap::server
