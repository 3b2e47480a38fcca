// The subcommands of `dmremap`, apart from their option parsing (main.cc).
// Each returns the process exit status: 0 done, 1 failed or found problems.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dmremap/bad_list.h"
#include "dmremap/block_device.h"

namespace dmremap::cli {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailed = 1;

// When `control` is empty and a frontend serves the set on `spare` (its
// control socket recorded there answers for this set): sets `control` to
// it, and says so on standard error when that is a terminal. The command
// then runs there. A `main` given that is not the set's main ends the
// process with an error.
void use_served_set(const std::string& spare, const std::string& main, std::string& control);

struct FormatOptions {
  std::string main;
  std::string spare;
  uint64_t block_size = 4096;
  uint64_t pending_capacity = 0;  // 0: one per slot
  uint64_t journal_size = 0;      // 0: sized from the spare
  bool force = false;
  bool json = false;
};
int run_format(const FormatOptions& o);

struct StatusOptions {
  std::string spare;    // read the metadata from the spare, or
  std::string control;  // ask the server behind this control socket
  std::string main;  // optional: also check that it belongs to the set
  std::string format = "text";  // text, json or prometheus
  unsigned warn_percent = 80;
  double watch_seconds = 0;  // > 0: again every so many seconds, until interrupted
};
// Exit status of `dmremap status`, as monitoring plugins (Nagios, Icinga,
// Zabbix's) read it: 0 health ok, 1 warning, 2 failing (or main does not
// belong to the set), 3 unknown: the set could not be read, or bad usage.
inline constexpr int kStatusOk = 0, kStatusWarning = 1, kStatusFailing = 2, kStatusUnknown = 3;
int run_status(const StatusOptions& o);

struct ListOptions {
  std::string spare;
  std::string control;  // or ask the running frontend
  std::string format = "text";  // text, json, ddrescue
  bool only_remapped = false;
  bool only_pending = false;
};
int run_list(const ListOptions& o);

struct MapOptions {
  std::string spare;
  std::string control;  // or ask the running frontend
  std::string svg;      // the file to write; "-" for standard output
  unsigned columns = 64;
  unsigned rows = 32;  // at most; a cell covers as many blocks as it takes
};
int run_map(const MapOptions& o);

struct RemapOptions {
  std::string main;
  std::string spare;
  std::string control;  // or ask the running frontend
  std::vector<uint64_t> blocks;
  std::vector<uint64_t> sectors;  // LBAs, as SMART and the kernel log name them
  uint64_t sector_size = 512;     // of those LBAs: 4096 on a 4Kn disk
  IoMode io = IoMode::kAuto;
  unsigned retries = 3;
  double retry_seconds = 30;
};
int run_remap(const RemapOptions& o);

struct ScanOptions {
  std::string main;
  std::string spare;
  std::string control;  // or ask the running frontend
  std::optional<uint64_t> from;  // start again from this block
  std::optional<uint64_t> rate;  // bytes per second, 0: no limit
  std::string action;   // "", or pause, resume, cancel, status
  bool detach = false;  // start it in the frontend and return
  bool json = false;
  IoMode io = IoMode::kAuto;
  double slow_seconds = 0;  // offline: EngineOptions::slow_read
};
// Parses "50M", "1.5G", "800K" or bytes, in powers of 1024; nullopt if bad.
std::optional<uint64_t> parse_rate(const std::string& text);
int run_scan(const ScanOptions& o);

struct EvacuateOptions {
  std::string main;
  std::string spare;
  std::string control;  // or ask the running frontend
  std::string to;       // NEW: a path or an NBD URI
  std::optional<uint64_t> rate;  // bytes per second, 0: no limit
  bool force = false;   // NEW may hold data
  std::string action;   // "", or status, pause, resume, abort
  // Compare NEW with the set once in sync (alone: follow the evacuation
  // under way, or verify one in sync or finished).
  bool verify = false;
  bool detach = false;  // start it in the frontend and return
  bool json = false;
  std::string report = "dmremap-evacuate.txt";
  std::string mapfile = "dmremap-evacuate.map";
  IoMode io = IoMode::kAuto;
};
int run_evacuate(const EvacuateOptions& o);

struct ForgetPendingOptions {
  std::string main;
  std::string spare;
  std::string control;  // or ask the running frontend
  std::vector<uint64_t> blocks;
  bool all = false;
  IoMode io = IoMode::kAuto;
};
int run_forget_pending(const ForgetPendingOptions& o);

struct ImportOptions {
  std::string main;
  std::string spare;
  std::string control;  // or ask the running frontend
  std::string file;     // "-": standard input
  BadListOptions list;
  bool dry_run = false;  // say what would be marked, mark nothing
  bool json = false;
  IoMode io = IoMode::kAuto;
};
int run_import(const ImportOptions& o);

struct CheckOptions {
  std::string spare;
  std::string main;
  bool json = false;
};
int run_check(const CheckOptions& o);

struct UpgradeOptions {
  std::string spare;
};
int run_upgrade(const UpgradeOptions& o);

struct RebuildOptions {
  std::string spare;
  bool force = false;
  bool json = false;
};
int run_rebuild(const RebuildOptions& o);

}  // namespace dmremap::cli
