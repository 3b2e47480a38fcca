#include "dmremap/set_actions.h"

#include <algorithm>
#include <cerrno>
#include <string>

#include "dmremap/metadata_store.h"

namespace dmremap {

namespace {

// The entries of a page and the one after it (the next page's first), as
// Engine::entries gives them.
using Fetch = std::function<std::vector<RemapTable::Entry>(
    uint64_t from, size_t max, const std::function<bool(const RemapTable::Entry&)>& want)>;

// A time for JSON: seconds since 1970, null when not known.
Json when(uint64_t t) { return t == 0 ? Json(nullptr) : Json(t); }

Json page(uint64_t main_size, uint32_t block_size,
          const std::function<std::vector<uint64_t>()>& bad_slots,
          const std::function<uint64_t(uint64_t)>& spare_offset,
          const std::function<std::vector<uint64_t>(const std::vector<uint64_t>&)>& slot_times,
          const ListQuery& q, const Fetch& fetch) {
  const auto want = [&](const RemapTable::Entry& e) {
    return RemapTable::is_pending(e.value) ? q.pending : q.remapped;
  };
  const size_t limit = static_cast<size_t>(std::min<uint64_t>(q.limit, kMaxListLimit));
  std::vector<RemapTable::Entry> entries = fetch(q.from, limit + 1, want);
  Json next = nullptr;
  if (entries.size() > limit) {
    next = entries[limit].block;
    entries.resize(limit);
  }
  // Built with no lock held. A remap's time is in its slot's header.
  std::vector<uint64_t> slots;
  for (const RemapTable::Entry& e : entries) {
    if (!RemapTable::is_pending(e.value)) slots.push_back(RemapTable::slot_of(e.value));
  }
  const std::vector<uint64_t> times = slot_times(slots);
  Json remaps = Json::array();
  Json pending = Json::array();
  size_t r = 0;
  for (const RemapTable::Entry& e : entries) {
    const uint64_t offset = e.block * block_size;
    if (RemapTable::is_pending(e.value)) {
      pending.push_back(
          {{"block", e.block}, {"offset", offset}, {"time", when(RemapTable::pending_time(e.value))}});
    } else {
      const uint64_t slot = RemapTable::slot_of(e.value);
      remaps.push_back({{"block", e.block},
                        {"offset", offset},
                        {"slot", slot},
                        {"spare_offset", spare_offset(slot)},
                        {"cause", cause_name(RemapTable::cause_of(e.value))},
                        {"time", when(times[r++])}});
    }
  }
  Json j;
  j["main_size"] = main_size;
  j["block_size"] = block_size;
  j["remaps"] = std::move(remaps);
  j["pending"] = std::move(pending);
  // Once, on the first page.
  if (q.from == 0) j["bad_slots"] = bad_slots();
  j["next"] = next;
  return j;
}

}  // namespace

Json list_json(Engine& engine, const ListQuery& q) {
  return page(
      engine.size(), engine.block_size(), [&] { return engine.bad_slots(); },
      [&](uint64_t slot) { return engine.slot_spare_offset(slot); },
      [&](const std::vector<uint64_t>& slots) { return engine.slot_times(slots); }, q,
      [&](uint64_t from, size_t max, const std::function<bool(const RemapTable::Entry&)>& want) {
        return engine.entries(from, max, want);
      });
}

Json list_json(const RemapTable& table, const Superblock& sb, BlockDevice* spare,
               const ListQuery& q) {
  return page(
      sb.main_size, sb.block_size, [&] { return table.bad_slots(); },
      [&](uint64_t slot) { return sb.slot_offset + slot * sb.block_size; },
      [&](const std::vector<uint64_t>& slots) {
        return spare ? read_slot_times(*spare, sb, slots) : std::vector<uint64_t>(slots.size(), 0);
      },
      q,
      [&](uint64_t from, size_t max, const std::function<bool(const RemapTable::Entry&)>& want) {
        std::vector<RemapTable::Entry> out;
        table.for_range(from, ~uint64_t{0}, [&](const RemapTable::Entry& e) {
          if (want(e)) out.push_back(e);
          return out.size() < max;
        });
        return out;
      });
}

ListQuery list_query(const Json& request) {
  ListQuery q;
  auto number = [&](const char* key, uint64_t& out) {
    if (!request.contains(key)) return;
    if (!request[key].is_number_unsigned()) {
      throw ControlError{EINVAL, std::string("\"") + key + "\" must be a block number"};
    }
    out = request[key].get<uint64_t>();
  };
  auto flag = [&](const char* key, bool& out) {
    if (!request.contains(key)) return;
    if (!request[key].is_boolean()) throw ControlError{EINVAL, std::string("\"") + key + "\" must be true or false"};
    out = request[key].get<bool>();
  };
  number("from", q.from);
  number("limit", q.limit);
  flag("remapped", q.remapped);
  flag("pending", q.pending);
  if (q.limit == 0) throw ControlError{EINVAL, "\"limit\" must be at least 1"};
  return q;
}

Json remap_json(Engine& engine, const std::vector<uint64_t>& blocks,
                const std::function<bool()>& stopping) {
  const uint64_t end = engine.size() / engine.block_size();
  Json results = Json::array();
  bool stopped = false;
  for (const uint64_t b : blocks) {
    Json r{{"block", b}};
    stopped = stopped || (stopping && stopping());
    if (stopped) {
      r["result"] = "untried";
      results.push_back(std::move(r));
      continue;
    }
    if (b >= end) {
      r["result"] = "past_end";
      r["error"] = "block " + std::to_string(b) + " is past the end (main has " +
                   std::to_string(end) + " blocks)";
      results.push_back(std::move(r));
      continue;
    }
    const Status s = engine.remap_block(b);
    bool pending = false;
    if (s.code() == EIO) {
      engine.for_each_entry(b, b + 1, [&](const RemapTable::Entry& e) {
        pending = RemapTable::is_pending(e.value);
      });
    }
    if (s.is_ok()) {
      r["result"] = "remapped";
    } else if (s.code() == EEXIST) {
      r["result"] = "already";
    } else if (pending) {
      r["result"] = "pending";
    } else {
      r["result"] = "failed";
      r["errno"] = s.code();
      r["error"] = s.to_string();
    }
    results.push_back(std::move(r));
  }
  return Json{{"results", std::move(results)}};
}

Json forget_pending_json(Engine& engine, std::vector<uint64_t> blocks, bool all,
                         const std::function<bool()>& stopping) {
  if (all) {
    engine.for_each_entry(0, ~uint64_t{0}, [&](const RemapTable::Entry& e) {
      if (RemapTable::is_pending(e.value)) blocks.push_back(e.block);
    });
  }
  Json j;
  j["none_pending"] = all && blocks.empty();
  Engine::ForgetResult r;
  if (!blocks.empty()) {
    const Status s = engine.forget_pending(blocks, /*listed=*/!all, r, stopping);
    if (!s.is_ok()) throw ControlError{s.code(), s.to_string()};
  }
  j["cleared"] = r.cleared;
  j["kept"] = r.kept;
  j["moved"] = r.moved;
  j["untried"] = r.untried;
  return j;
}

Json import_json(Engine& engine, const std::vector<uint64_t>& blocks, bool check_only,
                 const std::function<bool()>& stopping) {
  if (check_only) {
    const Engine::KnownBadRoom r = engine.known_bad_room(blocks);
    return Json{{"fresh", r.fresh}, {"room", r.room}};
  }
  Engine::KnownBadResult r;
  const Status s = engine.mark_known_bad(blocks, r, stopping);
  if (!s.is_ok()) {
    // An error reply, as every command's; what was done before it is said.
    throw ControlError{s.code(), s.to_string() + " (" + std::to_string(r.marked) +
                                     " block(s) marked before it stay marked, " +
                                     std::to_string(r.untried) + " not tried)"};
  }
  return Json{{"marked", r.marked}, {"already", r.already}, {"untried", r.untried}};
}

namespace {
// A request's "rate" (bytes per second, 0: no limit), or `current`.
uint64_t rate_of(const Json& request, uint64_t current) {
  if (!request.contains("rate")) return current;
  if (!request["rate"].is_number_unsigned()) {
    throw ControlError{EINVAL, "\"rate\" must be bytes per second (0: no limit)"};
  }
  return request["rate"].get<uint64_t>();
}
}  // namespace

Json scan_progress_json(const ScanProgress& p) {
  Json j;
  j["state"] = scan_state_name(p.state);
  j["next_block"] = p.next_block;
  j["blocks"] = p.blocks;
  j["block_size"] = p.block_size;
  j["percent"] = p.blocks == 0 ? 0.0 : 100.0 * static_cast<double>(p.next_block) /
                                           static_cast<double>(p.blocks);
  j["rate_limit"] = p.rate_limit;
  j["rate"] = p.rate;
  j["eta_seconds"] = p.eta_seconds;
  j["started"] = p.started;
  j["last_good_read"] = p.last_good_read;
  j["unreadable"] = p.unreadable;
  j["rescued"] = p.rescued;
  j["yields"] = p.yields;
  j["error"] = p.error;
  return j;
}

Json scan_json(Scanner& scanner, const Json& request) {
  const std::string action = request.value("action", std::string("status"));
  auto rate = [&] { return rate_of(request, scanner.progress().rate_limit); };
  Status s;
  if (action == "start") {
    std::optional<uint64_t> from;
    if (request.contains("from")) {
      if (!request["from"].is_number_unsigned()) {
        throw ControlError{EINVAL, "\"from\" must be a block number"};
      }
      from = request["from"].get<uint64_t>();
    }
    s = scanner.start(from, rate());
  } else if (action == "pause") {
    s = scanner.pause();
  } else if (action == "resume") {
    s = scanner.resume();
  } else if (action == "cancel") {
    s = scanner.cancel();
  } else if (action == "rate") {
    s = scanner.set_rate(rate());
  } else if (action != "status") {
    throw ControlError{EINVAL, "unknown scan action \"" + action +
                                   "\" (status, start, pause, resume, cancel, rate)"};
  }
  if (!s.is_ok()) throw ControlError{s.code(), s.to_string()};
  return scan_progress_json(scanner.progress());
}

Json evac_progress_json(const EvacProgress& p) {
  Json j;
  j["state"] = evac_state_name(p.state);
  j["target"] = p.target;
  j["target_size"] = p.target_size;
  j["next_block"] = p.next_block;
  j["blocks"] = p.blocks;
  j["block_size"] = p.block_size;
  j["percent"] = p.blocks == 0 ? 0.0 : 100.0 * static_cast<double>(p.next_block) /
                                           static_cast<double>(p.blocks);
  j["rate_limit"] = p.rate_limit;
  j["rate"] = p.rate;
  j["eta_seconds"] = p.eta_seconds;
  j["started"] = p.started;
  j["synced"] = p.synced;
  j["lost"] = p.lost;
  j["resync_regions"] = p.resync_regions;
  j["region_blocks"] = p.region_blocks;
  j["mirrored"] = p.mirrored;
  j["waiting_for_main"] = p.waiting_for_main;
  j["new_away"] = p.target_away;
  j["error"] = p.error;
  return j;
}

EvacProgress saved_evac_progress(const EvacRecord& r, uint64_t blocks, uint32_t block_size) {
  EvacProgress p;
  p.state = r.state <= static_cast<uint32_t>(EvacState::kFinished) ? static_cast<EvacState>(r.state)
                                                                   : EvacState::kNone;
  p.target = r.target;
  p.target_size = r.target_size;
  p.next_block = std::min(r.cursor, blocks);
  p.blocks = blocks;
  p.block_size = block_size;
  p.rate_limit = r.rate;
  p.started = static_cast<int64_t>(r.started);
  p.synced = static_cast<int64_t>(r.synced);
  p.lost = r.lost;
  p.region_blocks = r.region_blocks;
  for (uint8_t byte : r.intent) {
    p.resync_regions += static_cast<uint64_t>(__builtin_popcount(byte));
  }
  return p;
}

Json evac_verify_json(const EvacVerify& v) {
  return Json{{"compared", v.compared}, {"lost", v.lost},         {"differ_count", v.differ_count},
              {"differ", v.differ},     {"stopped", v.stopped}};
}

ControlReply evacuate_json(Evacuator& evacuator, const Json& request) {
  const Json& a = request.contains("action") ? request["action"] : Json("status");
  if (!a.is_string()) throw ControlError{EINVAL, "\"action\" must be a string"};
  const std::string action = a.get<std::string>();
  auto rate = [&] { return rate_of(request, evacuator.progress().rate_limit); };
  Status s;
  if (action == "start") {
    EvacStart how;
    if (!request.contains("to") || !request["to"].is_string()) {
      throw ControlError{EINVAL, "\"to\" must name NEW: a path or an NBD URI"};
    }
    how.target = request["to"].get<std::string>();
    how.rate = request.contains("rate") ? rate() : 0;
    how.force = request.contains("force") && request["force"] == true;
    s = evacuator.start(how);
  } else if (action == "pause") {
    s = evacuator.pause();
  } else if (action == "resume") {
    s = evacuator.resume();
  } else if (action == "abort") {
    s = evacuator.abort();
  } else if (action == "rate") {
    s = evacuator.set_rate(rate());
  } else if (action == "lost") {
    Json j = evac_progress_json(evacuator.progress());
    j["lost_blocks"] = evacuator.lost_blocks();
    return j;
  } else if (action == "verify") {
    return ControlReply::later([&evacuator](const std::function<bool()>& stopping) {
      auto v = evacuator.verify(stopping);
      if (!v.is_ok()) throw ControlError{v.status().code(), v.status().message()};
      return evac_verify_json(v.value());
    });
  } else if (action != "status") {
    throw ControlError{EINVAL, "unknown evacuate action \"" + action +
                                   "\" (status, start, pause, resume, abort, rate, lost, verify)"};
  }
  if (!s.is_ok()) throw ControlError{s.code(), s.message()};
  return evac_progress_json(evacuator.progress());
}

}  // namespace dmremap
