#include "dmremap/metrics.h"

#include "dmremap/scan.h"

#include <fmt/format.h>

#include <initializer_list>
#include <string_view>
#include <utility>

#ifndef DMREMAP_VERSION
#define DMREMAP_VERSION "unknown"
#endif

namespace dmremap {
namespace {

// A label value: backslash, double quote and newline escaped.
std::string escape(std::string_view v) {
  std::string out;
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

class Writer {
 public:
  // One metric family: its HELP and TYPE lines, then its samples.
  Writer& family(std::string_view name, std::string_view type, std::string_view help) {
    name_ = name;
    fmt::format_to(std::back_inserter(out_), "# HELP {} {}\n# TYPE {} {}\n", name, help, name,
                   type);
    return *this;
  }
  // A sample of the current family; `suffix` for a histogram's parts.
  template <class V>
  Writer& sample(V value, std::initializer_list<std::pair<std::string_view, std::string>> labels = {},
                 std::string_view suffix = "") {
    out_ += name_;
    out_ += suffix;
    if (labels.size() > 0) {
      out_ += '{';
      bool first = true;
      for (const auto& [k, v] : labels) {
        fmt::format_to(std::back_inserter(out_), "{}{}=\"{}\"", first ? "" : ",", k, escape(v));
        first = false;
      }
      out_ += '}';
    }
    fmt::format_to(std::back_inserter(out_), " {}\n", value);
    return *this;
  }
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
  std::string name_;
};

std::string seconds(double s) { return fmt::format("{}", s); }

}  // namespace

namespace {
constexpr const char* kUpHelp = "1 when the set's figures could be read, 0 when not.";
}  // namespace

std::string prometheus_unreadable_text() {
  Writer w;
  w.family("dmremap_up", "gauge", kUpHelp).sample(0);
  return w.take();
}

std::string prometheus_text(const EngineStats& s, const Superblock& sb, bool live,
                            const ScanProgress* scan) {
  Writer w;
  w.family("dmremap_up", "gauge", kUpHelp).sample(1);
  w.family("dmremap_build_info", "gauge", "A constant 1, labelled with the version of dmremap.")
      .sample(1, {{"version", DMREMAP_VERSION}});
  w.family("dmremap_set_info", "gauge", "A constant 1, labelled with the set's UUID.")
      .sample(1, {{"uuid", uuid_string(sb.uuid)}});
  w.family("dmremap_main_size_bytes", "gauge", "Size of main, as served.").sample(sb.main_size);
  w.family("dmremap_block_size_bytes", "gauge", "The set's block size.").sample(sb.block_size);

  w.family("dmremap_health", "gauge",
           "1 for the set's health (ok, warning or failing), 0 for the others.");
  for (Health h : {Health::kOk, Health::kWarning, Health::kFailing}) {
    w.sample(s.health == h ? 1 : 0, {{"state", health_name(h)}});
  }
  w.family("dmremap_health_problem", "gauge",
           "1 for each problem that applies to the set now, 0 for the others.");
  for (const char* p : kHealthProblems) {
    bool on = false;
    for (const std::string& q : s.health_problems) on = on || q == p;
    w.sample(on ? 1 : 0, {{"problem", p}});
  }

  // As SMART attributes 5 (reallocated), 197 (pending) and 196 (events).
  w.family("dmremap_remapped_blocks", "gauge", "Blocks of main that live in a spare slot.")
      .sample(s.remaps);
  w.family("dmremap_pending_blocks", "gauge",
           "Blocks main cannot read, whose data is lost; the next write gives each a slot.")
      .sample(s.pending);
  w.family("dmremap_pending_blocks_capacity", "gauge", "How many pending blocks the set can hold.")
      .sample(s.pending_capacity);
  w.family("dmremap_remap_events_total", "counter",
           "Blocks moved to the spare since the set was formatted, by cause.");
  for (size_t c = 1; c < std::size(s.remaps_by_cause); ++c) {
    w.sample(s.remaps_by_cause[c], {{"cause", cause_name(static_cast<Cause>(c))}});
  }
  w.family("dmremap_spare_slots", "gauge", "Slots of the spare's pool, by state.")
      .sample(s.slots_used, {{"state", "used"}})
      .sample(s.slots_free, {{"state", "free"}})
      .sample(s.slots_bad, {{"state", "bad"}});
  if (!live) return w.take();

  w.family("dmremap_device_online", "gauge",
           "1 while the device answers, 0 from when it stopped answering as a whole.")
      .sample(s.main_offline_since == 0 ? 1 : 0, {{"device", "main"}})
      .sample(s.spare_offline_since == 0 ? 1 : 0, {{"device", "spare"}});
  w.family("dmremap_device_offline_since_seconds", "gauge",
           "When the device stopped answering (Unix time), 0 while it answers.")
      .sample(s.main_offline_since, {{"device", "main"}})
      .sample(s.spare_offline_since, {{"device", "spare"}});
  w.family("dmremap_requests_total", "counter", "Client requests since start, by kind.")
      .sample(s.reads, {{"op", "read"}})
      .sample(s.writes, {{"op", "write"}})
      .sample(s.flushes, {{"op", "flush"}})
      .sample(s.trims, {{"op", "trim"}})
      .sample(s.zeroes, {{"op", "zero"}});
  w.family("dmremap_request_bytes_total", "counter", "Bytes read and written by clients.")
      .sample(s.bytes_read, {{"op", "read"}})
      .sample(s.bytes_written, {{"op", "write"}});
  w.family("dmremap_main_errors_total", "counter", "Reads and writes of main that failed.")
      .sample(s.main_read_errors, {{"op", "read"}})
      .sample(s.main_write_errors, {{"op", "write"}});
  w.family("dmremap_read_retry_successes_total", "counter",
           "Blocks that failed a read and then read on a retry.")
      .sample(s.retry_successes);
  w.family("dmremap_slow_reads_total", "counter",
           "Reads of main that succeeded but took longer than slow= (and 20 times the usual); "
           "some of their blocks are rescued, cause slow.")
      .sample(s.slow_reads);
  // As SMART attribute 198 (uncorrectable).
  w.family("dmremap_unreadable_reads_total", "counter",
           "Client reads that failed because a block could not be read at all.")
      .sample(s.unreadable_reads);
  w.family("dmremap_slot_write_errors_total", "counter", "Writes to a spare slot that failed.")
      .sample(s.slot_write_errors);
  w.family("dmremap_journal_commits_total", "counter",
           "Journal appends (each a group of remaps and marks) since start.")
      .sample(s.commit_groups);
  w.family("dmremap_journal_records_total", "counter", "Records in those appends.")
      .sample(s.commit_records);
  w.family("dmremap_spare_flushes_total", "counter", "Flushes of the spare since start.")
      .sample(s.spare_flushes);

  if (scan != nullptr) {
    w.family("dmremap_scan_state", "gauge",
             "1 for the surface scan's state (none, running, paused, done, cancelled).");
    for (ScanState st : {ScanState::kNone, ScanState::kRunning, ScanState::kPaused,
                         ScanState::kDone, ScanState::kCancelled}) {
      w.sample(scan->state == st ? 1 : 0, {{"state", scan_state_name(st)}});
    }
    w.family("dmremap_scan_next_block", "gauge", "The next block the scan reads.")
        .sample(scan->next_block);
    w.family("dmremap_scan_blocks", "gauge", "Blocks the scan reads in all (main's blocks).")
        .sample(scan->blocks);
    w.family("dmremap_scan_rate_bytes_per_second", "gauge", "How fast the scan reads lately.")
        .sample(seconds(scan->rate));
    w.family("dmremap_scan_unreadable_blocks", "gauge",
             "Blocks this scan found unreadable (marked pending).")
        .sample(scan->unreadable);
  }
  w.family("dmremap_request_duration_seconds", "histogram",
           "How long client reads, writes and flushes took.");
  const char* ops[kLatencyOps] = {"read", "write", "flush"};
  for (int op = 0; op < kLatencyOps; ++op) {
    const LatencyHistogram::Snapshot& h = s.latency[op];
    uint64_t cumulative = 0;
    for (size_t i = 0; i < LatencyHistogram::kBounds.size(); ++i) {
      cumulative += h.buckets[i];
      w.sample(cumulative, {{"op", ops[op]}, {"le", seconds(LatencyHistogram::kBounds[i])}},
               "_bucket");
    }
    w.sample(h.count, {{"op", ops[op]}, {"le", "+Inf"}}, "_bucket");
    w.sample(seconds(h.sum_seconds), {{"op", ops[op]}}, "_sum");
    w.sample(h.count, {{"op", ops[op]}}, "_count");
  }
  return w.take();
}

}  // namespace dmremap
