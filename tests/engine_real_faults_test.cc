// docs/behaviour.md, reads rule 7 (a device failure is not a bad block),
// writes rule 5 (no write error is lost) and the faults of issue "real failing
// disks": main gone and back, weak blocks that fail once, a spare slot that
// fails inside a read, errors reported only at writeback.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>

#include "dmremap/file_device.h"
#include "dmremap/log.h"
#include "dmremap/metadata_store.h"
#include "recording_device.h"
#include "test_util.h"

using namespace dmremap;

namespace {
constexpr uint32_t B = 4096;

// Tests try main again at once instead of after a real backoff.
EngineOptions quick_reconnect() {
  EngineOptions o;
  o.reconnect_first = std::chrono::milliseconds(0);
  o.reconnect_max = std::chrono::milliseconds(0);
  return o;
}

// Main comes back through the engine's own thread: wait for it.
void wait_online(Engine& e) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (e.stats().main_offline_since != 0) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

test::Set set_with_remap(const EngineOptions& o, uint64_t remapped_block,
                         const std::vector<char>& data) {
  test::SetParams p;
  p.options = o;
  auto s = test::make_set(p);
  s.main->add_write_error(remapped_block);
  REQUIRE(s.engine->write(data.data(), B, remapped_block * B, false).is_ok());
  s.main->clear_faults();
  REQUIRE(s.engine->stats().remaps == 1);
  return s;
}
}  // namespace

TEST_CASE("reads 7: main gone (plain EIO) is a device failure: nothing marked, spare still served",
          "[engine][offline]") {
  const auto kept = test::pattern(B, 7);
  auto s = set_with_remap(quick_reconnect(), 3, kept);
  const auto before = test::pattern(B, 8);
  REQUIRE(s.engine->write(before.data(), B, 10 * B, false).is_ok());
  REQUIRE(s.engine->flush().is_ok());  // nothing unflushed when main goes
  std::vector<char> buf(B);

  s.main->set_gone(EIO);
  // 10 reads and 20 writes, as a client that goes on during an outage.
  for (uint64_t b = 20; b < 30; ++b) {
    const Status r = s.engine->read(buf.data(), B, b * B);
    CHECK(r.code() == EIO);
    CHECK_THAT(r.message(), Catch::Contains("main offline"));
  }
  for (uint64_t b = 40; b < 60; ++b) {
    const auto d = test::pattern(B, b);
    CHECK(s.engine->write(d.data(), B, b * B, false).code() == EIO);
  }
  auto st = s.engine->stats();
  CHECK(st.pending == 0);
  CHECK(st.remaps == 1);
  CHECK(st.main_offline_since != 0);
  CHECK(st.health == Health::kFailing);
  CHECK_THAT(st.health_reason, Catch::Contains("main offline since"));
  // The remapped block lives on the spare: still served.
  REQUIRE(s.engine->read(buf.data(), B, 3 * B).is_ok());
  CHECK(buf == kept);
  // A write to it goes to its slot.
  const auto newer = test::pattern(B, 9);
  CHECK(s.engine->write(newer.data(), B, 3 * B, false).is_ok());

  s.main->set_back();
  wait_online(*s.engine);
  REQUIRE(s.engine->read(buf.data(), B, 10 * B).is_ok());
  CHECK(buf == before);
  CHECK(s.main->reconnects() >= 1);
  st = s.engine->stats();
  CHECK(st.main_offline_since == 0);
  CHECK(st.health == Health::kOk);
  CHECK(st.pending == 0);
  const auto after = test::pattern(B, 10);
  REQUIRE(s.engine->write(after.data(), B, 41 * B, false).is_ok());
  REQUIRE(s.engine->read(buf.data(), B, 41 * B).is_ok());
  CHECK(buf == after);
  REQUIRE(s.engine->read(buf.data(), B, 3 * B).is_ok());
  CHECK(buf == newer);
  CHECK(s.engine->stats().remaps == 1);
}

TEST_CASE("reads 7: a device errno (ENOTCONN) puts main offline without a probe",
          "[engine][offline]") {
  test::SetParams p;
  p.options = quick_reconnect();
  auto s = test::make_set(p);
  s.main->set_gone(ENOTCONN);
  std::vector<char> buf(2 * B);
  const Status r = s.engine->read(buf.data(), 2 * B, 30 * B);
  CHECK(r.code() == EIO);  // never the transport's errno
  const auto d = test::pattern(B, 1);
  CHECK(s.engine->write(d.data(), B, 31 * B, false).code() == EIO);
  CHECK(s.engine->stats().pending == 0);
  CHECK(s.engine->stats().remaps == 0);
  CHECK(s.engine->stats().main_offline_since != 0);
  // One failed read, no probe of other blocks, nothing more while offline.
  CHECK(s.main->failed_reads() == 1);
  CHECK(s.main->failed_writes() == 0);
}

TEST_CASE("reads 7: while main is offline it is tried again only after the backoff",
          "[engine][offline]") {
  EngineOptions o;
  o.reconnect_first = std::chrono::milliseconds(60000);
  test::SetParams p;
  p.options = o;
  auto s = test::make_set(p);
  s.main->set_gone(ENOTCONN);
  std::vector<char> buf(B);
  CHECK(s.engine->read(buf.data(), B, 5 * B).code() == EIO);
  // Offline: requests fail at once, without touching main.
  const uint64_t failed = s.main->failed_reads();
  CHECK(s.engine->read(buf.data(), B, 6 * B).code() == EIO);
  CHECK(s.main->failed_reads() == failed);
  // Back, but not tried yet: still offline until the backoff has passed.
  s.main->set_back();
  CHECK(s.engine->read(buf.data(), B, 5 * B).code() == EIO);
  CHECK(s.main->reconnects() == 0);
}

TEST_CASE("reads 7: a read that needs main while it is offline serves the spare's bytes before it",
          "[engine][offline]") {
  const auto kept = test::pattern(B, 7);
  auto s = set_with_remap(quick_reconnect(), 4, kept);
  std::vector<char> buf(3 * B);
  REQUIRE(s.engine->read(buf.data(), B, 0).is_ok());
  s.main->set_gone(EIO);
  std::vector<uint64_t> unreadable;
  const Status r = s.engine->read(buf.data(), 3 * B, 4 * B, &unreadable);
  CHECK(r.code() == EIO);
  REQUIRE(r.error_offset());
  CHECK(*r.error_offset() == 5 * B);
  CHECK(unreadable.empty());  // not unreadable: unknown
  CHECK(std::memcmp(buf.data(), kept.data(), B) == 0);
  CHECK(s.engine->stats().pending == 0);
}

TEST_CASE("reads 3-5: a block that fails once is rescued; retries=3 means four reads",
          "[engine][reads]") {
  auto s = test::make_set();
  const auto d = test::pattern(B, 3);
  REQUIRE(s.engine->write(d.data(), B, 6 * B, false).is_ok());
  s.main->add_weak_block(6, 1);
  std::vector<char> buf(B);
  REQUIRE(s.engine->read(buf.data(), B, 6 * B).is_ok());
  CHECK(buf == d);
  auto st = s.engine->stats();
  CHECK(st.remaps_by_cause[static_cast<int>(Cause::kRescue)] == 1);
  CHECK(st.retry_successes == 1);

  // A dead block: exactly 1 + 3 reads of it, then pending.
  s.main->add_read_error(9);
  const uint64_t failed = s.main->failed_reads();
  CHECK(s.engine->read(buf.data(), B, 9 * B).code() == EIO);
  CHECK(s.main->failed_reads() - failed == 4);
  CHECK(s.engine->stats().pending == 1);
}

TEST_CASE("reads 5-6: a failed slot read and a failed main read in one request are both reported",
          "[engine][reads][spare]") {
  auto s = test::make_set();
  const Superblock sb = s.engine->superblock();
  std::vector<char> all(8 * B);
  for (uint64_t b = 0; b < 8; ++b) {
    const auto d = test::pattern(B, 100 + b);
    std::memcpy(all.data() + b * B, d.data(), B);
  }
  s.main->add_write_error(5);
  REQUIRE(s.engine->write(all.data(), 8 * B, 0, false).is_ok());  // block 5 -> slot 0
  s.main->clear_faults();
  s.main->add_read_error(2);
  s.spare->add_read_error(sb.slot_offset / 512 + 1);  // inside slot 0
  std::vector<char> buf(8 * B, 'x');
  std::vector<uint64_t> unreadable;
  const Status r = s.engine->read(buf.data(), 8 * B, 0, &unreadable);
  CHECK(r.code() == EIO);
  CHECK(unreadable == std::vector<uint64_t>{2, 5});
  REQUIRE(r.error_offset());
  CHECK(*r.error_offset() == 2 * B);
  // Every other block holds its real data.
  for (uint64_t b : {0, 1, 3, 4, 6, 7}) {
    CHECK(std::memcmp(buf.data() + b * B, all.data() + b * B, B) == 0);
  }
  // The slot's failure marks nothing: block 5's data may still read later.
  CHECK(s.engine->stats().pending == 1);
}

TEST_CASE("writes 5: a flush that fails with writes outstanding is sticky (fsyncgate)",
          "[engine][durability]") {
  auto s = test::make_set();
  s.main->set_errors_at_flush(true);
  s.main->add_write_error(7);
  const auto d = test::pattern(B, 1);
  // Accepted now, as the page cache accepts it; lost at writeback.
  REQUIRE(s.engine->write(d.data(), B, 7 * B, false).is_ok());
  CHECK(s.engine->flush().code() == EIO);
  // The device's next flush would succeed (the kernel reports the error
  // once): dmremap must not.
  CHECK(s.engine->flush().code() == EIO);
  CHECK(s.engine->write(d.data(), B, 8 * B, /*fua=*/true).code() == EIO);
  const auto st = s.engine->stats();
  CHECK(st.health == Health::kFailing);
  CHECK_THAT(st.health_reason, Catch::Contains("a flush failed"));
}

TEST_CASE("writes 5: a flush while main is offline fails only when writes are outstanding",
          "[engine][durability][offline]") {
  SECTION("nothing written since the last flush: nothing can be lost") {
    auto s = test::make_set();
    const auto d = test::pattern(B, 1);
    REQUIRE(s.engine->write(d.data(), B, 7 * B, false).is_ok());
    REQUIRE(s.engine->flush().is_ok());
    s.main->set_gone(ENOTCONN);
    CHECK(s.engine->flush().is_ok());
  }
  SECTION("an acknowledged write not yet flushed, and the flush fails with EIO") {
    auto s = test::make_set();
    const auto d = test::pattern(B, 1);
    REQUIRE(s.engine->write(d.data(), B, 7 * B, false).is_ok());
    s.main->set_gone(EIO);
    CHECK(s.engine->flush().code() == EIO);
    s.main->set_back();
    CHECK(s.engine->flush().code() == EIO);  // it may have lost the write
  }
  SECTION("a flush that never reached main (ENOTCONN) says nothing of the writes") {
    test::SetParams p;
    p.options = quick_reconnect();
    auto s = test::make_set(p);
    const auto d = test::pattern(B, 1);
    REQUIRE(s.engine->write(d.data(), B, 7 * B, false).is_ok());
    s.main->set_gone(ENOTCONN);
    CHECK(s.engine->flush().code() == EIO);
    s.main->set_back();  // the same device, its cache intact
    CHECK(s.engine->flush().is_ok());
  }
  SECTION("main went away under an unflushed write and came back as a new device") {
    test::SetParams p;
    p.options = quick_reconnect();
    auto s = test::make_set(p);
    const auto d = test::pattern(B, 1);
    REQUIRE(s.engine->write(d.data(), B, 7 * B, false).is_ok());
    s.main->set_gone(ENOTCONN);
    std::vector<char> buf(B);
    CHECK(s.engine->read(buf.data(), B, 7 * B).code() == EIO);
    s.main->set_back(/*new_device=*/true);
    wait_online(*s.engine);
    REQUIRE(s.engine->read(buf.data(), B, 7 * B).is_ok());
    // Its cache may have gone with the old connection: no flush may claim
    // that write.
    CHECK(s.engine->flush().code() == EIO);
    CHECK_THAT(s.engine->stats().health_reason, Catch::Contains("a flush failed"));
  }
  SECTION("the same device answering again (an outage, a link reset) keeps its writes") {
    test::SetParams p;
    p.options = quick_reconnect();
    auto s = test::make_set(p);
    const auto d = test::pattern(B, 1);
    REQUIRE(s.engine->write(d.data(), B, 7 * B, false).is_ok());
    s.main->set_gone(EIO);
    std::vector<char> buf(B);
    CHECK(s.engine->read(buf.data(), B, 9 * B).code() == EIO);
    s.main->set_back();
    wait_online(*s.engine);
    CHECK(s.engine->flush().is_ok());
    CHECK(s.engine->stats().health == Health::kOk);
  }
}

TEST_CASE("writes 5: a writeback error consumed by a remap's own flush still fails FLUSH",
          "[engine][durability][spare]") {
  auto s = test::make_set();
  const Superblock sb = s.engine->superblock();
  const auto d = test::pattern(B, 1);
  s.main->add_write_error(2);
  REQUIRE(s.engine->write(d.data(), B, 2 * B, false).is_ok());  // block 2 -> slot 0
  REQUIRE(s.engine->flush().is_ok());
  // The spare is buffered: a write to slot 0 is accepted and lost at writeback.
  s.spare->set_errors_at_flush(true);
  s.spare->add_write_error(sb.slot_offset / 512);
  REQUIRE(s.engine->write(d.data(), B, 2 * B, false).is_ok());
  // The next remap's own flush of the spare meets that error...
  s.main->add_write_error(3);
  CHECK(s.engine->write(d.data(), B, 3 * B, false).code() == EIO);
  // ...and the client's FLUSH must not succeed afterwards.
  CHECK(s.engine->flush().code() == EIO);
}

TEST_CASE("writes 5: under direct I/O a block smaller than the device's sector is refused",
          "[engine][device]") {
  char tmpl[] = "/tmp/dmremap-align-XXXXXX";
  const int fd = ::mkstemp(tmpl);
  REQUIRE(fd >= 0);
  REQUIRE(::ftruncate(fd, 1 << 20) == 0);
  ::close(fd);
  const std::string path = tmpl;
  auto spare = std::make_shared<MemoryDevice>(1 << 20, "spare");
  LayoutParams lp;
  lp.main_size = 1 << 20;
  lp.block_size = 512;
  REQUIRE(MetadataStore::format(*spare, lp, "").is_ok());
  OpenOptions o;
  o.io = IoMode::kDirect;
  auto main = FileDevice::open(path, "main", o);
  if (!main.is_ok()) {
    WARN("no O_DIRECT on this filesystem: " << main.status().to_string());
  } else {
    auto e = Engine::open(main.value(), spare, EngineOptions{});
    CHECK(e.status().code() == EINVAL);
    CHECK_THAT(e.status().message(), Catch::Contains("--block-size 4096"));
    main.value().reset();  // its lock
  }
  o.io = IoMode::kBuffered;
  auto buffered = FileDevice::open(path, "main", o);
  REQUIRE(buffered.is_ok());
  CHECK(Engine::open(buffered.value(), spare, EngineOptions{}).is_ok());
  std::remove(path.c_str());
}

TEST_CASE("io=auto: direct on block devices, buffered on image files", "[device]") {
  char tmpl[] = "/tmp/dmremap-io-XXXXXX";
  const int fd = ::mkstemp(tmpl);
  REQUIRE(fd >= 0);
  REQUIRE(::ftruncate(fd, 1 << 20) == 0);
  ::close(fd);
  auto dev = FileDevice::open(tmpl, "main", OpenOptions{});
  REQUIRE(dev.is_ok());
  CHECK(dev.value()->alignment() == 1);
  std::remove(tmpl);
  IoMode m = IoMode::kDirect;
  CHECK(parse_io_mode("auto", m));
  CHECK(m == IoMode::kAuto);
  CHECK(parse_io_mode("buffered", m));
  CHECK(m == IoMode::kBuffered);
  CHECK_FALSE(parse_io_mode("fast", m));
  // Block devices (loop devices as root) are covered by tests/cli_test.sh.
}

TEST_CASE("failures are classified by errno", "[device]") {
  for (int e : {ENODATA, EILSEQ, EBADMSG}) CHECK(classify_failure(e) == FailureKind::kMedia);
  for (int e : {ENODEV, ENXIO, ENOLINK, ETIMEDOUT, ESHUTDOWN, ENOTCONN, ECONNRESET, EPIPE}) {
    CHECK(classify_failure(e) == FailureKind::kDevice);
  }
  CHECK(classify_failure(EIO) == FailureKind::kUnknown);
}

TEST_CASE("forget-pending clears a mark only when main reads the block now", "[engine][admin]") {
  auto s = test::make_set();
  const auto d = test::pattern(B, 4);
  REQUIRE(s.engine->write(d.data(), B, 12 * B, false).is_ok());
  s.main->add_read_error(12);
  s.main->add_read_error(13);
  std::vector<char> buf(B);
  CHECK(s.engine->read(buf.data(), B, 12 * B).code() == EIO);
  CHECK(s.engine->read(buf.data(), B, 13 * B).code() == EIO);
  REQUIRE(s.engine->stats().pending == 2);

  Engine::ForgetResult r;
  CHECK(s.engine->forget_pending({12, 14}, true, r).code() == EINVAL);  // 14 is not pending
  CHECK(r.cleared.empty());
  s.main->clear_faults();  // 12 reads again (main was away); 13 is still bad
  s.main->add_read_error(13);
  r = {};
  REQUIRE(s.engine->forget_pending({12, 13}, true, r).is_ok());
  CHECK(r.cleared == std::vector<uint64_t>{12});
  CHECK(r.kept == std::vector<uint64_t>{13});
  CHECK((r.moved.empty() && r.untried.empty()));
  REQUIRE(s.engine->read(buf.data(), B, 12 * B).is_ok());
  CHECK(buf == d);
  CHECK(s.engine->stats().pending == 1);
  // Recorded: a crash and a reopen keep it.
  test::reopen(s);
  CHECK(s.engine->stats().pending == 1);
  REQUIRE(s.engine->read(buf.data(), B, 12 * B).is_ok());
  CHECK(buf == d);
}

TEST_CASE("forget-pending holds no claim while it reads: a write meanwhile wins, a stop is honoured",
          "[engine][offline]") {
  auto s = test::make_set();
  std::vector<char> buf(B);
  for (uint64_t b : {20, 21, 22}) {
    s.main->add_read_error(b);
    CHECK(s.engine->read(buf.data(), B, b * B).code() == EIO);
  }
  REQUIRE(s.engine->stats().pending == 3);
  s.main->clear_faults();  // all three read now
  const auto d = test::pattern(B, 9);
  int asked = 0;
  Engine::ForgetResult r;
  // --all: the list is what was pending when the command began.
  REQUIRE(s.engine
              ->forget_pending({20, 21, 22}, false, r,
                               [&] {
                                 // A client writes block 21 while block 20 is
                                 // read: it gets a slot, and nothing waits.
                                 if (++asked == 1) {
                                   REQUIRE(s.engine->write(d.data(), B, 21 * B, false).is_ok());
                                 }
                                 return asked == 3;  // stop before block 22
                               })
              .is_ok());
  CHECK(r.cleared == std::vector<uint64_t>{20});
  CHECK(r.moved == std::vector<uint64_t>{21});
  CHECK(r.untried == std::vector<uint64_t>{22});
  CHECK(r.kept.empty());
  const auto st = s.engine->stats();
  CHECK((st.pending == 1 && st.remaps == 1));
  REQUIRE(s.engine->read(buf.data(), B, 21 * B).is_ok());
  CHECK(buf == d);
  // Without the list (--all), a block that is not pending is reported, not refused.
  r = {};
  REQUIRE(s.engine->forget_pending({20, 22}, false, r).is_ok());
  CHECK(r.moved == std::vector<uint64_t>{20});
  CHECK(r.cleared == std::vector<uint64_t>{22});
}

TEST_CASE("safety 3: a spare that cannot be locked (NBD) is leased: a second opener is refused",
          "[engine][lease]") {
  auto main = std::make_shared<MemoryDevice>(1 << 20, "main");
  auto spare_mem = std::make_shared<MemoryDevice>(1 << 20, "spare");
  auto spare_faulty = std::make_shared<FaultyDevice>(spare_mem);
  auto spare = std::make_shared<test::RecordingDevice>(spare_faulty);
  spare->set_locked(false);
  LayoutParams lp;
  lp.main_size = 1 << 20;
  REQUIRE(MetadataStore::format(*spare, lp, "").is_ok());
  EngineOptions o;
  o.lease_interval = std::chrono::milliseconds(100);  // watched for 400 ms

  auto first = Engine::open(main, spare, o);
  REQUIRE(first.is_ok());
  // The first server renews its lease while the second watches: refused.
  auto second = Engine::open(main, spare, o);
  CHECK(second.status().code() == EBUSY);
  CHECK_THAT(second.status().message(), Catch::Contains("in use by another dmremap"));
  // The first keeps working.
  const auto d = test::pattern(B, 1);
  REQUIRE(first.value()->write(d.data(), B, 0, true).is_ok());

  SECTION("after a crash (no renewals) the set is taken over") {
    first.value().reset();  // no close: the process is gone
    auto again = Engine::open(main, spare, o);
    REQUIRE(again.is_ok());
    std::vector<char> buf(B);
    REQUIRE(again.value()->read(buf.data(), B, 0).is_ok());
    CHECK(buf == d);
    REQUIRE(again.value()->close().is_ok());
  }
  SECTION("a second owner that writes the superblock anyway: one of the two stops") {
    RemapTable table;
    auto intruder = MetadataStore::open(spare, table, /*writable=*/true);
    REQUIRE(intruder.is_ok());
    // It renews as a second server would. Whichever finds a generation it
    // did not write stops writing: the owner (journal broken) when the
    // intruder is ahead, the intruder (EBUSY) when the owner is.
    bool intruder_stopped = false;
    for (int i = 0; i < 20 && !intruder_stopped && !first.value()->stats().journal_broken; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(150));
      intruder_stopped = intruder.value()->heartbeat().code() == EBUSY;
    }
    const bool owner_stopped = first.value()->stats().journal_broken;
    CHECK((owner_stopped || intruder_stopped));
    if (owner_stopped) CHECK(first.value()->write(d.data(), B, 4 * B, false).code() == EIO);
  }
  SECTION("an owner that cannot renew its lease stops serving before it could be taken over") {
    spare_faulty->set_gone(ENOTCONN);
    std::this_thread::sleep_for(std::chrono::milliseconds(600));  // 2.5 intervals are 250 ms
    std::vector<char> buf(B);
    const Status r = first.value()->read(buf.data(), B, 0);
    CHECK(r.code() == EIO);
    CHECK_THAT(r.message(), Catch::Contains("lease"));
    CHECK(first.value()->write(d.data(), B, 8 * B, false).code() == EIO);
    CHECK(first.value()->trim(B, 8 * B, false).code() == EIO);
  }
  SECTION("a clean close needs no wait and no lease check") {
    REQUIRE(first.value()->close().is_ok());
    first.value().reset();
    const auto t0 = std::chrono::steady_clock::now();
    auto again = Engine::open(main, spare, o);
    REQUIRE(again.is_ok());
    // Watching takes four intervals (400 ms here).
    CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(300));
    REQUIRE(again.value()->close().is_ok());
  }
}

TEST_CASE("reads 7 for the spare: a spare that does not answer marks no slot bad",
          "[engine][spare][offline]") {
  auto s = test::make_set();
  const auto d = test::pattern(B, 1);
  s.main->add_write_error(2);
  s.main->add_write_error(3);
  REQUIRE(s.engine->write(d.data(), B, 2 * B, false).is_ok());  // block 2 -> slot 0
  s.spare->set_gone(ENOTCONN);
  CHECK(s.engine->write(d.data(), B, 2 * B, false).code() == EIO);  // its slot
  CHECK(s.engine->write(d.data(), B, 3 * B, false).code() == EIO);  // a new slot
  std::vector<char> buf(B);
  CHECK(s.engine->read(buf.data(), B, 2 * B).code() == EIO);
  CHECK(s.engine->stats().slots_bad == 0);
  CHECK_FALSE(s.engine->stats().journal_broken);
  s.spare->set_back();
  REQUIRE(s.engine->write(d.data(), B, 3 * B, false).is_ok());
  REQUIRE(s.engine->read(buf.data(), B, 2 * B).is_ok());
  CHECK(buf == d);
  const auto st = s.engine->stats();
  CHECK((st.remaps == 2 && st.slots_bad == 0 && st.health == Health::kOk));
}

// Seen in CI: nbdkit serving the spare was killed between a lease renewal's
// write and its flush. The reconnect forfeited that write, and with it
// every later flush of the spare: no new remap could commit again.
TEST_CASE("writes 5 for the spare: a lease renewal cut off before its flush forfeits nothing",
          "[engine][spare][offline][lease]") {
  EngineOptions o;
  o.lease_interval = std::chrono::milliseconds(20);
  test::SetParams p;
  p.options = o;
  p.spare_leased = true;
  auto s = test::make_set(p);
  const auto d = test::pattern(B, 1);
  s.main->add_write_error(2);
  s.main->add_write_error(3);
  REQUIRE(s.engine->write(d.data(), B, 2 * B, false).is_ok());  // block 2 -> slot 0
  REQUIRE(s.engine->flush().is_ok());

  // The next renewal's flush is in flight when the spare's server goes.
  s.spare->set_flush_delay(std::chrono::milliseconds(300));
  const uint64_t flushes = s.spare->flush_calls();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (s.spare->flush_calls() == flushes) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  s.spare->set_gone(ENOTCONN);
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  s.spare->set_flush_delay(std::chrono::microseconds(0));
  s.spare->set_back(/*new_device=*/true);  // a new connection: its cache is new

  // Nothing that mattered was unflushed: remaps commit again.
  Status w;
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!(w = s.engine->write(d.data(), B, 3 * B, false)).is_ok()) {
    REQUIRE(std::chrono::steady_clock::now() < until);  // the spare's reconnect is a thread's
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  REQUIRE(s.engine->flush().is_ok());
  CHECK_FALSE(s.spare->lost_writes());
  CHECK(s.engine->stats().remaps == 2);

  // A client's write to a slot that nobody flushed is another matter: it
  // may have gone with the old connection, so flush fails from then on.
  const auto e = test::pattern(B, 2);
  REQUIRE(s.engine->write(e.data(), B, 2 * B, false).is_ok());  // into slot 0
  s.spare->set_gone(ENOTCONN);
  std::vector<char> buf(B);
  CHECK(s.engine->read(buf.data(), B, 2 * B).code() == EIO);
  s.spare->set_back(/*new_device=*/true);
  REQUIRE(s.spare->reconnect().is_ok());
  CHECK(s.spare->lost_writes());
  CHECK(s.engine->flush().code() == EIO);
}

TEST_CASE("safety 3: a lease renewal whose flush went to a new connection is not taken as written",
          "[engine][spare][lease]") {
  // The spare's server came back between the renewal's write and its flush:
  // the flush works, on the new connection, but does not cover the write.
  std::mutex mu;
  std::vector<std::string> lines;
  set_log_sink([&](LogLevel, const std::string& line) {
    std::lock_guard l(mu);
    lines.push_back(line);
  });
  EngineOptions o;
  o.lease_interval = std::chrono::milliseconds(20);
  test::SetParams p;
  p.options = o;
  p.spare_leased = true;
  auto s = test::make_set(p);
  s.spare->set_flush_delay(std::chrono::milliseconds(200));
  const uint64_t flushes = s.spare->flush_calls();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (s.spare->flush_calls() == flushes) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  s.spare->set_back(/*new_device=*/true);  // during the flush
  bool refused = false;
  while (!refused) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    std::lock_guard l(mu);
    for (const auto& line : lines) {
      refused = refused || line.find("reconnected during the lease renewal") != std::string::npos;
    }
  }
  s.spare->set_flush_delay(std::chrono::microseconds(0));
  set_log_sink([](LogLevel, const std::string&) {});
  // The set goes on: once a renewal works again (the slow ones let the
  // lease lapse), remaps do too.
  const auto d = test::pattern(B, 1);
  s.main->add_write_error(4);
  while (!s.engine->write(d.data(), B, 4 * B, false).is_ok()) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  REQUIRE(s.engine->flush().is_ok());
  CHECK(s.engine->stats().remaps == 1);
}

TEST_CASE("reads 7: a file or disk that shrinks under dmremap reads as gone (ENXIO), not bad",
          "[device]") {
  char tmpl[] = "/tmp/dmremap-gone-XXXXXX";
  const int fd = ::mkstemp(tmpl);
  REQUIRE(fd >= 0);
  REQUIRE(::ftruncate(fd, 1 << 20) == 0);
  auto dev = FileDevice::open(tmpl, "main", OpenOptions{});
  REQUIRE(dev.is_ok());
  // As a disk deleted while open: it reads as empty.
  REQUIRE(::ftruncate(fd, 0) == 0);
  ::close(fd);
  std::vector<char> buf(B);
  const Status s = dev.value()->read(buf.data(), B, 8 * B);
  CHECK(s.code() == ENXIO);
  CHECK(classify_failure(s.code()) == FailureKind::kDevice);
  std::remove(tmpl);
}

TEST_CASE("spare: a full filesystem under the spare (ENOSPC) marks no slot bad",
          "[engine][spare]") {
  auto s = test::make_set();
  s.main->add_write_error(3);
  s.spare->set_gone(ENOSPC);
  const auto d = test::pattern(B, 1);
  CHECK(s.engine->write(d.data(), B, 3 * B, false).code() == EIO);
  s.spare->set_back();
  const auto st = s.engine->stats();
  CHECK(st.slots_bad == 0);
  CHECK_FALSE(st.journal_broken);
  REQUIRE(s.engine->write(d.data(), B, 3 * B, false).is_ok());
  CHECK(s.engine->stats().remaps == 1);
}

TEST_CASE("spare: a journal copy that refuses writes degrades the set, it does not stop it",
          "[engine][spare]") {
  auto s = test::make_set();
  const Superblock& sb = s.engine->superblock();
  for (uint64_t sector = sb.journal_offset[1] / 512;
       sector < (sb.journal_offset[1] + sb.journal_bytes) / 512; ++sector) {
    s.spare->add_write_error(sector);
  }
  const auto data = test::pattern(B, 3);
  s.main->add_write_error(7);
  REQUIRE(s.engine->write(data.data(), B, 7 * B, false).is_ok());
  REQUIRE(s.engine->flush().is_ok());
  auto st = s.engine->stats();
  CHECK(st.remaps == 1);
  CHECK_FALSE(st.journal_broken);
  CHECK(st.health == Health::kWarning);
  CHECK_THAT(st.health_reason, Catch::Contains("journal copy 1 refuses writes"));
  // Still writable, and the remap survives a crash.
  s.main->add_write_error(8);
  REQUIRE(s.engine->write(data.data(), B, 8 * B, false).is_ok());
  test::reopen(s);
  std::vector<char> back(B);
  REQUIRE(s.engine->read(back.data(), B, 7 * B).is_ok());
  CHECK(back == data);
  REQUIRE(s.engine->read(back.data(), B, 8 * B).is_ok());
  CHECK(back == data);
  CHECK(s.engine->stats().remaps == 2);
}
