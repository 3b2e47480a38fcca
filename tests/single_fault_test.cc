// No single fault in the spare's metadata loses anything (issue "the spare
// survives its own bad sectors"; docs/behaviour.md, durability rules 5-6).
//
// Every 4 KiB unit of the metadata of a set with remaps both in its
// checkpoint and in its journal is made, in turn, unreadable, unwritable,
// and garbage, with the set crashed (its journal to replay) or closed
// cleanly. Each time the set must open, list every remap and pending
// block, read every block's data, take a new remap, and open again after a
// crash with the fault still there.
#include <catch2/catch.hpp>

#include <map>
#include <random>

#include "dmremap/metadata_store.h"
#include "test_util.h"

using namespace dmremap;

namespace {
constexpr uint32_t B = 4096;

struct Unit {
  std::string name;
  uint64_t offset;
};

// Every metadata unit of the set, named.
std::vector<Unit> metadata_units(const Superblock& sb) {
  std::vector<Unit> units;
  for (int c = 0; c < 2; ++c) units.push_back({"superblock " + std::to_string(c), kSuperblockOffset[c]});
  for (int area = 0; area < 2; ++area) {
    for (int copy = 0; copy < 2; ++copy) {
      for (uint64_t u = 0; u < sb.checkpoint_bytes / kMetaUnit; ++u) {
        units.push_back({"checkpoint " + std::to_string(area) + " copy " + std::to_string(copy) +
                             " unit " + std::to_string(u),
                         sb.checkpoint_at(area, copy) + u * kMetaUnit});
      }
    }
  }
  for (int copy = 0; copy < 2; ++copy) {
    for (uint64_t u = 0; u < sb.journal_units(); ++u) {
      units.push_back({"journal copy " + std::to_string(copy) + " unit " + std::to_string(u),
                       sb.journal_offset[copy] + u * kMetaUnit});
    }
  }
  for (uint64_t u = 0; u < sb.slot_header_bytes / kMetaUnit; ++u) {
    units.push_back({"slot header unit " + std::to_string(u), sb.slot_header_offset + u * kMetaUnit});
  }
  return units;
}

std::map<uint64_t, uint64_t> table_of(Engine& e) {
  std::map<uint64_t, uint64_t> m;
  e.for_each_entry(0, ~uint64_t{0} / 2, [&](const RemapTable::Entry& en) { m[en.block] = en.value; });
  return m;
}

struct Populated {
  test::Set set;
  std::map<uint64_t, std::vector<char>> data;  // what each block must read
  std::map<uint64_t, uint64_t> table;
};

// Remaps in the checkpoint (then a clean close), more remaps and a pending
// block in the journal, then a crash (the journal is replayed at the next
// open), or a clean close (nothing to replay: the open only marks the set
// in use).
Populated populate(bool crash = true) {
  test::SetParams p;
  p.journal_bytes = 4 * kMetaUnit;
  Populated out{test::make_set(p), {}, {}};
  test::Set& s = out.set;
  auto write = [&](uint64_t block, uint64_t seed) {
    out.data[block] = test::pattern(B, seed);
    REQUIRE(s.engine->write(out.data[block].data(), B, block * B, false).is_ok());
  };
  for (uint64_t b : {3u, 4u, 5u, 70u, 71u, 72u}) s.main->add_write_error(b);
  write(3, 1);
  write(4, 2);
  write(5, 3);
  REQUIRE(s.engine->close().is_ok());
  test::reopen(s);
  write(70, 4);
  write(71, 5);
  write(72, 6);
  s.main->add_read_error(80);
  std::vector<char> buf(B);
  REQUIRE(s.engine->read(buf.data(), B, 80 * B).code() == EIO);
  // Healthy neighbours, on main.
  out.data[6] = test::pattern(B, 7);
  REQUIRE(s.engine->write(out.data[6].data(), B, 6 * B, false).is_ok());
  REQUIRE(s.engine->flush().is_ok());
  out.table = table_of(*s.engine);
  REQUIRE(out.table.size() == 7);
  if (!crash) REQUIRE(s.engine->close().is_ok());
  s.engine.reset();
  return out;
}

enum class Fault { kUnreadable, kUnwritable, kGarbage };
const char* fault_name(Fault f) {
  switch (f) {
    case Fault::kUnreadable: return "unreadable";
    case Fault::kUnwritable: return "unwritable";
    case Fault::kGarbage: return "garbage";
  }
  return "?";
}

void apply(Fault f, test::Set& s, uint64_t offset, uint64_t seed) {
  switch (f) {
    case Fault::kUnreadable:
      for (uint64_t sec = 0; sec < kMetaUnit / 512; ++sec) s.spare->add_read_error(offset / 512 + sec);
      break;
    case Fault::kUnwritable:
      s.spare->add_write_error(offset / 512 + seed % 8);
      break;
    case Fault::kGarbage: {
      std::mt19937_64 rng(seed);
      std::vector<char> junk(kMetaUnit);
      for (auto& c : junk) c = static_cast<char>(rng());
      REQUIRE(s.spare_mem->write(junk.data(), kMetaUnit, offset).is_ok());
      break;
    }
  }
}

void expect_whole(Populated& p, const std::string& when) {
  INFO(when);
  CHECK(table_of(*p.set.engine) == p.table);
  for (const auto& [block, bytes] : p.data) {
    std::vector<char> got(B);
    const Status s = p.set.engine->read(got.data(), B, block * B);
    INFO("block " << block << ": " << s.to_string());
    REQUIRE(s.is_ok());
    CHECK(got == bytes);
  }
  std::vector<char> got(B);
  CHECK(p.set.engine->read(got.data(), B, 80 * B).code() == EIO);  // still pending
}
}  // namespace

TEST_CASE("single faults: every metadata unit unreadable, unwritable or garbage loses nothing",
          "[journal][durability][single-fault]") {
  const Superblock sb = [] {
    Populated p = populate();
    auto f = read_superblock(*p.set.spare_mem);
    REQUIRE(f.is_ok());
    return f->sb;
  }();
  const auto units = metadata_units(sb);
  uint64_t cases = 0;
  uint64_t degraded = 0;
  for (size_t i = 0; i < units.size(); ++i) {
   for (bool crash : {true, false}) {
    for (Fault f : {Fault::kUnreadable, Fault::kUnwritable, Fault::kGarbage}) {
      const std::string what = units[i].name + " " + fault_name(f) +
                               (crash ? ", after a crash" : ", after a clean close");
      INFO(what);
      Populated p = populate(crash);
      apply(f, p.set, units[i].offset, i + 1);
      auto e = Engine::open(p.set.main, p.set.spare, EngineOptions{});
      INFO(e.status().to_string());
      REQUIRE(e.is_ok());
      p.set.engine = std::move(e.value());
      expect_whole(p, "after the fault");
      // It keeps serving: a new remap, then a crash and an open with the
      // fault still there.
      p.set.main->add_write_error(90);
      p.data[90] = test::pattern(B, 90);
      REQUIRE(p.set.engine->write(p.data[90].data(), B, 90 * B, false).is_ok());
      REQUIRE(p.set.engine->flush().is_ok());
      p.table = table_of(*p.set.engine);
      const EngineStats st = p.set.engine->stats();
      CHECK(st.health != Health::kFailing);
      if (!st.metadata_degraded.empty()) ++degraded;
      p.set.engine.reset();
      auto again = Engine::open(p.set.main, p.set.spare, EngineOptions{});
      INFO(again.status().to_string());
      REQUIRE(again.is_ok());
      p.set.engine = std::move(again.value());
      expect_whole(p, "after a crash and a reopen");
      if (f == Fault::kGarbage) {
        // Garbage is repaired by the writes since: check finds nothing.
        const CheckReport c = check_metadata(p.set.spare);
        INFO((c.problems.empty() ? std::string() : c.problems.front()));
        CHECK(c.problems.empty());
      }
      ++cases;
    }
   }
  }
  CHECK(cases == units.size() * 3 * 2);
  WARN("single faults: " << units.size() << " units x 3 faults x 2 starts (crashed, closed) = "
                         << cases << " cases passed; " << degraded << " ran degraded");
}
