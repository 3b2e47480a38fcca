// What `dmremap list`, `remap` and `forget-pending` do, written once: on an
// engine (the set served by this process, or opened by the CLI) or, for
// list, on the table read from a spare that nobody serves. The results are
// JSON, so that the control channel and the CLI give the same answers; the
// CLI prints them for people.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "dmremap/control.h"
#include "dmremap/engine.h"
#include "dmremap/metadata.h"
#include "dmremap/remap_table.h"
#include "dmremap/evacuate.h"
#include "dmremap/scan.h"

namespace dmremap {

// A page holds at most this many entries, whatever `limit` asks for: a
// reply is built in memory, and the caller pages on with "next".
constexpr uint64_t kMaxListLimit = 65536;

// A page of the list: blocks from `from` on, at most `limit` entries.
struct ListQuery {
  uint64_t from = 0;
  uint64_t limit = 10000;
  bool remapped = true;
  bool pending = true;
};

// {"main_size", "block_size", "remaps": [{block, offset, slot, spare_offset, cause, time}],
//  "pending": [{block, offset, time}], "bad_slots": [...] (on the page from
//  block 0 only), "next": the block to ask from for the next page, or null at
//  the end}. `time` is when the block was remapped or marked, in seconds since
//  1970, or null when that is not known. Offline, the times of remaps are read
//  from `spare` (none without it).
Json list_json(Engine& engine, const ListQuery& q);
Json list_json(const RemapTable& table, const Superblock& sb, BlockDevice* spare,
               const ListQuery& q);
// A ListQuery from a control request's "from", "limit", "remapped" and
// "pending" (ControlError when they are not what they should be).
ListQuery list_query(const Json& request);

// Remaps each block (Engine::remap_block): {"results": [{"block", "result"}]}
// where result is "remapped" (data copied), "already", "pending" (main
// cannot read it: marked, the next write gives it a slot), "past_end",
// "failed" with "error" and "errno", or "untried": `stopping` (asked before
// each block; a block's retries can take many seconds on a real disk) said
// stop before it.
Json remap_json(Engine& engine, const std::vector<uint64_t>& blocks,
                const std::function<bool()>& stopping = {});

// Engine::forget_pending for the listed blocks, or every pending block with
// `all`: {"cleared", "kept", "moved" (a write gave it a slot meanwhile),
// "untried" (stopped before it): [...], "none_pending": bool}. A failure of
// the whole command throws ControlError.
Json forget_pending_json(Engine& engine, std::vector<uint64_t> blocks, bool all,
                         const std::function<bool()>& stopping = {});

// Engine::mark_known_bad (dmremap import): {"marked", "already",
// "untried"}, counts of blocks. A failure throws ControlError, whose
// message says how many were marked before it (they stay marked). With
// `check_only`, nothing is marked: {"fresh", "room"}
// (Engine::known_bad_room).
Json import_json(Engine& engine, const std::vector<uint64_t>& blocks, bool check_only = false,
                 const std::function<bool()>& stopping = {});

// The scan's progress as JSON: {"state", "next_block", "blocks",
// "block_size", "percent", "rate_limit", "rate", "eta_seconds",
// "started", "last_good_read", "unreadable", "rescued", "yields", "error"}.
Json scan_progress_json(const ScanProgress& p);
// A "scan" request: "action" is status (the default), start ("from",
// "rate"), pause, resume, cancel or rate ("rate"); the reply is the
// progress after it. ControlError when the action is refused.
Json scan_json(Scanner& scanner, const Json& request);

// An evacuation's progress, as `dmremap evacuate --status --json` prints it.
Json evac_progress_json(const EvacProgress& p);
// The same from the record a spare keeps (a set not served): what was
// saved, without the live figures.
EvacProgress saved_evac_progress(const EvacRecord& r, uint64_t blocks, uint32_t block_size);
// The control channel's "evacuate" command: "action" status (the default),
// start ("to", "rate", "force"), pause, resume, abort, rate, lost (the
// blocks NEW does not hold) and verify (long work: compares NEW with the
// set). Failures throw ControlError.
ControlReply evacuate_json(Evacuator& evacuator, const Json& request);
// A verification's result.
Json evac_verify_json(const EvacVerify& v);

}  // namespace dmremap
