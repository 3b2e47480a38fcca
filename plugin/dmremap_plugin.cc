// dmremap.so: the nbdkit plugin. A thin adapter from nbdkit's callbacks to
// dmremap::Engine; all remapping lives in lib/.
//
//   nbdkit ./dmremap.so main=DISK spare=SPARE
//
// API version 2 must be defined before the header: without it nbdkit
// silently uses version 1, whose callbacks take no flags (no native FUA).
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "dmremap/control.h"
#include "dmremap/evacuate.h"
#include "dmremap/engine.h"
#include "dmremap/export.h"
#include "dmremap/health_log.h"
#include "dmremap/scan.h"
#include "dmremap/open_set.h"
#include "dmremap/log.h"

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

namespace {

dmremap::SetConfig g_config;
std::unique_ptr<dmremap::Engine> g_engine;
// Health changes and a periodic summary in nbdkit's log (log-interval=).
std::chrono::milliseconds g_log_interval{3600 * 1000};
std::unique_ptr<dmremap::HealthLog> g_health;
// The surface scan (writable sets): a saved running scan goes on at start.
std::unique_ptr<dmremap::Scanner> g_scanner;
std::unique_ptr<dmremap::Evacuator> g_evacuator;
std::string g_control_path;
// Not a unique_ptr: in background mode nbdkit's parent process exits
// through exit() after the fork, and a static destructor there would
// remove the socket the child serves. .cleanup (in the child) drops it.
dmremap::ControlServer* g_control = nullptr;
void drop_control() {
  delete g_control;
  g_control = nullptr;
}

using dmremap::RequestKind;

// Every callback runs through here: no exception may cross into nbdkit, and
// every error reaches the client with the errno lib's one table chooses
// (dmremap::client_errno), the same as dmremap-server's.
template <class F>
int guarded(const char* what, RequestKind kind, F&& body) {
  try {
    const dmremap::Status s = body();
    if (s.is_ok()) return 0;
    nbdkit_error("%s: %s", what, s.to_string().c_str());
    nbdkit_set_error(dmremap::client_errno(s.code(), kind));
  } catch (const std::bad_alloc&) {
    nbdkit_error("%s: out of memory", what);
    nbdkit_set_error(EIO);
  } catch (const std::exception& e) {
    nbdkit_error("%s: %s", what, e.what());
    nbdkit_set_error(EIO);
  } catch (...) {
    nbdkit_error("%s: unexpected failure", what);
    nbdkit_set_error(EIO);
  }
  return -1;
}

bool parse_bool(const char* key, const char* value, bool& out) {
  const int r = nbdkit_parse_bool(value);
  if (r == -1) return false;
  out = r == 1;
  (void)key;
  return true;
}

int dmremap_config_unguarded(const char* key, const char* value) {
  const std::string k = key;
  if (k == "main" || k == "spare") {
    // Paths become absolute: nbdkit may change directory when it forks.
    std::string v = value;
    if (!dmremap::is_nbd_uri(v)) {
      char* abs = nbdkit_absolute_path(value);
      if (!abs) return -1;
      v = abs;
      std::free(abs);
    }
    (k == "main" ? g_config.main : g_config.spare) = v;
  } else if (k == "readonly") {
    if (!parse_bool(key, value, g_config.read_only)) return -1;
  } else if (k == "io") {
    if (!dmremap::parse_io_mode(value, g_config.io)) {
      nbdkit_error("io=%s: use io=auto (default), io=direct or io=buffered", value);
      return -1;
    }
  } else if (k == "direct") {
    bool direct = false;
    if (!parse_bool(key, value, direct)) return -1;
    g_config.io = direct ? dmremap::IoMode::kDirect : dmremap::IoMode::kBuffered;
  } else if (k == "retries") {
    unsigned n = 0;
    if (nbdkit_parse_unsigned(key, value, &n) == -1) return -1;
    g_config.engine.read_retries = n;
  } else if (k == "retry-time" || k == "io-timeout" || k == "log-interval" || k == "slow") {
    char* end = nullptr;
    const double secs = std::strtod(value, &end);
    if (end == value || *end != '\0' || !(secs >= 0) || secs > 86400) {
      nbdkit_error("%s=%s: seconds, from 0 to 86400 (decimals allowed)", key, value);
      return -1;
    }
    const auto ms = std::chrono::milliseconds(static_cast<int64_t>(secs * 1000));
    (k == "retry-time"   ? g_config.engine.retry_time
     : k == "io-timeout" ? g_config.io_timeout
     : k == "slow"       ? g_config.engine.slow_read
                         : g_log_interval) = ms;
  } else if (k == "warn") {
    unsigned n = 0;
    if (nbdkit_parse_unsigned(key, value, &n) == -1 || n > 100) {
      nbdkit_error("warn: a percentage from 0 to 100");
      return -1;
    }
    g_config.engine.warn_percent = n;
  } else if (k == "unreadable") {
    const std::string v = value;
    if (v != "error" && v != "zero") {
      nbdkit_error("unreadable=%s: use unreadable=error (default) or unreadable=zero", value);
      return -1;
    }
    g_config.engine.unreadable_zero = v == "zero";
  } else if (k == "control") {
    if (!g_control_path.empty()) {
      nbdkit_error("control= is given twice");
      return -1;
    }
    char* abs = nbdkit_absolute_path(value);
    if (!abs) return -1;
    g_control_path = abs;
    std::free(abs);
  } else if (k == "inject") {
    g_config.inject = value;
  } else if (k == "inject-spare") {
    g_config.inject_spare = value;
  } else {
    nbdkit_error("unknown parameter '%s' (see: nbdkit dmremap --help)", key);
    return -1;
  }
  return 0;
}

// No exception (bad_alloc) may reach nbdkit.
int dmremap_config(const char* key, const char* value) {
  try {
    return dmremap_config_unguarded(key, value);
  } catch (const std::exception& e) {
    nbdkit_error("%s: %s", key, e.what());
    return -1;
  }
}

int dmremap_config_complete() {
  if (g_config.main.empty() || g_config.spare.empty()) {
    nbdkit_error("both main=DISK and spare=SPARE are required (see: nbdkit dmremap --help)");
    return -1;
  }
  return 0;
}

// Every line goes through nbdkit, which writes it to stderr in the
// foreground and to syslog in the background (where stderr is gone).
// nbdkit has no warning or info level: those lines go out as errors, with
// their own level word, and debug lines only with -v.
void route_logs() {
  dmremap::set_log_sink([](dmremap::LogLevel level, const std::string& msg) {
    switch (level) {
      case dmremap::LogLevel::kError: nbdkit_error("%s", msg.c_str()); break;
      case dmremap::LogLevel::kWarning: nbdkit_error("warning: %s", msg.c_str()); break;
      case dmremap::LogLevel::kInfo: nbdkit_error("info: %s", msg.c_str()); break;
      case dmremap::LogLevel::kDebug: nbdkit_debug("%s", msg.c_str()); break;
    }
  });
}

dmremap::Status open_engine() {
  auto engine = dmremap::open_set(g_config);
  if (!engine.is_ok()) return engine.take_status();
  g_engine = std::move(engine.value());
  return dmremap::Status::ok();
}

// A connection made by libnbd (an NBD URI backend) does not survive the fork
// into the background, so such a set is opened after it (.after_fork).
// Local devices are opened before, so that a bad configuration stops
// start-up with one line on the terminal, not in syslog.
bool opens_after_fork() {
  return dmremap::is_nbd_uri(g_config.main) || dmremap::is_nbd_uri(g_config.spare);
}

// The control socket is created before the fork, so a bad path stops
// start-up on the terminal (the listening socket survives the fork); its
// thread must run in the process that serves, so it starts after.
int dmremap_get_ready() {
  route_logs();
  const int r = guarded("dmremap", RequestKind::kOther, [] {
    if (!opens_after_fork()) {
      if (dmremap::Status s = open_engine(); !s.is_ok()) return s;
    }
    if (g_control_path.empty()) return dmremap::Status::ok();
    auto server = dmremap::ControlServer::listen(g_control_path);
    if (!server.is_ok()) return server.take_status();
    g_control = server.value().release();
    return dmremap::Status::ok();
  });
  // nbdkit exits without .cleanup when this fails: leave the set clean.
  if (r != 0 && g_engine) {
    (void)g_engine->close();
    g_engine.reset();
  }
  return r;
}

int dmremap_after_fork() {
  const int r = guarded("dmremap", RequestKind::kOther, [] {
    if (opens_after_fork()) {
      dmremap::Status s = open_engine();
      if (!s.is_ok()) return s;
    }
    // In the process that serves (the thread would not survive the fork).
    g_health = std::make_unique<dmremap::HealthLog>(*g_engine, g_log_interval);
    if (!g_config.read_only) {
      g_scanner = std::make_unique<dmremap::Scanner>(*g_engine);
      g_evacuator = dmremap::make_evacuator(*g_engine, g_config);
    }
    if (!g_control) return dmremap::Status::ok();
    dmremap::Status served = g_control->serve(
        dmremap::engine_commands(*g_engine, g_scanner.get(), g_evacuator.get()));
    if (served.is_ok()) dmremap::advertise_control(*g_engine, g_control_path);
    return served;
  });
  // As above; and the socket goes too.
  if (r != 0) {
    drop_control();
    g_scanner.reset();
    g_evacuator.reset();
    g_health.reset();
    if (g_engine) (void)g_engine->close();
    g_engine.reset();
  }
  return r;
}

// Shutdown: nbdkit has finished every request; flush and leave clean metadata.
void dmremap_cleanup() {
  drop_control();
  g_scanner.reset();  // saves its place
  g_evacuator.reset();  // as the scan; writes in flight still reach NEW
  g_health.reset();
  if (!g_engine) return;
  (void)guarded("shutdown", RequestKind::kOther, [] { return g_engine->close(); });
  g_engine.reset();
}

void* dmremap_open(int /*readonly*/) {
  // One engine serves every connection; the handle carries nothing.
  static int handle;
  return &handle;
}

int64_t dmremap_get_size(void*) { return static_cast<int64_t>(g_engine->size()); }

int dmremap_block_size(void*, uint32_t* minimum, uint32_t* preferred, uint32_t* maximum) {
  const dmremap::BlockSizes b = dmremap::block_sizes(*g_engine);
  *minimum = b.minimum;
  *preferred = b.preferred;
  *maximum = b.maximum;
  return 0;
}

int dmremap_can_write(void*) { return !g_engine->read_only(); }
int dmremap_can_flush(void*) { return 1; }
int dmremap_can_fua(void*) { return NBDKIT_FUA_NATIVE; }
int dmremap_can_trim(void*) { return 1; }
int dmremap_can_zero(void*) { return 1; }
int dmremap_can_fast_zero(void*) { return dmremap::offers_fast_zero(*g_engine); }
// Honest: the engine is shared and flush() flushes main and spare, so a
// flush on one connection covers writes completed on every connection.
int dmremap_can_multi_conn(void*) { return 1; }
int dmremap_can_cache(void*) { return NBDKIT_CACHE_NATIVE; }

int dmremap_pread(void*, void* buf, uint32_t count, uint64_t offset, uint32_t) {
  return guarded("read", RequestKind::kRead, [&] { return g_engine->read(buf, count, offset); });
}

int dmremap_pwrite(void*, const void* buf, uint32_t count, uint64_t offset, uint32_t flags) {
  return guarded("write", RequestKind::kWrite, [&] {
    return g_engine->write(buf, count, offset, flags & NBDKIT_FLAG_FUA);
  });
}

int dmremap_flush(void*, uint32_t) {
  return guarded("flush", RequestKind::kOther, [] { return g_engine->flush(); });
}

int dmremap_trim(void*, uint32_t count, uint64_t offset, uint32_t flags) {
  return guarded("trim", RequestKind::kWrite,
                 [&] { return g_engine->trim(count, offset, flags & NBDKIT_FLAG_FUA); });
}

int dmremap_zero(void*, uint32_t count, uint64_t offset, uint32_t flags) {
  // FAST_ZERO: the engine fails at once with ENOTSUP when zeroing would be
  // no faster than writing, and that ENOTSUP goes to the client as it is.
  const bool fast = flags & NBDKIT_FLAG_FAST_ZERO;
  return guarded("zero", fast ? RequestKind::kFastZero : RequestKind::kWrite, [&] {
    return g_engine->write_zeroes(count, offset, flags & NBDKIT_FLAG_FUA, fast);
  });
}

// Reading is the native cache: it also finds weak blocks early and rescues
// them before a client needs them.
int dmremap_cache(void*, uint32_t count, uint64_t offset, uint32_t) {
  return guarded("cache", RequestKind::kRead,
                 [&] { return dmremap::cache(*g_engine, count, offset); });
}

// Holes in main (a sparse file) are reported so that qemu-img, nbdcopy and
// friends skip them; remapped and pending blocks are always data.
int dmremap_can_extents(void*) { return 1; }

int dmremap_extents(void*, uint32_t count, uint64_t offset, uint32_t flags,
                    nbdkit_extents* extents) {
  return guarded("extents", RequestKind::kOther, [&] {
    bool done = false;
    int add_error = 0;
    auto run = [&](uint64_t off, uint64_t len, bool hole) {
      // nbdkit clips what lies outside the request; with REQ_ONE one run
      // is enough.
      if (done) return;
      const uint32_t type = hole ? (NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO) : 0;
      if (nbdkit_add_extent(extents, off, len, type) == -1) {
        add_error = errno ? errno : EIO;
        done = true;
      }
      if ((flags & NBDKIT_FLAG_REQ_ONE) && off + len > offset) done = true;
    };
    dmremap::Status s = dmremap::allocation(*g_engine, count, offset, run);
    if (s.is_ok() && add_error) s = dmremap::Status::error(add_error, "nbdkit_add_extent failed");
    return s;
  });
}

void dmremap_dump_plugin() {
  std::printf("dmremap_version=%s\n", DMREMAP_VERSION);
  std::printf("dmremap_metadata_format=%u\n", dmremap::kFormatVersion);
  std::printf("dmremap_nbd_uri=yes\n");
}

nbdkit_plugin make_plugin() {
  nbdkit_plugin p{};
  p.name = "dmremap";
  p.longname = "dmremap: keeps a failing disk in service by remapping bad blocks to a spare";
  p.version = DMREMAP_VERSION;
  p.description =
      "Serves MAIN (a failing disk) as a healthy one: blocks MAIN cannot store move to SPARE, "
      "recorded in a crash-safe journal. Format SPARE first with: dmremap format --main DISK "
      "--spare SPARE";
  p.config = dmremap_config;
  p.config_complete = dmremap_config_complete;
  p.config_help =
      "main=DISK             (required) the failing disk: file, block device or NBD URI\n"
      "spare=SPARE           (required) the spare (file, block device or NBD URI),\n"
      "                      formatted by `dmremap format`\n"
      "readonly=BOOL         open both read-only; nothing is remapped (default false)\n"
      "io=auto|direct|buffered  direct (O_DIRECT) sees each write error at its write;\n"
      "                      auto (default): direct on block devices, buffered on files\n"
      "direct=BOOL           the same as io=direct (true) or io=buffered (false)\n"
      "retries=N             extra reads of a failing block before it is unreadable (3)\n"
      "retry-time=SECONDS    no new read of a failing block once its reads took this\n"
      "                      long (30; one retry is always made)\n"
      "io-timeout=SECONDS    an NBD main or spare that does not answer a request in\n"
      "                      this long has failed it (30; 0: wait for ever)\n"
      "slow=SECONDS          a read of main that succeeds but takes this long (and\n"
      "                      20 times the usual) rescues its block to the spare,\n"
      "                      cause slow (0, the default: off)\n"
      "unreadable=error|zero salvage: zero = unreadable blocks read as zeros, logged (error)\n"
      "warn=PERCENT          health warns when this much of the pool is used (80)\n"
      "log-interval=SECONDS  log a summary of the set's figures this often (3600;\n"
      "                      0: never); health changes are logged at once\n"
      "control=SOCKET        answer dmremap status, list, scan, remap and\n"
      "                      forget-pending --control SOCKET, and the metrics, on\n"
      "                      this Unix socket (mode 0600; only\n"
      "                      root and this user may change the set through it)\n"
      "inject=FAULTS         testing only: read:N[-M],write:N[-M],weak:N[-M]xK,\n"
      "                      slow:N[-M]xMS on main\n"
      "inject-spare=FAULTS   testing only: the same, and flush:MS, on the spare";
  p.magic_config_key = "main";
  p.get_ready = dmremap_get_ready;
  p.after_fork = dmremap_after_fork;
  p.cleanup = dmremap_cleanup;
  p.open = dmremap_open;
  p.get_size = dmremap_get_size;
  p.block_size = dmremap_block_size;
  p.can_write = dmremap_can_write;
  p.can_flush = dmremap_can_flush;
  p.can_fua = dmremap_can_fua;
  p.can_trim = dmremap_can_trim;
  p.can_zero = dmremap_can_zero;
  p.can_fast_zero = dmremap_can_fast_zero;
  p.can_multi_conn = dmremap_can_multi_conn;
  p.can_cache = dmremap_can_cache;
  p.pread = dmremap_pread;
  p.pwrite = dmremap_pwrite;
  p.flush = dmremap_flush;
  p.trim = dmremap_trim;
  p.zero = dmremap_zero;
  p.cache = dmremap_cache;
  p.can_extents = dmremap_can_extents;
  p.extents = dmremap_extents;
  p.dump_plugin = dmremap_dump_plugin;
  p.errno_is_preserved = 0;
  return p;
}

nbdkit_plugin plugin = make_plugin();

}  // namespace

NBDKIT_REGISTER_PLUGIN(plugin)
