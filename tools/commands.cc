#include "commands.h"
#include "dmremap/open_set.h"

#include <fmt/core.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "dmremap/block_device.h"
#include "dmremap/control.h"
#include "dmremap/disk_map.h"
#include "dmremap/engine.h"
#include "dmremap/evacuate.h"
#include "dmremap/metadata_store.h"
#include "dmremap/metrics.h"
#include "dmremap/scan.h"
#include "dmremap/set_actions.h"

namespace dmremap::cli {
namespace {

void print_error(const std::string& what) { fmt::print(stderr, "dmremap: {}\n", what); }

int fail(const Status& s, const std::string& hint = {}) {
  std::string msg = s.to_string();
  if (s.code() == EBUSY && hint.empty()) {
    msg += " (is a server using it? Stop nbdkit or dmremap-server first)";
  }
  print_error(msg);
  if (!hint.empty()) fmt::print(stderr, "  {}\n", hint);
  return kExitFailed;
}

std::string human(uint64_t bytes) {
  static const char* const kUnits[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 5) {
    v /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{} bytes", bytes) : fmt::format("{:.1f} {}", v, kUnits[u]);
}

std::string percent(uint64_t part, uint64_t whole) {
  return whole == 0 ? "0%" : fmt::format("{:.1f}%", 100.0 * static_cast<double>(part) / whole);
}

// Inspection never takes the lock, so that status, list and check work while
// a server has the set open.
Result<std::shared_ptr<BlockDevice>> open_for_inspection(const std::string& spec,
                                                         const std::string& role) {
  OpenOptions oo;
  oo.read_only = true;
  oo.exclusive = false;
  return open_device(spec, role, oo);
}

// A spare's metadata, loaded without changing a byte.
struct Loaded {
  std::shared_ptr<BlockDevice> spare;
  std::unique_ptr<MetadataStore> store;
  RemapTable table;
  OpenReport report;
};
Result<std::unique_ptr<Loaded>> load_spare(const std::string& spec) {
  auto dev = open_for_inspection(spec, "spare");
  if (!dev.is_ok()) return dev.take_status();
  auto l = std::make_unique<Loaded>();
  l->spare = dev.value();
  auto store = MetadataStore::open_snapshot(l->spare, l->table, &l->report);
  if (!store.is_ok()) return store.take_status();
  l->store = std::move(store.value());
  return l;
}

// Says whether `main` is the disk the set was formatted for; "" when it is.
std::string main_mismatch(const std::string& spec, uint64_t main_size,
                          const std::string& main_identity) {
  auto dev = open_for_inspection(spec, "main");
  if (!dev.is_ok()) return dev.status().to_string();
  const std::string why = dmremap::main_mismatch(*dev.value(), main_size, main_identity);
  return why.empty() ? why : spec + ": " + why;
}

// Main and spare must be two different devices: formatting a disk as its own
// spare would overwrite the data it is meant to protect.
bool same_device(const std::string& a, const std::string& b) {
  if (is_nbd_uri(a) || is_nbd_uri(b)) return a == b;
  struct stat sa {}, sb {};
  if (::stat(a.c_str(), &sa) != 0 || ::stat(b.c_str(), &sb) != 0) return false;
  if (S_ISBLK(sa.st_mode) && S_ISBLK(sb.st_mode)) return sa.st_rdev == sb.st_rdev;
  return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

// Progress on stderr for long scans: a live line on a terminal, a line every
// few seconds in a log.
class Progress {
 public:
  explicit Progress(std::string what) : what_(std::move(what)), tty_(::isatty(2) == 1) {}
  void update(uint64_t done, uint64_t total) {
    const auto now = std::chrono::steady_clock::now();
    const auto gap = tty_ ? std::chrono::milliseconds(200) : std::chrono::milliseconds(5000);
    if (now - last_ < gap || total == 0) return;
    last_ = now;
    shown_ = true;
    fmt::print(stderr, "{}{}: {} of {} ({}){}", tty_ ? "\r" : "", what_, human(done), human(total),
               percent(done, total), tty_ ? "" : "\n");
  }
  void finish() {
    if (shown_ && tty_) fmt::print(stderr, "\n");
  }

 private:
  std::string what_;
  bool tty_;
  bool shown_ = false;
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
};

}  // namespace

int run_format(const FormatOptions& o) {
  if (same_device(o.main, o.spare)) {
    print_error("main and spare are the same device; the spare must be a different disk or file");
    return kExitFailed;
  }
  auto main = open_for_inspection(o.main, "main");
  if (!main.is_ok()) return fail(main.status());
  OpenOptions so;
  auto spare = open_device(o.spare, "spare", so);
  if (!spare.is_ok()) return fail(spare.status());
  BlockDevice& sp = *spare.value();

  if (!o.force) {
    if (auto found = read_superblock(sp); found.is_ok()) {
      const Superblock& old = found->sb;
      print_error(fmt::format(
          "{} already holds a dmremap set ({}, main of {} bytes, formatted {})", o.spare,
          uuid_string(old.uuid), old.main_size, format_time(old.format_time)));
      fmt::print(stderr,
                 "  Formatting it again forgets every remapped block and the data in its slot.\n"
                 "  See what it holds with: dmremap status --spare {}\n"
                 "  Add --force only if that data is no longer needed.\n",
                 o.spare);
      return kExitFailed;
    }
    Progress progress("checking that the spare is blank");
    auto blank = spare_is_blank(sp, [&](uint64_t d, uint64_t t) { progress.update(d, t); });
    progress.finish();
    if (!blank.is_ok()) return fail(blank.status());
    if (!blank.value()) {
      print_error(fmt::format("{} is not blank: it holds data that is not dmremap's", o.spare));
      fmt::print(stderr,
                 "  Check that it is the disk you mean; add --force to overwrite it anyway.\n");
      return kExitFailed;
    }
  }

  LayoutParams p;
  p.main_size = main.value()->size();
  p.spare_size = sp.size();
  p.block_size = static_cast<uint32_t>(o.block_size);
  p.pending_capacity = o.pending_capacity;
  p.journal_bytes = o.journal_size;
  if (!valid_block_size(o.block_size)) {
    print_error(fmt::format("--block-size {}: use a power of two from 512 to 65536", o.block_size));
    return kExitFailed;
  }
  auto sb = MetadataStore::format(sp, p, main.value()->identity());
  if (!sb.is_ok()) return fail(sb.status());
  const Superblock& s = sb.value();

  if (o.json) {
    Json j = identity_json(s);
    j["slots_total"] = s.slot_count;
    j["pending_capacity"] = s.pending_capacity;
    j["journal_bytes"] = s.journal_bytes;
    fmt::print("{}\n", j.dump(2));
    return kExitOk;
  }
  fmt::print("Formatted {} as the spare of {}\n", o.spare, o.main);
  fmt::print("  set          {}\n", uuid_string(s.uuid));
  fmt::print("  main         {} ({}), {}-byte blocks\n", human(s.main_size), s.main_size,
             s.block_size);
  if (!s.main_identity.empty()) fmt::print("  main id      {}\n", s.main_identity);
  fmt::print("  slots        {} ({} of spare blocks for remaps)\n", s.slot_count,
             human(s.slot_count * s.block_size));
  fmt::print("  journal      {} x 2 copies\n", human(s.journal_bytes));
  // Quoted for the shell where needed: an nbds:// URI holds '&' and '?'.
  auto arg = [](const std::string& key, const std::string& value) {
    const std::string word = key + "=" + value;
    if (word.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                               "_-./=:@+,%") == std::string::npos) {
      return word;
    }
    std::string quoted = "'";
    for (const char c : word) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return quoted + "'";
  };
  fmt::print("Serve it with: nbdkit dmremap {} {}\n", arg("main", o.main), arg("spare", o.spare));
  return kExitOk;
}

namespace {

// The human form of `dmremap status`, from its JSON, served or not.
void print_status(const Json& j, const std::string& control) {
  const bool served = j.value("served", false);
  const std::string reason = j.value("health_reason", std::string());
  fmt::print("set        {}\n", j.value("uuid", std::string()));
  fmt::print("health     {}{}\n", j.value("health", std::string()),
             reason.empty() ? "" : " (" + reason + ")");
  const std::string id = j.value("main_identity", std::string());
  fmt::print("main       {} ({} bytes), {}-byte blocks{}\n", human(j.value("main_size", 0ull)),
             j.value("main_size", 0ull), j.value("block_size", 0u), id.empty() ? "" : ", id " + id);
  if (served) {
    const Json m = j.value("main", Json::object());
    if (m.value("state", std::string()) == "offline") {
      fmt::print("           offline since {} ({})\n", m.value("offline_since", std::string()),
                 m.value("reason", std::string()));
    } else {
      fmt::print("           online\n");
    }
  }
  fmt::print("remapped   {} block(s)", j.value("remaps", 0ull));
  const char* sep = ": ";
  const Json causes = j.value("remaps_by_cause", Json::object());
  for (const auto& [cause, n] : causes.items()) {
    if (n.get<uint64_t>() == 0) continue;
    fmt::print("{}{} {}", sep, n.get<uint64_t>(), cause);
    sep = ", ";
  }
  fmt::print("\n");
  fmt::print("pending    {} unreadable block(s), room for {}\n", j.value("pending", 0ull),
             j.value("pending_capacity", 0ull));
  const uint64_t used = j.value("slots_used", 0ull), bad = j.value("slots_bad", 0ull),
                 total = j.value("slots_total", 0ull);
  fmt::print("slots      {} used, {} bad, {} free of {} ({} used)\n", used, bad,
             j.value("slots_free", 0ull), total, percent(used + bad, total));
  if (served) {
    // Every problem, not only the one health names first.
    const std::string flush = j.value("flush_failure", std::string());
    if (!flush.empty()) fmt::print("flush      failed: {}; FLUSH and FUA fail until restart\n", flush);
    if (j.value("journal_broken", false)) {
      fmt::print("journal    cannot be written: writes are refused until restart\n");
    }
    for (const Json& d : j.value("metadata_degraded", Json::array())) {
      if (d.is_string()) fmt::print("degraded   {}\n", d.get<std::string>());
    }
    fmt::print("state      served (figures from {})\n", control);
    const Json r = j.value("requests", Json::object());
    const Json e = j.value("errors", Json::object());
    fmt::print("requests   {} reads ({}), {} writes ({}), {} flushes since start\n",
               r.value("reads", 0ull), human(r.value("bytes_read", 0ull)), r.value("writes", 0ull),
               human(r.value("bytes_written", 0ull)), r.value("flushes", 0ull));
    fmt::print(
        "errors     main: {} read, {} write; {} retries worked; {} reads unreadable; {} slow\n",
        e.value("main_read", 0ull), e.value("main_write", 0ull), e.value("retry_successes", 0ull),
        e.value("unreadable_reads", 0ull), e.value("slow_reads", 0ull));
  } else {
    fmt::print("state      {}\n", j.value("clean", false) ? "closed cleanly"
                                                           : "in use, or not closed cleanly");
    if (j.value("format_version", 2u) < 2) {
      fmt::print("format     version {}: upgrade it with dmremap upgrade --spare SPARE before "
                 "serving it writable\n", j.value("format_version", 2u));
    }
  }
  if (j.contains("evacuation")) {
    const Json& ev = j["evacuation"];
    const std::string state = ev.value("state", std::string());
    fmt::print("evacuate   {} to {}: {:.1f}% copied, {} block(s) lost{}\n", state,
               ev.value("target", std::string()), ev.value("percent", 0.0),
               ev.value("lost", 0ull),
               ev.value("new_away", false) ? "; NEW cannot be opened: " + ev.value("error", std::string())
               : state == "in-sync"    ? "; NEW is in sync, every write reaches it"
               : state == "finished" ? "; NEW held the whole disk when the set closed"
                                     : "");
  }
  fmt::print("formatted  {}\n", j.value("formatted", std::string()));
}

}  // namespace

namespace {

// One look at the set: prints it, returns the exit status.
int status_once(const StatusOptions& o) {
  auto unknown = [&o](const Status& st) {
    (void)fail(st);
    // A textfile collector then says the set could not be read, instead of
    // keeping the last figures or showing none.
    if (o.format == "prometheus") fmt::print("{}", prometheus_unreadable_text());
    return kStatusUnknown;
  };
  Json j;
  std::string metrics_text;  // --format=prometheus
  if (!o.control.empty()) {
    auto reply = control_call(o.control, Json{{"command", "status"}});
    if (!reply.is_ok()) return unknown(reply.status());
    j = std::move(reply.value());
    j.erase("ok");
    if (o.format == "prometheus") {
      auto metrics = control_call(o.control, Json{{"command", "metrics"}});
      if (!metrics.is_ok()) return unknown(metrics.status());
      metrics_text = metrics.value().value("text", std::string());
    }
    if (!o.spare.empty()) {
      auto loaded = load_spare(o.spare);
      if (!loaded.is_ok()) return unknown(loaded.status());
      const std::string uuid = uuid_string(loaded.value()->store->superblock().uuid);
      if (uuid != j.value("uuid", std::string())) {
        print_error(fmt::format("{} serves set {}, but {} holds set {}", o.control,
                                j.value("uuid", std::string()), o.spare, uuid));
        return kStatusUnknown;
      }
    }
  } else {
    auto loaded = load_spare(o.spare);
    if (!loaded.is_ok()) return unknown(loaded.status());
    Loaded& l = *loaded.value();
    const Superblock& sb = l.store->superblock();
    EngineStats s;
    fill_table_stats(s, l.table, sb, o.warn_percent);
    if (o.format == "prometheus") metrics_text = prometheus_text(s, sb, /*live=*/false);
    j = identity_json(sb);
    j["served"] = false;
    j.update(stats_json(s, /*live=*/false));
    j["clean"] = sb.clean();
    if (sb.evac.state != 0) {
      j["evacuation"] = evac_progress_json(
          saved_evac_progress(sb.evac, sb.main_size / sb.block_size, sb.block_size));
    }
    j["generation"] = sb.generation;
    j["epoch"] = sb.epoch;
    j["journal_records"] = l.report.journal_records;
    j["format_version"] = sb.version;
    j["layout"] = {{"superblocks", {kSuperblockOffset[0], kSuperblockOffset[1]}},
                   {"checkpoints", {sb.checkpoint_offset[0], sb.checkpoint_offset[1]}},
                   {"checkpoint_copies", {sb.checkpoint_copy_offset[0], sb.checkpoint_copy_offset[1]}},
                   {"active_checkpoint", sb.active_checkpoint},
                   {"checkpoint_bytes", sb.checkpoint_bytes},
                   {"journals", {sb.journal_offset[0], sb.journal_offset[1]}},
                   {"journal_bytes", sb.journal_bytes},
                   {"slot_headers", sb.slot_header_offset},
                   {"slot_header_bytes", sb.slot_header_bytes},
                   {"slot_offset", sb.slot_offset}};
  }
  const std::string mismatch =
      o.main.empty() ? std::string()
                     : main_mismatch(o.main, j.value("main_size", 0ull),
                                     j.value("main_identity", std::string()));
  const std::string health = j.value("health", std::string());
  int rc = health == "ok"        ? kStatusOk
           : health == "warning" ? kStatusWarning
           : health == "failing" ? kStatusFailing
                                 : kStatusUnknown;
  if (!mismatch.empty()) {
    // A main that cannot be opened says nothing about the set: unknown.
    auto dev = open_for_inspection(o.main, "main");
    rc = dev.is_ok() ? kStatusFailing : kStatusUnknown;
  }
  if (o.format == "prometheus") {
    fmt::print("{}", metrics_text);
    return rc;
  }
  if (o.format == "json") {
    if (!o.main.empty()) {
      j["main_matches"] = mismatch.empty();
      if (!mismatch.empty()) j["main_problem"] = mismatch;
    }
    // Watching: one object per line, for a log or a pipe.
    fmt::print("{}\n", o.watch_seconds > 0 ? j.dump() : j.dump(2));
    return rc;
  }
  print_status(j, o.control);
  if (!mismatch.empty()) print_error("main does not belong to this set: " + mismatch);
  return rc;
}

}  // namespace

int run_status(const StatusOptions& o) {
  if (o.watch_seconds <= 0) return status_once(o);
  // As watch(1) shows a command: the screen redrawn in place on a terminal,
  // one report after another otherwise. Until interrupted; a set that
  // cannot be read is reported and tried again.
  const bool text = o.format == "text";
  const bool tty = ::isatty(STDOUT_FILENO) && text;
  const auto period = std::chrono::milliseconds(static_cast<int64_t>(o.watch_seconds * 1000));
  while (true) {
    if (tty) fmt::print("\033[H\033[2J");
    fmt::print("{}{}", !text ? "" : format_time(static_cast<uint64_t>(std::time(nullptr))),
               !text ? "" : fmt::format(", every {} s\n", o.watch_seconds));
    (void)status_once(o);
    std::fflush(stdout);
    std::this_thread::sleep_for(period);
  }
}

namespace {

// A command sent to the running frontend; its reply without "ok".
// A request that changes the set reads main, with retries, and a disk
// without TLER may spend minutes on one sector: the frontend answers
// status meanwhile, and stops the work when this client goes (Ctrl-C).
constexpr std::chrono::minutes kChangeTimeout{10};

Result<Json> ask(const std::string& control, const Json& request,
                 std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
  auto reply = control_call(control, request, timeout);
  if (!reply.is_ok()) return reply.take_status();
  Json j = std::move(reply.value());
  j.erase("ok");
  return j;
}

}  // namespace

void use_served_set(const std::string& spare, const std::string& main, std::string& control) {
  if (!control.empty() || spare.empty()) return;
  auto dev = open_for_inspection(spare, "spare");
  if (!dev.is_ok()) return;  // the command itself says why
  const std::string found = find_control(*dev.value());
  if (found.empty()) return;
  if (!main.empty()) {
    // The frontend serves the set's own main: a --main that is not it is
    // a mistake to say, not to pass over. Opened here, the set would
    // refuse it the same way.
    auto sb = read_superblock(*dev.value());
    const std::string why =
        sb.is_ok() ? main_mismatch(main, sb->sb.main_size, sb->sb.main_identity) : "";
    if (!why.empty()) {
      print_error(main + " is not this set's main (" + why + "); the set on " + spare +
                  " is served by the frontend on " + found);
      std::exit(kExitFailed);
    }
  }
  // Said on a terminal; a script gets what it asked for and nothing else.
  if (::isatty(STDERR_FILENO) != 0) {
    fmt::print(stderr, "dmremap: {} is served: asking its frontend, on {}\n", spare, found);
  }
  control = found;
}

namespace {

// The set named by --main and --spare, for a command that opens it itself.
SetConfig offline_set(const std::string& main, const std::string& spare, IoMode io) {
  SetConfig config;
  config.main = main;
  config.spare = spare;
  config.io = io;
  return config;
}

// A GNU ddrescue mapfile of a disk of `size` bytes: the blocks in `bad`
// (sorted) are '-', every other byte '+' (finished). ddrescuelog,
// ddrescueview and nbdkit's ddrescue filter read it. `legend`: the comment
// lines that say what '-' and '+' mean here.
void write_ddrescue_map(std::FILE* out, uint64_t size, uint64_t bs, const std::vector<uint64_t>& bad,
                        const std::vector<std::string>& legend) {
  fmt::print(out, "# Mapfile. Created by dmremap {}\n", DMREMAP_VERSION);
  for (const std::string& line : legend) fmt::print(out, "# {}\n", line);
  fmt::print(out, "# current_pos  current_status  current_pass\n");
  fmt::print(out, "0x{:08X}     +               1\n", 0);
  fmt::print(out, "#      pos        size  status\n");
  uint64_t pos = 0;
  auto run = [&](uint64_t end, char status) {
    if (end > pos) fmt::print(out, "0x{:08X}  0x{:08X}  {}\n", pos, end - pos, status);
    pos = end;
  };
  for (size_t i = 0; i < bad.size();) {
    size_t k = i;  // a run of consecutive bad blocks
    while (k + 1 < bad.size() && bad[k + 1] == bad[k] + 1) ++k;
    run(bad[i] * bs, '+');
    run(std::min(size, (bad[k] + 1) * bs), '-');
    i = k + 1;
  }
  run(size, '+');
}

// The list's ddrescue form: pending blocks (unreadable, their data lost)
// are '-'.
void print_ddrescue_map(const Json& j) {
  std::vector<uint64_t> pending;
  for (const Json& e : j["pending"]) pending.push_back(e["block"].get<uint64_t>());
  std::sort(pending.begin(), pending.end());
  write_ddrescue_map(stdout, j["main_size"].get<uint64_t>(), j["block_size"].get<uint64_t>(),
                     pending,
                     {"Pending blocks (main cannot read them; their data is lost) are '-'.",
                      "Every other byte, on main or remapped to the spare, reads: '+'."});
}

void print_list(const Json& j, const ListOptions& o) {
  if (o.format == "ddrescue") {
    print_ddrescue_map(j);
    return;
  }
  if (o.format == "json") {
    Json out = j;
    out.erase("next");
    fmt::print("{}\n", out.dump(2));
    return;
  }
  // When, in UTC to the second; "-" when not known (a set from before the
  // times were kept).
  auto when = [](const Json& e) -> std::string {
    const Json t = e.value("time", Json(nullptr));
    if (!t.is_number_unsigned()) return "-";
    const auto secs = static_cast<std::time_t>(t.get<uint64_t>());
    std::tm tm{};
    if (!gmtime_r(&secs, &tm)) return "-";
    return fmt::format("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", tm.tm_year + 1900, tm.tm_mon + 1,
                       tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
  };
  fmt::print("{:>14} {:>18} {:<10} {:>10} {:<20} {}\n", "BLOCK", "OFFSET", "STATE", "SLOT", "WHEN",
             "CAUSE");
  // Remapped and pending blocks, in block order.
  std::vector<const Json*> rows;
  for (const Json& e : j["remaps"]) rows.push_back(&e);
  for (const Json& e : j["pending"]) rows.push_back(&e);
  std::sort(rows.begin(), rows.end(), [](const Json* a, const Json* b) {
    return (*a)["block"].get<uint64_t>() < (*b)["block"].get<uint64_t>();
  });
  for (const Json* e : rows) {
    if (e->contains("slot")) {
      fmt::print("{:>14} {:>18} {:<10} {:>10} {:<20} {}\n", (*e)["block"].get<uint64_t>(),
                 (*e)["offset"].get<uint64_t>(), "remapped", (*e)["slot"].get<uint64_t>(),
                 when(*e), (*e)["cause"].get<std::string>());
    } else {
      fmt::print("{:>14} {:>18} {:<10} {:>10} {:<20} {}\n", (*e)["block"].get<uint64_t>(),
                 (*e)["offset"].get<uint64_t>(), "pending", "-", when(*e),
                 "unreadable; the next write moves it");
    }
  }
  if (!j["bad_slots"].empty()) {
    fmt::print("bad slots: {}\n", fmt::join(j["bad_slots"].get<std::vector<uint64_t>>(), " "));
  }
  if (rows.empty()) fmt::print("(none)\n");
}

// Prints what remap_json() found, one line per block; the exit status.
int print_remap(const Json& j) {
  int rc = kExitOk;
  for (const Json& r : j["results"]) {
    const uint64_t b = r["block"].get<uint64_t>();
    const std::string result = r["result"].get<std::string>();
    if (result == "remapped") {
      fmt::print("block {}: remapped, data copied\n", b);
    } else if (result == "already") {
      fmt::print("block {}: already remapped\n", b);
    } else if (result == "pending") {
      fmt::print("block {}: unreadable on main; marked pending, the next write gives it a slot\n",
                 b);
    } else if (result == "untried") {
      fmt::print("block {}: not tried: the frontend is stopping\n", b);
      rc = kExitFailed;
    } else {
      print_error(r.contains("error") ? r["error"].get<std::string>()
                                      : fmt::format("block {}: {}", b, result));
      rc = kExitFailed;
    }
  }
  return rc;
}

int print_forget(const Json& j) {
  for (const Json& b : j["cleared"]) {
    fmt::print("block {}: reads now; pending mark cleared\n", b.get<uint64_t>());
  }
  for (const Json& b : j["kept"]) {
    fmt::print("block {}: still unreadable; kept pending\n", b.get<uint64_t>());
  }
  for (const Json& b : j.value("moved", Json::array())) {
    fmt::print("block {}: written meanwhile; it has a slot now, nothing to clear\n",
               b.get<uint64_t>());
  }
  const Json untried = j.value("untried", Json::array());
  for (const Json& b : untried) {
    fmt::print("block {}: not tried: the frontend is stopping\n", b.get<uint64_t>());
  }
  if (j.value("none_pending", false)) fmt::print("no pending blocks\n");
  return j["kept"].empty() && untried.empty() ? kExitOk : kExitFailed;
}

}  // namespace

namespace {

// The whole list, every page put together: from the frontend behind
// `control`, or from `loaded`, a spare read here. Page by page: a set with
// millions of entries is not one reply.
Result<Json> whole_list(const std::string& control, const Loaded* loaded, ListQuery q) {
  q.limit = kMaxListLimit;
  Json j;
  while (true) {
    auto page = !control.empty()
                    ? ask(control, Json{{"command", "list"},
                                        {"remapped", q.remapped},
                                        {"pending", q.pending},
                                        {"from", q.from},
                                        {"limit", q.limit}})
                    : Result<Json>(list_json(loaded->table, loaded->store->superblock(), loaded->spare.get(), q));
    if (!page.is_ok()) return page.take_status();
    if (j.is_null()) {
      j = std::move(page.value());
    } else {
      for (const char* key : {"remaps", "pending"}) {
        for (auto& e : page.value()[key]) j[key].push_back(std::move(e));
      }
      j["next"] = page.value()["next"];
    }
    if (j["next"].is_null()) break;
    q.from = j["next"].get<uint64_t>();
  }
  return j;
}

}  // namespace

int run_list(const ListOptions& o) {
  ListQuery q;
  // A ddrescue map is of the whole disk: its '-' are every pending block.
  q.remapped = !o.only_pending && o.format != "ddrescue";
  q.pending = !o.only_remapped || o.format == "ddrescue";
  std::unique_ptr<Loaded> loaded;
  if (o.control.empty()) {
    auto spare = load_spare(o.spare);
    if (!spare.is_ok()) return fail(spare.status());
    loaded = std::move(spare.value());
  }
  auto j = whole_list(o.control, loaded.get(), q);
  if (!j.is_ok()) return fail(j.status());
  print_list(j.value(), o);
  return kExitOk;
}

int run_map(const MapOptions& o) {
  // The set's figures, as `dmremap status --json` gives them, and the
  // whole list: from the frontend, or from the spare read here.
  Json status;
  std::unique_ptr<Loaded> loaded;
  if (!o.control.empty()) {
    auto reply = ask(o.control, Json{{"command", "status"}});
    if (!reply.is_ok()) return fail(reply.status());
    status = std::move(reply.value());
  } else {
    auto spare = load_spare(o.spare);
    if (!spare.is_ok()) return fail(spare.status());
    loaded = std::move(spare.value());
    const Superblock& sb = loaded->store->superblock();
    EngineStats s;
    fill_table_stats(s, loaded->table, sb, StatusOptions{}.warn_percent);
    status = identity_json(sb);
    status.update(stats_json(s, /*live=*/false));
  }
  auto list = whole_list(o.control, loaded.get(), ListQuery{});
  if (!list.is_ok()) return fail(list.status());
  DiskMapOptions mo;
  mo.columns = o.columns;
  mo.max_rows = o.rows;
  const DiskMapInput in = disk_map_input(status, list.value());
  const std::string svg = disk_map_svg(in, mo);
  if (o.svg == "-") {
    if (std::fwrite(svg.data(), 1, svg.size(), stdout) != svg.size() || std::fflush(stdout) != 0) {
      return fail(Status::from_errno("standard output: write"));
    }
    return kExitOk;
  }
  std::FILE* f = std::fopen(o.svg.c_str(), "wb");
  if (!f) return fail(Status::from_errno(o.svg + ": open"));
  const bool written = std::fwrite(svg.data(), 1, svg.size(), f) == svg.size();
  const int saved = errno;
  if (std::fclose(f) != 0 || !written) {
    return fail(Status::error(written ? errno : saved, o.svg + ": write"));
  }
  const DiskMapGeometry g = disk_map_geometry(in, mo);
  fmt::print("Wrote {}: main's {} blocks in {} cells, the spare's {} slots in {} cells\n", o.svg,
             g.blocks, g.cells, in.slots_total, g.slot_cells);
  return kExitOk;
}

namespace {

// The block that holds sector `lba` (UINT64_MAX when it is past any disk,
// which remap then reports as past the end).
uint64_t lba_block(uint64_t lba, uint64_t sector_size, uint64_t block_size) {
  if (lba > UINT64_MAX / sector_size) return UINT64_MAX;
  return lba * sector_size / block_size;
}

}  // namespace

int run_remap(const RemapOptions& o) {
  std::vector<uint64_t> blocks = o.blocks;
  if (!o.control.empty()) {
    uint64_t block_size = 0;
    if (!o.sectors.empty()) {
      auto status = ask(o.control, Json{{"command", "status"}});
      if (!status.is_ok()) return fail(status.status());
      block_size = status.value().value("block_size", 0u);
      if (block_size == 0) return fail(Status::error(EIO, o.control + ": no block size in status"));
    }
    for (uint64_t lba : o.sectors) blocks.push_back(lba_block(lba, o.sector_size, block_size));
    // One block per request: each line is printed as its block is done.
    int rc = kExitOk;
    for (const uint64_t b : blocks) {
      auto reply = ask(o.control, Json{{"command", "remap"}, {"blocks", {b}}}, kChangeTimeout);
      if (!reply.is_ok()) {
        if (reply.status().code() == ETIMEDOUT) {
          print_error(fmt::format("block {}: no answer within {} minutes; the frontend may "
                                  "still finish it (see `dmremap list`)",
                                  b, kChangeTimeout.count()));
        }
        return fail(reply.status());
      }
      rc = std::max(rc, print_remap(reply.value()));
      std::fflush(stdout);
    }
    return rc;
  }
  SetConfig config = offline_set(o.main, o.spare, o.io);
  config.engine.read_retries = o.retries;
  config.engine.retry_time = std::chrono::milliseconds(static_cast<int64_t>(o.retry_seconds * 1000));
  auto engine = open_set(config);
  if (!engine.is_ok()) return fail(engine.status());
  Engine& e = *engine.value();
  for (uint64_t lba : o.sectors) blocks.push_back(lba_block(lba, o.sector_size, e.block_size()));
  int rc = kExitOk;
  for (const uint64_t b : blocks) {  // each line as its block is done
    rc = std::max(rc, print_remap(remap_json(e, {b})));
    std::fflush(stdout);
  }
  const Status c = e.close();
  if (!c.is_ok()) return fail(c);
  return rc;
}

std::optional<uint64_t> parse_rate(const std::string& text) {
  if (text.empty()) return std::nullopt;
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    return std::nullopt;
  }
  double unit = 1;
  const std::string suffix = text.substr(used);
  if (suffix == "K" || suffix == "k") unit = 1024.0;
  else if (suffix == "M" || suffix == "m") unit = 1024.0 * 1024;
  else if (suffix == "G" || suffix == "g") unit = 1024.0 * 1024 * 1024;
  else if (!suffix.empty()) return std::nullopt;
  if (!(value >= 0) || value * unit > 1e15) return std::nullopt;
  return static_cast<uint64_t>(value * unit);
}

namespace {

volatile std::sig_atomic_t g_interrupted = 0;

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  return fmt::format("{:.{}f} {}", b, u == 0 ? 0 : 2, units[u]);
}

std::string hms(double seconds) {
  if (seconds < 0) return "?";
  const auto s = static_cast<uint64_t>(seconds + 0.5);
  return fmt::format("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
}

// One progress report, as ddrescue shows its own: where, how fast, how long
// still, what it found, and how long since a read last worked.
void print_scan(const Json& p, bool json, bool in_place) {
  if (json) {
    fmt::print("{}\n", p.dump());
    return;
  }
  const uint64_t bs = p["block_size"].get<uint64_t>();
  const int64_t good = p["last_good_read"].get<int64_t>();
  const std::string since =
      good == 0 ? "never" : hms(static_cast<double>(std::time(nullptr) - good)) + " ago";
  std::string line = fmt::format(
      "scan {}: {} of {} ({:.1f}%), {}/s{}, ETA {}, {} unreadable, {} rescued, last good read {}",
      p["state"].get<std::string>(),
      human_bytes(static_cast<double>(p["next_block"].get<uint64_t>() * bs)),
      human_bytes(static_cast<double>(p["blocks"].get<uint64_t>() * bs)),
      p["percent"].get<double>(), human_bytes(p["rate"].get<double>()),
      p["rate_limit"].get<uint64_t>() == 0
          ? std::string()
          : " (limit " + human_bytes(static_cast<double>(p["rate_limit"].get<uint64_t>())) + "/s)",
      p["state"] == "running" ? hms(p["eta_seconds"].get<double>()) : std::string("-"),
      p["unreadable"].get<uint64_t>(), p["rescued"].get<uint64_t>(), since);
  if (!p["error"].get<std::string>().empty()) line += "; stopped: " + p["error"].get<std::string>();
  if (in_place) {
    fmt::print("\r\033[K{}", line);
  } else {
    fmt::print("{}\n", line);
  }
  std::fflush(stdout);
}

// Done, and nothing was unreadable: 0; anything else 1.
int scan_exit(const Json& p) {
  return p["state"] == "done" && p["unreadable"].get<uint64_t>() == 0 ? kExitOk : kExitFailed;
}

// Shows progress (`print`) every second on a terminal, in place, and every
// 10 s in a log, until `over` says so or Ctrl-C (`interrupted`). `poll`
// gives the progress, nullopt when it cannot.
template <class Poll, class Print, class Over>
std::optional<Json> follow_progress(bool json, Poll poll, Print print, Over over,
                                    bool& interrupted) {
  const bool in_place = !json && ::isatty(STDOUT_FILENO);
  g_interrupted = 0;
  auto previous = std::signal(SIGINT, [](int) { g_interrupted = 1; });
  std::optional<Json> last;
  auto report_at = std::chrono::steady_clock::now();
  while (true) {
    auto p = poll();
    if (!p) break;
    last = p;
    const bool done = over(*p);
    if (done || in_place || std::chrono::steady_clock::now() >= report_at) {
      print(*p, json, in_place);
      report_at = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    }
    if (done) break;
    for (int i = 0; i < 10 && !g_interrupted; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    if (g_interrupted) break;
  }
  std::signal(SIGINT, previous);
  if (in_place) fmt::print("\n");
  interrupted = g_interrupted != 0;
  return last;
}

// Follows a scan until it is no longer running.
template <class Poll>
std::optional<Json> follow_scan(const ScanOptions& o, Poll poll, bool& interrupted) {
  return follow_progress(
      o.json, poll, print_scan, [](const Json& p) { return p["state"] != "running"; },
      interrupted);
}

int run_scan_served(const ScanOptions& o) {
  auto call = [&](Json request) -> Result<Json> {
    request["command"] = "scan";
    return ask(o.control, request);
  };
  if (!o.action.empty()) {
    auto r = call(Json{{"action", o.action}});
    if (!r.is_ok()) return fail(r.status());
    if (o.rate) {
      r = call(Json{{"action", "rate"}, {"rate", *o.rate}});
      if (!r.is_ok()) return fail(r.status());
    }
    print_scan(r.value(), o.json, false);
    return kExitOk;
  }
  auto now = call(Json{{"action", "status"}});
  if (!now.is_ok()) return fail(now.status());
  Result<Json> r = now;
  if (now.value()["state"] == "running") {
    if (o.from) {
      return fail(Status::error(EBUSY, "a scan is running: --pause or --cancel it first to "
                                       "start one from block " + std::to_string(*o.from)));
    }
    if (o.rate) r = call(Json{{"action", "rate"}, {"rate", *o.rate}});
    fmt::print(stderr, "dmremap: a scan is running; following it\n");
  } else {
    Json start{{"action", "start"}};
    if (o.from) start["from"] = *o.from;
    if (o.rate) start["rate"] = *o.rate;
    r = call(start);
  }
  if (!r.is_ok()) return fail(r.status());
  if (o.detach) {
    print_scan(r.value(), o.json, false);
    return kExitOk;
  }
  bool interrupted = false;
  Status lost = Status::ok();
  auto last = follow_scan(o, [&]() -> std::optional<Json> {
    auto p = call(Json{{"action", "status"}});
    if (!p.is_ok()) {
      lost = p.status();
      return std::nullopt;
    }
    return p.value();
  }, interrupted);
  if (!lost.is_ok()) return fail(lost);
  if (interrupted) {
    fmt::print(stderr, "dmremap: the scan goes on in the frontend; `dmremap scan --control {} "
                       "--status` shows it, --pause or --cancel stops it\n", o.control);
    return kExitOk;
  }
  return last ? scan_exit(*last) : kExitFailed;
}

int run_scan_offline(const ScanOptions& o) {
  SetConfig config = offline_set(o.main, o.spare, o.io);
  config.engine.slow_read = std::chrono::milliseconds(static_cast<int64_t>(o.slow_seconds * 1000));
  auto engine = open_set(config);
  if (!engine.is_ok()) return fail(engine.status());
  Engine& e = *engine.value();
  int rc = kExitOk;
  {
    if (o.action == "status" || o.action == "pause") {
      // Nothing runs here: the saved place is all there is.
      const Engine::ScanMark m = e.saved_scan();
      ScanProgress p;
      p.state = static_cast<ScanState>(m.state <= 4 ? m.state : 0);
      p.next_block = m.next;
      p.blocks = e.size() / e.block_size();
      p.block_size = e.block_size();
      p.rate_limit = m.rate;
      p.started = static_cast<int64_t>(m.started);
      print_scan(scan_progress_json(p), o.json, false);
      if (o.action == "pause") {
        fmt::print(stderr, "dmremap: no scan runs while the set is not served and no `dmremap "
                           "scan` runs on it\n");
      }
    } else {
      Scanner scanner(e);  // goes on with a saved running scan at once
      Status s = Status::ok();
      if (o.action == "cancel") {
        s = scanner.cancel();
      } else if (scanner.progress().state == ScanState::kRunning && !o.from) {
        if (o.rate) s = scanner.set_rate(*o.rate);
      } else {
        if (scanner.progress().state == ScanState::kRunning) s = scanner.pause();
        if (s.is_ok()) {
          s = scanner.start(o.from, o.rate.value_or(scanner.progress().rate_limit));
        }
      }
      if (!s.is_ok()) {
        (void)fail(s);
        rc = kExitFailed;
      } else if (o.action == "cancel") {
        print_scan(scan_progress_json(scanner.progress()), o.json, false);
      } else {
        bool interrupted = false;
        auto last = follow_scan(
            o, [&]() -> std::optional<Json> { return scan_progress_json(scanner.progress()); },
            interrupted);
        if (interrupted) {
          (void)scanner.pause();
          fmt::print(stderr, "dmremap: scan paused; `dmremap scan` on this set, without --from, "
                             "goes on from where it stopped\n");
          rc = kExitFailed;
        } else {
          rc = last ? scan_exit(*last) : kExitFailed;
        }
      }
    }  // the scanner saves its place here
  }
  const Status c = e.close();
  if (!c.is_ok()) return fail(c);
  return rc;
}

}  // namespace

int run_scan(const ScanOptions& o) {
  return o.control.empty() ? run_scan_offline(o) : run_scan_served(o);
}

namespace {

// One line of an evacuation's progress: where, how fast, how long still,
// what was lost.
void print_evac(const Json& p, bool json, bool in_place) {
  if (json) {
    fmt::print("{}\n", p.dump());
    std::fflush(stdout);
    return;
  }
  const uint64_t bs = p["block_size"].get<uint64_t>();
  const std::string state = p["state"].get<std::string>();
  std::string line = fmt::format(
      "evacuate {} to {}: {} of {} ({:.1f}%), {}/s{}, ETA {}, {} lost, {} writes mirrored", state,
      p["target"].get<std::string>(),
      human_bytes(static_cast<double>(p["next_block"].get<uint64_t>() * bs)),
      human_bytes(static_cast<double>(p["blocks"].get<uint64_t>() * bs)),
      p["percent"].get<double>(), human_bytes(p["rate"].get<double>()),
      p["rate_limit"].get<uint64_t>() == 0
          ? std::string()
          : " (limit " + human_bytes(static_cast<double>(p["rate_limit"].get<uint64_t>())) + "/s)",
      state == "running" ? hms(p["eta_seconds"].get<double>()) : std::string("-"),
      p["lost"].get<uint64_t>(), p["mirrored"].get<uint64_t>());
  if (p["resync_regions"].get<uint64_t>() > 0) {
    line += fmt::format(", {} region(s) to copy again", p["resync_regions"].get<uint64_t>());
  }
  if (!p["error"].get<std::string>().empty()) line += "; " + p["error"].get<std::string>();
  if (in_place) {
    fmt::print("\r\033[K{}", line);
  } else {
    fmt::print("{}\n", line);
  }
  std::fflush(stdout);
}

// Follows an evacuation until it no longer copies (in sync but still
// copying again what a crash left is not over yet).
template <class Poll>
std::optional<Json> follow_evac(bool json, Poll poll, bool& interrupted) {
  return follow_progress(
      json, poll, print_evac,
      [](const Json& p) {
        return p["state"] != "running" && !(p["state"] == "in-sync" && p["resync_regions"] != 0);
      },
      interrupted);
}

// Writes the report and the mapfile of the blocks NEW does not hold.
Status write_evac_report(const EvacuateOptions& o, const Json& progress,
                         const std::vector<uint64_t>& lost) {
  const uint64_t bs = progress["block_size"].get<uint64_t>();
  const uint64_t size = progress["blocks"].get<uint64_t>() * bs;
  std::FILE* map = std::fopen(o.mapfile.c_str(), "w");
  if (map == nullptr) return Status::from_errno(o.mapfile);
  write_ddrescue_map(map, size, bs, lost,
                     {"Blocks NEW does not hold are '-': the set could not read them, and NEW",
                      "has zeros there. Every other byte was copied to NEW: '+'."});
  if (std::fclose(map) != 0) return Status::from_errno(o.mapfile);
  std::FILE* r = std::fopen(o.report.c_str(), "w");
  if (r == nullptr) return Status::from_errno(o.report);
  fmt::print(r, "dmremap evacuate report\n");
  fmt::print(r, "NEW:            {}\n", progress["target"].get<std::string>());
  fmt::print(r, "state:          {}\n", progress["state"].get<std::string>());
  fmt::print(r, "started:        {}\n", format_time(progress["started"].get<uint64_t>()));
  fmt::print(r, "in sync since:  {}\n", format_time(progress["synced"].get<uint64_t>()));
  fmt::print(r, "disk:           {} ({} blocks of {} bytes)\n", human_bytes(static_cast<double>(size)),
             progress["blocks"].get<uint64_t>(), bs);
  fmt::print(r, "copied:         {} of {} blocks\n", progress["next_block"].get<uint64_t>(),
             progress["blocks"].get<uint64_t>());
  fmt::print(r, "writes mirrored while it ran (this process): {}\n",
             progress["mirrored"].get<uint64_t>());
  fmt::print(r, "lost blocks:    {} ({} bytes): NEW holds zeros there\n", lost.size(),
             lost.size() * bs);
  fmt::print(r, "mapfile:        {} (GNU ddrescue format; '-' = lost)\n", o.mapfile);
  if (!lost.empty()) {
    fmt::print(r, "\nLost blocks (block, byte offset, 512-byte sector):\n");
    for (uint64_t b : lost) fmt::print(r, "{} {} {}\n", b, b * bs, b * bs / 512);
    fmt::print(r, "\nTo find the files they belong to on ext4: debugfs -R \"icheck BLOCK...\" NEW,\n"
                  "then \"ncheck INODE...\" (blocks in the filesystem's block size).\n");
  }
  if (std::fclose(r) != 0) return Status::from_errno(o.report);
  return Status::ok();
}

// The end of a copy that is in sync: the report, then the verification.
int finish_evac(const EvacuateOptions& o, const Json& progress, const std::vector<uint64_t>& lost,
                const std::function<Result<Json>()>& verify) {
  if (Status s = write_evac_report(o, progress, lost); !s.is_ok()) return fail(s);
  fmt::print(stderr, "dmremap: NEW {} holds the whole disk; {} block(s) lost. Report: {}; "
                     "mapfile: {}\n",
             progress["target"].get<std::string>(), lost.size(), o.report, o.mapfile);
  if (!o.verify) return kExitOk;
  fmt::print(stderr, "dmremap: verifying: NEW against the set, block by block\n");
  auto v = verify();
  if (!v.is_ok()) return fail(v.status());
  const Json& j = v.value();
  if (o.json) fmt::print("{}\n", j.dump());
  if (j["differ_count"].get<uint64_t>() == 0) {
    fmt::print(stderr, "dmremap: verified: {} block(s) equal, {} lost block(s) skipped\n",
               j["compared"].get<uint64_t>(), j["lost"].get<uint64_t>());
    return kExitOk;
  }
  std::string first;
  for (const Json& b : j["differ"]) {
    if (first.size() > 60) break;
    first += (first.empty() ? "" : ", ") + std::to_string(b.get<uint64_t>());
  }
  return fail(Status::error(EIO, fmt::format("verify: {} block(s) differ between NEW and the set "
                                             "(first: {})",
                                             j["differ_count"].get<uint64_t>(), first)));
}

// An evacuation's error: as it is (an EBUSY here is not the set's lock).
int evac_fail(const Status& s) {
  print_error(s.to_string());
  return kExitFailed;
}

// Why following an evacuation ended before NEW was in sync.
std::string evac_stopped(const Json& p) {
  const std::string state = p["state"].get<std::string>();
  const std::string error = p["error"].get<std::string>();
  if (state == "paused") {
    return "the evacuation is paused" + (error.empty() ? "" : " (" + error + ")") +
           "; `dmremap evacuate --resume` goes on";
  }
  return "the evacuation is " + state + (error.empty() ? "" : ": " + error);
}

int evac_exit(const Json& p) {
  const std::string state = p["state"].get<std::string>();
  if (p.value("new_away", false)) return kExitFailed;  // NEW is not getting the writes
  return state == "in-sync" || state == "finished" ? kExitOk : kExitFailed;
}

// A relative path is the frontend's, which may run elsewhere.
std::string absolute_target(const std::string& spec) {
  if (spec.empty() || is_nbd_uri(spec) || spec[0] == '/') return spec;
  std::error_code ec;
  const auto abs = std::filesystem::absolute(spec, ec);
  return ec ? spec : abs.lexically_normal().string();
}

int run_evacuate_served(const EvacuateOptions& o) {
  auto call = [&](Json request, std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
    request["command"] = "evacuate";
    return ask(o.control, request, timeout);
  };
  if (!o.action.empty()) {
    auto r = call(Json{{"action", o.action}});
    if (!r.is_ok()) return evac_fail(r.status());
    if (o.rate) {
      r = call(Json{{"action", "rate"}, {"rate", *o.rate}});
      if (!r.is_ok()) return evac_fail(r.status());
    }
    print_evac(r.value(), o.json, false);
    return o.action == "status" ? evac_exit(r.value()) : kExitOk;
  }
  auto verify = [&]() -> Result<Json> {
    return call(Json{{"action", "verify"}}, std::chrono::hours(24 * 7));
  };
  auto lost_list = [&]() -> Result<std::pair<Json, std::vector<uint64_t>>> {
    auto r = call(Json{{"action", "lost"}});
    if (!r.is_ok()) return r.take_status();
    std::vector<uint64_t> lost = r.value()["lost_blocks"].get<std::vector<uint64_t>>();
    Json p = r.value();
    p.erase("lost_blocks");
    return std::make_pair(p, lost);
  };
  auto now = call(Json{{"action", "status"}});
  if (!now.is_ok()) return evac_fail(now.status());
  const std::string state = now.value()["state"].get<std::string>();
  // --verify alone, with NEW complete: the report and the comparison.
  if (o.verify && o.to.empty() && (state == "in-sync" || state == "finished") &&
      now.value()["resync_regions"] == 0) {
    auto l = lost_list();
    if (!l.is_ok()) return evac_fail(l.status());
    return finish_evac(o, l.value().first, l.value().second, verify);
  }
  const bool under_way = state == "running" || state == "paused" || state == "in-sync";
  Result<Json> r = now;
  if (under_way && (o.to.empty() || absolute_target(o.to) == now.value()["target"])) {
    if (state == "paused") r = call(Json{{"action", "resume"}});
    if (r.is_ok() && o.rate) r = call(Json{{"action", "rate"}, {"rate", *o.rate}});
    if (state != "in-sync" && !o.detach) {
      fmt::print(stderr, "dmremap: an evacuation is under way; following it\n");
    }
  } else if (o.to.empty()) {
    return evac_fail(Status::error(EINVAL, "no evacuation is under way: name NEW with --to"));
  } else {
    Json start{{"action", "start"}, {"to", absolute_target(o.to)}, {"force", o.force}};
    if (o.rate) start["rate"] = *o.rate;
    r = call(start);
  }
  if (!r.is_ok()) return evac_fail(r.status());
  if (o.detach) {
    print_evac(r.value(), o.json, false);
    return kExitOk;
  }
  bool interrupted = false;
  Status gone = Status::ok();
  auto last = follow_evac(o.json, [&]() -> std::optional<Json> {
    auto p = call(Json{{"action", "status"}});
    if (!p.is_ok()) {
      gone = p.status();
      return std::nullopt;
    }
    return p.value();
  }, interrupted);
  if (!gone.is_ok()) return evac_fail(gone);
  if (interrupted) {
    fmt::print(stderr, "dmremap: the evacuation goes on in the frontend; `dmremap evacuate "
                       "--control {} --status` shows it, --pause or --abort stops it\n",
               o.control);
    return kExitOk;
  }
  if (!last || (*last)["state"] != "in-sync") {
    if (last) print_error(evac_stopped(*last));
    return kExitFailed;
  }
  auto l = lost_list();
  if (!l.is_ok()) return evac_fail(l.status());
  return finish_evac(o, l.value().first, l.value().second, verify);
}

int run_evacuate_offline(const EvacuateOptions& o) {
  if (o.action == "status" || o.action == "pause") {
    // Read from the spare: nothing is opened for writing, NEW is not
    // touched.
    auto loaded = load_spare(o.spare);
    if (!loaded.is_ok()) return evac_fail(loaded.status());
    const Superblock& sb = loaded.value()->store->superblock();
    const Json p = evac_progress_json(
        saved_evac_progress(sb.evac, sb.main_size / sb.block_size, sb.block_size));
    if (o.action == "pause") {
      print_error("nothing copies while the set is not served: the evacuation is " +
                  p["state"].get<std::string>());
      return kExitFailed;
    }
    print_evac(p, o.json, false);
    return evac_exit(p);
  }
  SetConfig config = offline_set(o.main, o.spare, o.io);
  auto engine = open_set(config);
  if (!engine.is_ok()) return fail(engine.status());
  Engine& e = *engine.value();
  int rc = kExitOk;
  {
    std::unique_ptr<Evacuator> ev = make_evacuator(e, config);  // picks up a saved one
    const EvacProgress before = ev->progress();
    const bool under_way = before.state == EvacState::kRunning ||
                           before.state == EvacState::kPaused ||
                           before.state == EvacState::kSynced;
    Status s = Status::ok();
    if (o.action == "abort") {
      s = ev->abort();
      if (s.is_ok()) print_evac(evac_progress_json(ev->progress()), o.json, false);
    } else if (o.verify && o.to.empty() && before.resync_regions == 0 &&
               (before.state == EvacState::kSynced || before.state == EvacState::kFinished)) {
      auto v = ev->verify();
      if (!v.is_ok()) {
        s = v.status();
      } else {
        const Json p = evac_progress_json(ev->progress());
        rc = finish_evac(o, p, ev->lost_blocks(), [&]() -> Result<Json> {
          return evac_verify_json(v.value());
        });
      }
    } else {
      if (under_way && (o.to.empty() || absolute_target(o.to) == before.target)) {
        if (before.state == EvacState::kPaused) s = ev->resume();
        if (s.is_ok() && o.rate) s = ev->set_rate(*o.rate);
        if (before.state != EvacState::kSynced) {
          fmt::print(stderr, "dmremap: going on with the evacuation to {} from block {}\n",
                     before.target, before.next_block);
        }
      } else if (o.to.empty()) {
        s = Status::error(EINVAL, "no evacuation is under way: name NEW with --to");
      } else {
        EvacStart how;
        how.target = absolute_target(o.to);
        how.rate = o.rate.value_or(0);
        how.force = o.force;
        s = ev->start(how);
      }
      if (s.is_ok()) {
        bool interrupted = false;
        auto last = follow_evac(
            o.json, [&]() -> std::optional<Json> { return evac_progress_json(ev->progress()); },
            interrupted);
        if (interrupted) {
          (void)ev->pause();
          fmt::print(stderr, "dmremap: evacuation paused; `dmremap evacuate` on this set goes on "
                             "from where it stopped\n");
          rc = kExitFailed;
        } else if (!last || (*last)["state"] != "in-sync") {
          if (last) print_error(evac_stopped(*last));
          rc = kExitFailed;
        } else {
          rc = finish_evac(o, *last, ev->lost_blocks(), [&]() -> Result<Json> {
            auto v = ev->verify();
            if (!v.is_ok()) return v.take_status();
            return evac_verify_json(v.value());
          });
        }
      }
    }
    if (!s.is_ok()) {
      (void)evac_fail(s);
      rc = kExitFailed;
    }
  }  // the evacuator saves its place here; closing the set ends one in sync
  const Status c = e.close();
  if (!c.is_ok()) return evac_fail(c);
  return rc;
}

}  // namespace

int run_evacuate(const EvacuateOptions& o) {
  return o.control.empty() ? run_evacuate_offline(o) : run_evacuate_served(o);
}

int run_forget_pending(const ForgetPendingOptions& o) {
  if (!o.control.empty()) {
    auto reply = ask(o.control,
                     Json{{"command", "forget-pending"}, {"blocks", o.blocks}, {"all", o.all}},
                     kChangeTimeout);
    if (!reply.is_ok()) return fail(reply.status());
    return print_forget(reply.value());
  }
  SetConfig config = offline_set(o.main, o.spare, o.io);
  auto engine = open_set(config);
  if (!engine.is_ok()) return fail(engine.status());
  Engine& e = *engine.value();
  Json j;
  try {
    // An evacuation under way gets the blocks that read again.
    std::unique_ptr<Evacuator> ev = make_evacuator(e, config);
    j = forget_pending_json(e, o.blocks, o.all);
  } catch (const ControlError& err) {
    (void)e.close();
    return fail(Status::error(err.code, err.message));
  }
  const Status c = e.close();
  if (!c.is_ok()) return fail(c);
  return print_forget(j);
}

int run_check(const CheckOptions& o) {
  auto spare = open_for_inspection(o.spare, "spare");
  if (!spare.is_ok()) return fail(spare.status());
  CheckReport r = check_metadata(spare.value());
  if (!o.main.empty() && r.problems.empty()) {
    if (auto found = read_superblock(*spare.value()); found.is_ok()) {
      const std::string mismatch = main_mismatch(o.main, found->sb.main_size, found->sb.main_identity);
      if (!mismatch.empty()) r.problems.push_back("main does not belong to this set: " + mismatch);
    }
  }
  if (o.json) {
    Json j;
    j["ok"] = r.problems.empty();
    j["problems"] = r.problems;
    j["notes"] = r.notes;
    fmt::print("{}\n", j.dump(2));
  } else {
    for (const auto& n : r.notes) fmt::print("  {}\n", n);
    for (const auto& p : r.problems) fmt::print("PROBLEM: {}\n", p);
    fmt::print("{}: {}\n", o.spare,
               r.problems.empty() ? "metadata OK"
                                  : fmt::format("{} problem(s) found", r.problems.size()));
  }
  return r.problems.empty() ? kExitOk : kExitFailed;
}

}  // namespace dmremap::cli

namespace dmremap::cli {
namespace {

// The spare alone, locked as for format; on an NBD spare, after waiting out
// a lease that a running server would renew.
Result<std::shared_ptr<BlockDevice>> open_spare_for_repair(const std::string& spec) {
  OpenOptions oo;
  auto spare = open_device(spec, "spare", oo);
  if (!spare.is_ok()) return spare;
  if (auto s = wait_out_lease(*spare.value(), EngineOptions{}.lease_interval); !s.is_ok()) return s;
  return spare;
}

}  // namespace

int run_upgrade(const UpgradeOptions& o) {
  auto spare = open_spare_for_repair(o.spare);
  if (!spare.is_ok()) return fail(spare.status());
  auto r = upgrade_metadata(spare.value());
  if (!r.is_ok() && r.status().code() == EALREADY) {
    fmt::print("{}: {}; nothing to do\n", o.spare, r.status().message());
    return kExitOk;
  }
  if (!r.is_ok()) return fail(r.status());
  fmt::print("Upgraded {} to format version {}\n", o.spare, kFormatVersion);
  fmt::print("  slots          {} -> {} (the difference holds the new checkpoint copies and "
             "slot headers)\n",
             r->slots_before, r->slots_after);
  fmt::print("  slot headers   {} written\n", r->headers);
  return kExitOk;
}

int run_rebuild(const RebuildOptions& o) {
  auto spare = open_spare_for_repair(o.spare);
  if (!spare.is_ok()) return fail(spare.status());
  {
    RemapTable table;
    auto whole = MetadataStore::open(spare.value(), table, /*writable=*/false);
    if (whole.is_ok() && !o.force) {
      print_error(o.spare + ": the metadata opens and is whole; there is nothing to rebuild");
      fmt::print(stderr,
                 "  A rebuild keeps only what the slot headers say: pending marks are lost.\n"
                 "  Add --force to rebuild anyway.\n");
      return kExitFailed;
    }
    if (!whole.is_ok() && !o.json) {
      fmt::print(stderr, "dmremap: the metadata does not open ({}); rebuilding from the slots\n",
                 whole.status().to_string());
    }
  }
  Progress progress("looking for the set's geometry");
  auto r = rebuild_metadata(spare.value(),
                            [&](uint64_t d, uint64_t t) { progress.update(d, t); });
  progress.finish();
  if (!r.is_ok()) return fail(r.status());
  if (o.json) {
    Json j;
    j["geometry_from_backup"] = r->geometry_from_backup;
    j["from_checkpoint"] = r->from_checkpoint;
    j["headers"] = r->headers;
    j["unreadable_header_units"] = r->unreadable_units;
    j["remaps"] = r->remaps;
    j["pending"] = r->pending;
    j["bad_slots"] = r->bad_slots;
    j["epoch"] = r->epoch;
    j["warnings"] = r->warnings;
    fmt::print("{}\n", j.dump(2));
    return kExitOk;
  }
  for (const auto& w : r->warnings) fmt::print(stderr, "dmremap: warning: {}\n", w);
  if (r->from_checkpoint) {
    fmt::print("Rebuilt {} from its checkpoint and journal (only the superblocks were lost; the "
               "geometry came from its copy in the slot header area)\n",
               o.spare);
    fmt::print("  remapped     {} block(s)\n", r->remaps);
    fmt::print("  pending      {} block(s)\n", r->pending);
    fmt::print("  bad slots    {}\n", r->bad_slots);
  } else {
    fmt::print("Rebuilt {} from its slot headers{}\n", o.spare,
               r->geometry_from_backup ? " (geometry from the copy in the slot header area)" : "");
    fmt::print("  remapped     {} block(s), from {} valid header(s)\n", r->remaps, r->headers);
    fmt::print("  bad slots    {} (slots without a current header are never used again)\n",
               r->bad_slots);
    fmt::print("  pending      0 (pending marks are not in the slots: those blocks fail on "
               "main again when read)\n");
  }
  fmt::print("Check it with: dmremap check --spare {}\n", o.spare);
  return kExitOk;
}

}  // namespace dmremap::cli

namespace dmremap::cli {

namespace {

// The whole of `path`, or standard input for "-".
Result<std::string> read_text(const std::string& path) {
  std::FILE* f = path == "-" ? stdin : std::fopen(path.c_str(), "rb");
  if (f == nullptr) return Status::from_errno(path);
  std::string text;
  char buf[65536];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
  const bool failed = std::ferror(f) != 0;
  if (f != stdin) std::fclose(f);
  if (failed) return Status::error(EIO, path + ": read failed");
  return text;
}

const char* list_kind(BadListFormat f) {
  switch (f) {
    case BadListFormat::kDdrescue: return "ddrescue mapfile";
    case BadListFormat::kBadblocks: return "badblocks list";
    case BadListFormat::kLba: return "LBA list";
  }
  return "list";
}

// Blocks sent to a served set per request: a request line stays far below
// the control socket's 1 MiB, and one reply comes every few seconds.
constexpr size_t kImportChunk = 16384;

}  // namespace

int run_import(const ImportOptions& o) {
  auto text = read_text(o.file);
  if (!text.is_ok()) return fail(text.status());
  // The set's size, block size and room for pending blocks.
  std::unique_ptr<Engine> engine;
  // At most this many blocks of a list can be of use: every pending block
  // and every slot. The engine checks the room exactly.
  uint64_t main_size = 0, block_size = 0, most = 0;
  if (!o.control.empty()) {
    auto status = ask(o.control, Json{{"command", "status"}});
    if (!status.is_ok()) return fail(status.status());
    main_size = status.value().value("main_size", 0ull);
    block_size = status.value().value("block_size", 0ull);
    most = status.value().value("pending_capacity", 0ull) + status.value().value("slots_total", 0ull);
  } else {
    SetConfig config = offline_set(o.main, o.spare, o.io);
    auto opened = open_set(config);
    if (!opened.is_ok()) return fail(opened.status());
    engine = std::move(opened.value());
    const EngineStats st = engine->stats();
    main_size = engine->size();
    block_size = engine->block_size();
    most = st.pending_capacity + st.slots_total;
  }
  auto close = [&] { return engine ? engine->close() : Status::ok(); };
  if (main_size == 0 || block_size == 0) {
    return fail(Status::error(EIO, o.control + ": no size in status"));
  }
  BadListOptions lo = o.list;
  lo.max_blocks = most;
  auto list = parse_bad_list(text.value(), lo, main_size, static_cast<uint32_t>(block_size));
  if (!list.is_ok()) {
    (void)close();
    return fail(Status::error(list.status().code(), o.file + ": " + list.status().message()));
  }
  const BadList& bad = list.value();
  Json j{{"file", o.file},
         {"format", list_kind(o.list.format)},
         {"entries", bad.entries},
         {"bad_bytes", bad.bad_bytes},
         {"unfinished_bytes", bad.unfinished_bytes},
         {"blocks", bad.blocks.size()},
         {"block_size", block_size},
         {"dry_run", o.dry_run}};
  if (!o.json) {
    fmt::print("{} ({}): {} bad area(s), {} byte(s): {} block(s) of {} bytes\n", o.file,
               list_kind(o.list.format), bad.entries, bad.bad_bytes, bad.blocks.size(),
               block_size);
    if (o.list.format == BadListFormat::kDdrescue && bad.extent != main_size) {
      fmt::print(stderr,
                 "dmremap: warning: {} covers {} bytes, main has {}: is it a map of this disk "
                 "(not of the whole disk when main is a partition)? Its offsets are taken as "
                 "main's\n",
                 o.file, bad.extent, main_size);
    }
    if (bad.unfinished_bytes > 0) {
      fmt::print("{}: {} byte(s) in areas ddrescue had not finished (non-tried, and "
                 "non-trimmed or non-scraped unless --ddrescue-status takes them) are not "
                 "imported\n",
                 o.file, bad.unfinished_bytes);
    }
  }
  uint64_t marked = 0, already = 0, untried = 0;
  Status failed;
  if (o.dry_run) {
    if (!o.json) {
      const size_t shown = std::min<size_t>(bad.blocks.size(), 20);
      fmt::print("dry run: nothing marked. Blocks: {}{}\n",
                 fmt::join(bad.blocks.begin(), bad.blocks.begin() + static_cast<long>(shown), " "),
                 shown < bad.blocks.size() ? " ..." : "");
    }
  } else if (engine) {
    Engine::KnownBadResult r;
    failed = engine->mark_known_bad(bad.blocks, r);
    marked = r.marked;
    already = r.already;
  } else {
    auto part = [&](size_t i) {
      const size_t end = std::min(bad.blocks.size(), i + kImportChunk);
      return std::vector<uint64_t>(bad.blocks.begin() + static_cast<long>(i),
                                   bad.blocks.begin() + static_cast<long>(end));
    };
    // Room for every new block first, as offline: the parts then all fit,
    // unless blocks go pending meanwhile.
    uint64_t fresh = 0, room_now = 0;
    for (size_t i = 0; i < bad.blocks.size() && failed.is_ok(); i += kImportChunk) {
      auto reply = ask(o.control, Json{{"command", "import"}, {"check", true}, {"blocks", part(i)}},
                       kChangeTimeout);
      if (!reply.is_ok()) {
        failed = reply.status();
        break;
      }
      if (!reply.value().contains("fresh") || !reply.value().contains("room")) {
        failed = Status::error(EPROTO, o.control + ": the frontend did not check the room: "
                                                   "nothing marked");
        break;
      }
      fresh += reply.value().value("fresh", 0ull);
      room_now = reply.value().value("room", 0ull);
    }
    if (failed.is_ok() && fresh > room_now) {
      failed = Status::error(ENOSPC, fmt::format("the set has room for {} more pending blocks; "
                                                 "this names {} new ones: nothing marked",
                                                 room_now, fresh));
    }
    for (size_t i = 0; i < bad.blocks.size() && failed.is_ok(); i += kImportChunk) {
      const size_t end = std::min(bad.blocks.size(), i + kImportChunk);
      auto reply = ask(o.control, Json{{"command", "import"}, {"blocks", part(i)}}, kChangeTimeout);
      if (!reply.is_ok()) {
        failed = reply.status();
        break;
      }
      marked += reply.value().value("marked", 0ull);
      already += reply.value().value("already", 0ull);
      untried += reply.value().value("untried", 0ull);
      if (untried > 0) {
        failed = Status::error(ECANCELED, "the frontend is stopping");
      }
      if (!failed.is_ok()) untried += bad.blocks.size() - end;
      if (!o.json && bad.blocks.size() > kImportChunk) {
        fmt::print("imported {} of {} block(s)\n", end, bad.blocks.size());
        std::fflush(stdout);
      }
    }
  }
  const Status closed = close();
  if (failed.is_ok()) failed = closed;
  j["marked"] = marked;
  j["already"] = already;
  j["untried"] = untried;
  if (!failed.is_ok()) j["error"] = failed.to_string();
  if (o.json) {
    fmt::print("{}\n", j.dump(2));
  } else if (!o.dry_run) {
    fmt::print("marked {} block(s) pending (known bad: reads fail at once, the next write gives "
               "each a slot); {} already remapped or pending\n",
               marked, already);
  }
  if (!failed.is_ok()) {
    return o.json ? kExitFailed
                  : fail(failed, marked > 0 ? fmt::format("the {} block(s) marked before it stay "
                                                          "marked; run the import again to go on",
                                                          marked)
                                            : std::string());
  }
  return kExitOk;
}

}  // namespace dmremap::cli
