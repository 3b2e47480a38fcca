// dmremap: the admin tool for a dmremap set (a main disk and its spare).
//
// CLI11 parses the options: it gives every subcommand its own --help, checks
// types and file existence, and reads sizes such as 64K, which would
// otherwise be a few hundred lines of hand-written parsing.
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include "commands.h"
#include "dmremap/log.h"

namespace {

using namespace dmremap::cli;

constexpr const char* kDescription =
    "dmremap keeps a failing disk (main) in service: blocks main can no longer hold move to a "
    "spare device, recorded in a crash-safe journal on the spare. This tool formats a spare and "
    "inspects or changes a set. Serve a set with: nbdkit dmremap main=DISK spare=SPARE";

constexpr const char* kIoHelp =
    "How main and the spare are opened: direct (O_DIRECT), buffered (the page cache), or "
    "auto: direct on block devices, buffered on image files";

constexpr const char* kFooter =
    "Exit status: 0 success, 1 failure or problems found, 2 bad usage (status: 0 ok, 1 "
    "warning, 2 failing, 3 unknown, as monitoring plugins read it).\n"
    "Each command has its own --help, e.g. dmremap format --help.";

void add_spare(CLI::App* cmd, std::string& spare) {
  cmd->add_option("-s,--spare", spare, "The spare: a file, a block device or an NBD URI")
      ->required();
}

// The set named by the spare (and main), or by the control socket of the
// frontend that serves it: the command then goes through that frontend.
void add_set_or_control(CLI::App* cmd, std::string* main, std::string& spare,
                        std::string& control) {
  auto* c = cmd->add_option(
      "-c,--control", control,
      "The control socket of the frontend that serves the set (nbdkit control=PATH, "
      "dmremap-server --control PATH): the command runs there, while the set is served");
  if (main) cmd->add_option("-m,--main", *main, "The set's main")->excludes(c);
  cmd->add_option("-s,--spare", spare, "The spare: a file, a block device or an NBD URI")
      ->excludes(c);
}

// In a command's callback: the set must be named one way or the other.
// --io auto|direct|buffered, for a command that opens main and the spare.
void add_io_option(CLI::App* cmd, std::string& io) {
  cmd->add_option("--io", io, kIoHelp)
      ->check(CLI::IsMember({"auto", "direct", "buffered"}))
      ->capture_default_str();
}

// Finds the frontend of a served set named by --spare (use_served_set);
// otherwise the set must be named in full.
void require_set(const CLI::App* cmd, bool needs_main, const std::string& spare,
                 const std::string& main, std::string& control) {
  if (cmd->count("--control") > 0) return;
  use_served_set(spare, main, control);
  if (!control.empty()) return;
  if (cmd->count("--spare") == 0 || (needs_main && cmd->count("--main") == 0)) {
    throw CLI::ValidationError(cmd->get_name(),
                               needs_main ? "name the set: --main MAIN --spare SPARE, or "
                                            "--control SOCKET while it is served"
                                          : "name the set: --spare SPARE, or --control SOCKET "
                                            "while it is served");
  }
}

}  // namespace

int main(int argc, char** argv) {
  int rc = 0;
  CLI::App app(kDescription, "dmremap");
  app.footer(kFooter);
  app.set_version_flag("-V,--version", "dmremap " DMREMAP_VERSION);
  app.require_subcommand(1);
  bool verbose = false;
  app.add_flag("-v,--verbose", verbose,
               "Every log line: the library's progress and debug lines too (without it, "
               "warnings and errors only: the commands print their own results)")
      ->configurable(false);
  app.parse_complete_callback([&verbose] {
    dmremap::log_to_stderr("dmremap", verbose ? dmremap::LogLevel::kDebug
                                              : dmremap::LogLevel::kWarning);
  });
  dmremap::log_to_stderr("dmremap", dmremap::LogLevel::kWarning);

  FormatOptions fo;
  CLI::App* format = app.add_subcommand(
      "format",
      "Prepare SPARE to hold remaps for MAIN. Refuses a spare that holds a dmremap set or any "
      "non-zero data, unless --force. Main is only read (for its size and serial number).");
  format->add_option("-m,--main", fo.main, "The failing disk this spare will serve")->required();
  add_spare(format, fo.spare);
  format->add_option("-b,--block-size", fo.block_size,
                     "Remap unit in bytes, a power of two from 512 to 65536")
      ->capture_default_str();
  format->add_option("--pending-capacity", fo.pending_capacity,
                     "Unreadable blocks the pending list can hold (default: one per slot)");
  format->add_option("--journal-size", fo.journal_size,
                     "Size of each of the two journal copies, e.g. 1M (default: spare/1024, "
                     "from 256K to 32M)")
      ->transform(CLI::AsSizeValue(false));
  format->add_flag("-f,--force", fo.force, "Format even a spare that holds data or a set");
  format->add_flag("--json", fo.json, "Print the new set's geometry as JSON");
  format->callback([&] { rc = run_format(fo); });

  StatusOptions so;
  CLI::App* status = app.add_subcommand(
      "status",
      "Show a set's health, remaps by cause, pending blocks and spare slots. With --control, "
      "asks the running server, which also knows whether main is online and counts requests; "
      "with --spare alone, reads the spare's metadata (read only; safe while it is served, but "
      "then the figures are as of the last checkpoint).");
  auto* spare_opt =
      status->add_option("-s,--spare", so.spare, "The spare: a file, a block device or an NBD URI");
  auto* control_opt = status->add_option(
      "-c,--control", so.control,
      "The control socket of the server that serves the set (nbdkit control=PATH, "
      "dmremap-server --control PATH)");
  status->add_option("-m,--main", so.main, "Also check that this is the set's main");
  auto* status_format =
      status
          ->add_option("--format", so.format,
                       "text; json; or prometheus: the Prometheus text format, for "
                       "node_exporter's textfile collector (live counters and latency "
                       "only with --control)")
          ->check(CLI::IsMember({"text", "json", "prometheus"}))
          ->capture_default_str();
  status->add_flag_callback("--json", [&so] { so.format = "json"; }, "Same as --format json")
      ->excludes(status_format);
  status->add_option("--warn", so.warn_percent,
                     "Health is 'warning' from this % of slots used (with --spare; a server "
                     "uses its own setting)")
      ->check(CLI::Range(0, 100))
      ->capture_default_str()
      ->excludes(control_opt);
  status->add_option("--watch", so.watch_seconds,
                     "Show it again every SECONDS (on a terminal, in place), until interrupted; "
                     "with --json, one object per line")
      ->check(CLI::Range(0.1, 86400.0));
  status->footer(
      "Exit status, as monitoring plugins read it: 0 health ok, 1 warning, 2 failing (or --main "
      "is not the set's main), 3 unknown (the set cannot be read, or bad usage).");
  status->callback([&] {
    if (spare_opt->count() == 0 && control_opt->count() == 0) {
      throw CLI::ValidationError("status", "name the set: --spare SPARE, or --control SOCKET");
    }
    rc = run_status(so);
  });

  ListOptions lo;
  CLI::App* list = app.add_subcommand(
      "list", "List remapped blocks (with slot and cause), pending blocks and bad slots.");
  add_set_or_control(list, nullptr, lo.spare, lo.control);
  auto* list_format = list->add_option("--format", lo.format,
                   "text; json; or ddrescue: a GNU ddrescue mapfile of main, pending blocks '-', "
                   "every other byte '+' (for ddrescueview, ddrescuelog, nbdkit's ddrescue "
                   "filter)")
      ->check(CLI::IsMember({"text", "json", "ddrescue"}))
      ->capture_default_str();
  list->add_flag_callback("--json", [&lo] { lo.format = "json"; }, "Same as --format json")
      ->excludes(list_format);
  auto* rem = list->add_flag("--remapped", lo.only_remapped, "Only remapped blocks");
  list->add_flag("--pending", lo.only_pending, "Only pending (unreadable) blocks")->excludes(rem);
  list->callback([&] {
    require_set(list, false, lo.spare, {}, lo.control);
    rc = run_list(lo);
  });

  MapOptions mo;
  CLI::App* map = app.add_subcommand(
      "map",
      "Draw the set as an SVG picture: main's blocks as a grid of cells, each in the colour of "
      "the worst block in it (ddrescueview's colours: green healthy, red pending, and one colour "
      "per remap cause), the spare's slot pool as a strip (used, bad, free), and the set's "
      "figures in the title and legend. Open it in a web browser; a damaged cell's tooltip "
      "names its blocks. The same set gives the same bytes.");
  add_set_or_control(map, nullptr, mo.spare, mo.control);
  map->add_option("--svg", mo.svg, "Write the picture to FILE; - for standard output")
      ->required()
      ->type_name("FILE");
  map->add_option("--columns", mo.columns, "Cells in a row, of main's grid and the slot strip")
      ->check(CLI::Range(1u, 512u))
      ->capture_default_str();
  map->add_option("--rows", mo.rows,
                  "Rows of main's grid at most: a cell covers as many blocks as it takes for the "
                  "disk to fit")
      ->check(CLI::Range(1u, 512u))
      ->capture_default_str();
  map->footer("Example: dmremap map --spare /dev/sdc --svg disk.svg");
  map->callback([&] {
    require_set(map, false, mo.spare, {}, mo.control);
    rc = run_map(mo);
  });

  RemapOptions ro;
  CLI::App* remap = app.add_subcommand(
      "remap",
      "Move blocks to the spare now, copying their data when main can read it; an unreadable "
      "block is marked pending and moves on its next write. While the set is served, through "
      "its frontend's --control socket.");
  add_set_or_control(remap, &ro.main, ro.spare, ro.control);
  remap->add_option("block", ro.blocks, "Block numbers (in the set's block size)");
  remap->add_option("--lba", ro.sectors,
                    "Sector numbers, as SMART and the kernel log report them (see --sector-size)");
  remap->add_option("--sector-size", ro.sector_size,
                    "Bytes per sector of those --lba numbers: 512, or 4096 on a 4Kn disk "
                    "(smartctl -i says: 'Sector Size')")
      ->check(CLI::IsMember({512, 1024, 2048, 4096, 8192, 16384, 32768, 65536}))
      ->capture_default_str();
  std::string remap_io = "auto";
  add_io_option(remap, remap_io);
  remap->add_flag_callback("--direct", [&] { remap_io = "direct"; }, "Same as --io direct");
  remap->add_option("--retries", ro.retries, "Extra reads of a failing block")
      ->capture_default_str();
  remap->add_option("--retry-time", ro.retry_seconds,
                    "Seconds of a failing block's own reads after which no new attempt starts")
      ->check(CLI::Range(0.0, 86400.0))
      ->capture_default_str();
  remap->callback([&] {
    require_set(remap, true, ro.spare, ro.main, ro.control);
    if (ro.blocks.empty() && ro.sectors.empty()) {
      throw CLI::ValidationError("remap", "name at least one BLOCK or --lba SECTOR");
    }
    (void)dmremap::parse_io_mode(remap_io, ro.io);
    rc = run_remap(ro);
  });

  ScanOptions sco;
  CLI::App* scan = app.add_subcommand(
      "scan",
      "Surface scan: read every block of main through dmremap, so that weak blocks are "
      "rescued to the spare and dead ones marked pending before a client needs them. While "
      "the set is served, the frontend runs it (--control): it yields to clients, keeps to "
      "--rate, and saves its place on the spare every 30 s, so it goes on after a restart. "
      "Shows progress until it is done; Ctrl-C leaves a served scan running (offline, it "
      "pauses it). Exit 0 when done with nothing unreadable, 1 when blocks were unreadable "
      "or the scan stopped.");
  add_set_or_control(scan, &sco.main, sco.spare, sco.control);
  scan->add_option("--from", sco.from, "Start (again) at this block, instead of going on");
  std::string scan_rate;
  scan->add_option("--rate", scan_rate,
                   "Read at most this many bytes per second: 50M, 1G, 800K (0: no limit); "
                   "given to a running scan, changes its rate");
  auto* pause_flag = scan->add_flag_callback("--pause", [&] { sco.action = "pause"; },
                                             "Pause the running scan (its place is kept)");
  auto* resume_flag = scan->add_flag_callback("--resume", [&] { sco.action = "resume"; },
                                              "Go on with a paused scan")
                          ->excludes(pause_flag);
  auto* cancel_flag = scan->add_flag_callback("--cancel", [&] { sco.action = "cancel"; },
                                              "Cancel the scan")
                          ->excludes(pause_flag)
                          ->excludes(resume_flag);
  scan->add_flag_callback("--status", [&] { sco.action = "status"; },
                          "Show the scan's progress once")
      ->excludes(pause_flag)
      ->excludes(resume_flag)
      ->excludes(cancel_flag);
  scan->add_flag("--detach", sco.detach,
                 "With --control: start it and return; `--status` shows how it goes");
  scan->add_flag("--json", sco.json, "Progress as JSON, one object per line");
  auto* slow_opt =
      scan->add_option("--slow", sco.slow_seconds,
                       "Offline: a block that reads correctly but takes this many seconds (and "
                       "20 times the usual) is rescued, cause slow (a served set uses its "
                       "frontend's slow=)")
          ->check(CLI::Range(0.0, 86400.0));
  std::string scan_io = "auto";
  add_io_option(scan, scan_io);
  scan->callback([&] {
    require_set(scan, true, sco.spare, sco.main, sco.control);
    if (slow_opt->count() > 0 && !sco.control.empty()) {
      throw CLI::ValidationError("--slow", "a served set's scan uses its frontend's slow= setting");
    }
    if (!scan_rate.empty()) {
      sco.rate = parse_rate(scan_rate);
      if (!sco.rate) {
        throw CLI::ValidationError("--rate", "'" + scan_rate + "' is not a rate: 50M, 1G, 800K");
      }
    }
    if (sco.detach && sco.control.empty()) {
      throw CLI::ValidationError("--detach", "only a served set's scan runs without this command");
    }
    (void)dmremap::parse_io_mode(scan_io, sco.io);
    rc = run_scan(sco);
  });

  EvacuateOptions eo;
  CLI::App* evacuate = app.add_subcommand(
      "evacuate",
      "Move the disk's contents onto a new disk (NEW: a file, a block device or an NBD URI) "
      "while it stays in use: the virtual disk, main merged with its remaps, is copied block "
      "by block through dmremap (retries, rescues), and every client write from then on goes "
      "to NEW as well as to the set before it is answered. A block that cannot be read is "
      "written as zeros and listed in the report and a ddrescue mapfile. The place is saved "
      "on the spare every 30 s, so it goes on after a restart or a crash. While the set is "
      "served, its frontend runs it (--control). Exit 0 once NEW is in sync. See "
      "docs/evacuate.md for the whole procedure and the cut-over.");
  add_set_or_control(evacuate, &eo.main, eo.spare, eo.control);
  evacuate->add_option("--to", eo.to, "NEW: the disk to copy onto (path or NBD URI)")
      ->type_name("NEW");
  std::string evac_rate;
  evacuate->add_option("--rate", evac_rate,
                       "Copy at most this many bytes per second: 50M, 1G, 800K (0: no limit); "
                       "given to a running evacuation, changes its rate");
  evacuate->add_flag("--force", eo.force, "NEW may hold data: overwrite it");
  auto* ev_pause = evacuate->add_flag_callback("--pause", [&] { eo.action = "pause"; },
                                               "Pause the copy (writes still go to both disks)");
  auto* ev_resume = evacuate->add_flag_callback("--resume", [&] { eo.action = "resume"; },
                                                "Go on with a paused copy")
                        ->excludes(ev_pause);
  auto* ev_abort = evacuate->add_flag_callback("--abort", [&] { eo.action = "abort"; },
                                               "End the evacuation: NEW is no longer written")
                       ->excludes(ev_pause)
                       ->excludes(ev_resume);
  auto* ev_status = evacuate->add_flag_callback("--status", [&] { eo.action = "status"; },
                                                "Show the evacuation's progress once (exit 0 "
                                                "when in sync or finished)")
                        ->excludes(ev_pause)
                        ->excludes(ev_resume)
                        ->excludes(ev_abort);
  evacuate->add_flag("--verify", eo.verify,
                     "Once in sync, compare NEW with the set block by block (lost blocks are "
                     "skipped). Without --to: follows the evacuation under way, or verifies one in "
                     "sync or finished")
      ->excludes(ev_pause)
      ->excludes(ev_resume)
      ->excludes(ev_abort)
      ->excludes(ev_status);
  evacuate->add_option("--report", eo.report, "Where to write the report")
      ->type_name("FILE")
      ->capture_default_str();
  evacuate->add_option("--mapfile", eo.mapfile,
                       "Where to write the GNU ddrescue mapfile of the blocks NEW does not hold")
      ->type_name("FILE")
      ->capture_default_str();
  evacuate->add_flag("--detach", eo.detach,
                     "With --control: start it and return; `--status` shows how it goes");
  evacuate->add_flag("--json", eo.json, "Progress as JSON, one object per line");
  std::string evac_io = "auto";
  add_io_option(evacuate, evac_io);
  evacuate->callback([&] {
    require_set(evacuate, true, eo.spare, eo.main, eo.control);
    if (!evac_rate.empty()) {
      eo.rate = parse_rate(evac_rate);
      if (!eo.rate) {
        throw CLI::ValidationError("--rate", "'" + evac_rate + "' is not a rate: 50M, 1G, 800K");
      }
    }
    if (eo.detach && eo.control.empty()) {
      throw CLI::ValidationError("--detach", "only a served set's evacuation runs without this "
                                             "command");
    }
    (void)dmremap::parse_io_mode(evac_io, eo.io);
    rc = run_evacuate(eo);
  });

  ForgetPendingOptions fpo;
  CLI::App* forget = app.add_subcommand(
      "forget-pending",
      "Clear wrong pending marks: each named block (or --all) that main reads now stops being "
      "pending and is served from main again; a block that still fails keeps its mark. For "
      "marks left by an outage that older versions took for bad sectors, or sectors that "
      "recovered. While the set is served, through its frontend's --control socket. Exit 1 when "
      "a block is still unreadable.");
  add_set_or_control(forget, &fpo.main, fpo.spare, fpo.control);
  forget->add_option("block", fpo.blocks, "Pending block numbers (in the set's block size)");
  forget->add_flag("--all", fpo.all, "Every pending block");
  std::string forget_io = "auto";
  add_io_option(forget, forget_io);
  forget->callback([&] {
    require_set(forget, true, fpo.spare, fpo.main, fpo.control);
    if (fpo.blocks.empty() && !fpo.all) {
      throw CLI::ValidationError("forget-pending", "name at least one BLOCK, or --all");
    }
    (void)dmremap::parse_io_mode(forget_io, fpo.io);
    rc = run_forget_pending(fpo);
  });

  ImportOptions io;
  CLI::App* import = app.add_subcommand(
      "import",
      "Mark the blocks another tool found bad as known bad (pending), without reading them, so "
      "that no read waits on them: a GNU ddrescue mapfile, a badblocks list or a list of LBAs. "
      "Their data is taken as lost; the next write to each gives it a slot, and forget-pending "
      "clears a mark whose block reads after all. While the set is served, through its "
      "frontend's --control socket.");
  add_set_or_control(import, &io.main, io.spare, io.control);
  std::string import_ddrescue, import_badblocks, import_lba;
  auto* from_ddrescue = import->add_option(
      "--ddrescue", import_ddrescue, "A GNU ddrescue mapfile ('-': standard input)");
  auto* from_badblocks = import->add_option(
      "--badblocks", import_badblocks,
      "badblocks' output: one block number per line, in --block-size units");
  auto* from_lba = import->add_option("--lba-list", import_lba,
                                      "One LBA per line (decimal, or hex with 0x), in "
                                      "--sector-size units");
  from_ddrescue->excludes(from_badblocks)->excludes(from_lba);
  from_badblocks->excludes(from_lba);
  uint64_t import_unit = 0;
  auto* bb_size = import->add_option("--block-size", import_unit,
                                     "badblocks: the -b it was run with (its default is 1024)");
  auto* sector_size = import->add_option("--sector-size", import_unit,
                                         "LBA list: bytes per sector (512, or 4096 on a 4Kn disk)");
  bb_size->needs(from_badblocks)->check(CLI::Range(uint64_t{1}, uint64_t{1} << 30));
  sector_size->needs(from_lba)->check(
      CLI::IsMember({512, 1024, 2048, 4096, 8192, 16384, 32768, 65536}));
  import->add_option("--ddrescue-status", io.list.statuses,
                     "ddrescue: the statuses taken as bad: '-' (bad sector), and '*' "
                     "(non-trimmed) and '/' (non-scraped) if given")
      ->needs(from_ddrescue)
      ->check([](const std::string& v) -> std::string {
        if (v.empty() || v.find_first_not_of("-*/") != std::string::npos) {
          return "a set of the characters - * /";
        }
        return "";
      })
      ->capture_default_str();
  import->add_flag("--dry-run", io.dry_run, "Say which blocks it would mark; mark nothing");
  import->add_flag("--json", io.json, "The result as JSON");
  std::string import_io = "auto";
  add_io_option(import, import_io);
  import->callback([&] {
    require_set(import, true, io.spare, io.main, io.control);
    if (from_ddrescue->count() > 0) {
      io.list.format = dmremap::BadListFormat::kDdrescue;
      io.file = import_ddrescue;
    } else if (from_badblocks->count() > 0) {
      if (bb_size->count() == 0) {
        throw CLI::ValidationError("--badblocks",
                                   "give --block-size, the -b badblocks ran with (1024 if none)");
      }
      io.list.format = dmremap::BadListFormat::kBadblocks;
      io.file = import_badblocks;
    } else if (from_lba->count() > 0) {
      if (sector_size->count() == 0) {
        throw CLI::ValidationError("--lba-list", "give --sector-size: 512, or 4096 on a 4Kn disk");
      }
      io.list.format = dmremap::BadListFormat::kLba;
      io.file = import_lba;
    } else {
      throw CLI::ValidationError("import", "give --ddrescue, --badblocks or --lba-list FILE");
    }
    io.list.unit = import_unit;
    (void)dmremap::parse_io_mode(import_io, io.io);
    rc = run_import(io);
  });

  CheckOptions co;
  CLI::App* check = app.add_subcommand(
      "check",
      "Verify the spare's metadata: superblocks, checkpoint, both journal copies, slot "
      "use. Says what is wrong; exits 1 if anything is.");
  add_spare(check, co.spare);
  check->add_option("-m,--main", co.main, "Also check that this is the set's main");
  check->add_flag("--json", co.json, "Machine-readable output");
  check->callback([&] { rc = run_check(co); });

  UpgradeOptions uo;
  CLI::App* upgrade = app.add_subcommand(
      "upgrade",
      "Rewrite a spare of format version 1 as version 2 (mirrored checkpoints, slot headers), in "
      "place and crash-safely: a cut at any point leaves a set that opens. Takes the space from "
      "the end of the slot pool, whose slots must be unused. Needs the set not to be served.");
  add_spare(upgrade, uo.spare);
  upgrade->callback([&] { rc = run_upgrade(uo); });

  RebuildOptions bo;
  CLI::App* rebuild = app.add_subcommand(
      "rebuild",
      "Recover a spare whose metadata does not open. With only the superblocks lost, from the "
      "checkpoint and journal: everything comes back. With those lost too, from the slot "
      "headers: every remapped block comes back, pending marks do not (those blocks fail on "
      "main again when read). Refuses metadata that opens, unless --force. Needs the set not to "
      "be served.");
  add_spare(rebuild, bo.spare);
  rebuild->add_flag("-f,--force", bo.force, "Rebuild even metadata that opens");
  rebuild->add_flag("--json", bo.json, "Machine-readable output");
  rebuild->callback([&] { rc = run_rebuild(bo); });

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    // status speaks the monitoring plugins' language: 3 is unknown.
    for (const CLI::App* sub : app.get_subcommands()) {
      if (sub->get_name() == "status") return dmremap::cli::kStatusUnknown;
    }
    return 2;
  } catch (const std::exception& e) {
    fmt::print(stderr, "dmremap: {}\n", e.what());
    for (const CLI::App* sub : app.get_subcommands()) {
      if (sub->get_name() == "status") return dmremap::cli::kStatusUnknown;
    }
    return 1;
  }
  return rc;
}
