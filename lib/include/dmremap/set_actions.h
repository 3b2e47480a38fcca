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

namespace dmremap {

// A page of the list: blocks from `from` on, at most `limit` entries.
struct ListQuery {
  uint64_t from = 0;
  uint64_t limit = 100000;
  bool remapped = true;
  bool pending = true;
};

// {"main_size", "block_size", "remaps": [{block, offset, slot, spare_offset, cause}],
//  "pending": [{block, offset}], "bad_slots": [...],
//  "next": the block to ask from for the next page, or null at the end}.
Json list_json(Engine& engine, const ListQuery& q);
Json list_json(const RemapTable& table, const Superblock& sb, const ListQuery& q);
// A ListQuery from a control request's "from", "limit", "remapped" and
// "pending" (ControlError when they are not what they should be).
ListQuery list_query(const Json& request);

// Remaps each block (Engine::remap_block): {"results": [{"block", "result"}]}
// where result is "remapped" (data copied), "already", "pending" (main
// cannot read it: marked, the next write gives it a slot), "past_end", or
// "failed" with "error" and "errno".
Json remap_json(Engine& engine, const std::vector<uint64_t>& blocks);

// Engine::forget_pending for the listed blocks, or every pending block with
// `all`: {"cleared": [...], "kept": [...], "none_pending": bool}. A failure
// of the whole command throws ControlError.
Json forget_pending_json(Engine& engine, std::vector<uint64_t> blocks, bool all);

}  // namespace dmremap
