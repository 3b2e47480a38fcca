// Evacuation (lib/evacuate.h): its record in the superblock, the copy of the
// virtual disk onto NEW (remapped blocks from their slots, unreadable ones as
// zeros and listed as lost), the refusals of start, client writes mirrored
// while the copy runs, the write-intent bitmap after a crash, pause, resume
// and abort, a NEW that refuses writes, and the end of an evacuation at a
// clean close.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "dmremap/evacuate.h"
#include "dmremap/metadata.h"
#include "test_util.h"

using namespace dmremap;
using namespace std::chrono_literals;

namespace {
constexpr uint32_t B = 4096;

constexpr uint32_t state_of(EvacState s) { return static_cast<uint32_t>(s); }

// A directory for NEW disks (files), removed with everything in it. On
// tmpfs where there is one: NEW is flushed often.
class TempDir {
 public:
  TempDir() {
    for (const char* base : {"/dev/shm", "/tmp"}) {
      std::string t = std::string(base) + "/dmremap-evac-XXXXXX";
      if (::mkdtemp(t.data()) != nullptr) {
        path_ = t;
        break;
      }
    }
    REQUIRE(!path_.empty());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  // A sparse file of `size` bytes: all zeros, no data.
  std::string file(const std::string& name, uint64_t size) const {
    const std::string p = path_ + "/" + name;
    const int fd = ::open(p.c_str(), O_CREAT | O_RDWR | O_TRUNC, 0600);
    REQUIRE(fd >= 0);
    const int rc = ::ftruncate(fd, static_cast<off_t>(size));
    ::close(fd);
    REQUIRE(rc == 0);
    return p;
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::vector<char> read_file(const std::string& path, uint64_t offset, uint64_t len) {
  std::vector<char> out(len);
  const int fd = ::open(path.c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  uint64_t done = 0;
  while (done < len) {
    const ssize_t n = ::pread(fd, out.data() + done, len - done, static_cast<off_t>(offset + done));
    if (n <= 0) break;
    done += static_cast<uint64_t>(n);
  }
  ::close(fd);
  REQUIRE(done == len);
  return out;
}

void write_file(const std::string& path, uint64_t offset, const std::vector<char>& data) {
  const int fd = ::open(path.c_str(), O_WRONLY);
  REQUIRE(fd >= 0);
  const ssize_t n = ::pwrite(fd, data.data(), data.size(), static_cast<off_t>(offset));
  ::close(fd);
  REQUIRE(n == static_cast<ssize_t>(data.size()));
}

// What the set reads, as a client sees it.
std::vector<char> set_bytes(Engine& e, uint64_t offset, uint64_t len) {
  std::vector<char> out(len);
  const Status s = e.read(out.data(), len, offset);
  INFO(s.to_string());
  REQUIRE(s.is_ok());
  return out;
}

// Byte vectors compared as one value: a failure prints "false", not the bytes.
bool same(const std::vector<char>& a, const std::vector<char>& b) { return a == b; }

bool all_zero(const std::vector<char>& v) {
  return std::all_of(v.begin(), v.end(), [](char c) { return c == 0; });
}

// The blocks where `a` and `b` differ (both the same length).
std::vector<uint64_t> differing_blocks(const std::vector<char>& a, const std::vector<char>& b) {
  REQUIRE(a.size() == b.size());
  std::vector<uint64_t> out;
  for (size_t off = 0; off < a.size(); off += B) {
    const size_t n = std::min<size_t>(B, a.size() - off);
    if (std::memcmp(a.data() + off, b.data() + off, n) != 0) out.push_back(off / B);
  }
  return out;
}

// NEW as a file, read by its path: buffered, so that the test's own reads
// and writes of the file see what the Evacuator wrote.
OpenOptions target_options() {
  OpenOptions o;
  o.io = IoMode::kBuffered;
  return o;
}

std::string describe(const EvacProgress& p) {
  return std::string("state ") + evac_state_name(p.state) + ", block " +
         std::to_string(p.next_block) + " of " + std::to_string(p.blocks) + ", lost " +
         std::to_string(p.lost) + ", resync " + std::to_string(p.resync_regions) +
         (p.waiting_for_main ? ", waiting for main" : "") + ", error: " + p.error;
}

// Waits for the copy to stop running; REQUIREs that NEW is then in sync.
EvacProgress wait_synced(Evacuator& ev, std::chrono::milliseconds timeout = 10s) {
  const EvacProgress p = ev.wait(timeout);
  INFO(describe(p));
  REQUIRE(p.state == EvacState::kSynced);
  return p;
}

// Waits until the copy's place reaches `block` (or it stops running).
EvacProgress wait_block(Evacuator& ev, uint64_t block, std::chrono::milliseconds timeout = 10s) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  EvacProgress p = ev.progress();
  while (p.next_block < block && p.state == EvacState::kRunning &&
         std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(2ms);
    p = ev.progress();
  }
  INFO(describe(p));
  REQUIRE(p.next_block >= block);
  return p;
}

// While it lives, a write to a file at or past `limit` fails (EFBIG), as a
// NEW that refuses writes there: RLIMIT_FSIZE, with SIGXFSZ ignored. Only
// the test's files are written meanwhile (the set is in memory).
class FileSizeLimit {
 public:
  explicit FileSizeLimit(uint64_t limit) {
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &old_) == 0);
    struct sigaction ignore {};
    ignore.sa_handler = SIG_IGN;
    REQUIRE(::sigaction(SIGXFSZ, &ignore, &old_action_) == 0);
    struct rlimit r = old_;
    r.rlim_cur = limit;
    if (::setrlimit(RLIMIT_FSIZE, &r) != 0) {
      ::sigaction(SIGXFSZ, &old_action_, nullptr);
      FAIL("setrlimit(RLIMIT_FSIZE) failed");
    }
  }
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &old_);
    ::sigaction(SIGXFSZ, &old_action_, nullptr);
  }
  FileSizeLimit(const FileSizeLimit&) = delete;
  FileSizeLimit& operator=(const FileSizeLimit&) = delete;

 private:
  struct rlimit old_ {};
  struct sigaction old_action_ {};
};

// A crash: the power goes out under main and the spare, the process is
// gone (the Evacuator's last save finds the power off; no Engine::close),
// the unflushed writes of main and the spare are dropped, and the set is
// opened again. NEW (a file) is left as it is: a test that wants NEW to
// have lost a write overwrites it.
void crash_and_reopen(test::Set& s, PowerSwitch& power, std::unique_ptr<Evacuator>& ev) {
  power.cut_after(1);
  (void)s.spare->flush();  // that flush is where the power goes
  REQUIRE(power.is_off());
  ev.reset();
  s.engine.reset();
  s.main->power_cut(FaultyDevice::CutMode::kDrop, 1);
  s.spare->power_cut(FaultyDevice::CutMode::kDrop, 2);
  power.reset();
  auto e = Engine::open(s.main, s.spare, {});
  INFO(e.status().to_string());
  REQUIRE(e.is_ok());
  s.engine = std::move(e.value());
}
}  // namespace

// ---------------------------------------------------------------- record

TEST_CASE("evacuate: the record round-trips through the superblock, intent bits included",
          "[evacuate]") {
  LayoutParams lp;
  lp.main_size = 1 << 20;
  lp.spare_size = 1 << 20;
  lp.block_size = B;
  auto planned = plan_layout(lp);
  REQUIRE(planned.is_ok());
  Superblock sb = planned.value();
  sb.uuid = random_uuid();
  sb.generation = 7;
  EvacRecord& e = sb.evac;
  e.state = state_of(EvacState::kSynced);
  e.cursor = 0x0102030405060708ull;
  e.started = 1700000000;
  e.saved = 1700000123;
  e.rate = 8 << 20;
  e.target_size = 0x1122334455ull;
  e.lost = 17;
  e.region_blocks = 256;
  e.synced = 1700000100;
  e.target = "/dev/disk/by-id/" + std::string(300, 'n');
  e.target_identity = "WD-WCC4N0123456";
  const std::vector<uint64_t> bits = {0, 1, 7, 8, 4095, kEvacIntentBytes * 8 - 1};
  for (uint64_t r : bits) e.set_intent_bit(r);
  REQUIRE(e.intent.size() == kEvacIntentBytes);

  std::vector<char> img(kMetaUnit);
  sb.encode(img.data());
  std::string problem;
  auto d = Superblock::decode(img.data(), &problem);
  INFO(problem);
  REQUIRE(d.has_value());
  const EvacRecord& got = d->evac;
  CHECK(got.state == e.state);
  CHECK(got.cursor == e.cursor);
  CHECK(got.started == e.started);
  CHECK(got.saved == e.saved);
  CHECK(got.rate == e.rate);
  CHECK(got.target_size == e.target_size);
  CHECK(got.lost == e.lost);
  CHECK(got.region_blocks == e.region_blocks);
  CHECK(got.synced == e.synced);
  CHECK(got.target == e.target);
  CHECK(got.target_identity == e.target_identity);
  CHECK(got.intent == e.intent);
  std::vector<uint64_t> set_bits;
  for (uint64_t r = 0; r < kEvacIntentBytes * 8; ++r) {
    if (got.intent_bit(r)) set_bits.push_back(r);
  }
  CHECK(set_bits == bits);
  // The rest of the superblock is unharmed by the record.
  CHECK(d->generation == 7);
  CHECK(d->uuid == sb.uuid);
  CHECK(d->slot_count == sb.slot_count);

  SECTION("a bitmap with every bit clear reads back as empty") {
    for (uint64_t r : bits) e.clear_intent_bit(r);
    CHECK(!e.intent.empty());
    sb.encode(img.data());
    auto d2 = Superblock::decode(img.data());
    REQUIRE(d2.has_value());
    CHECK(d2->evac.intent.empty());
    CHECK(d2->evac.state == state_of(EvacState::kSynced));
  }
  SECTION("too long a target or identity is cut to what fits") {
    e.target = std::string(600, 't');
    e.target_identity = std::string(70, 'i');
    sb.encode(img.data());
    auto d2 = Superblock::decode(img.data());
    REQUIRE(d2.has_value());
    CHECK(d2->evac.target == std::string(kEvacTargetBytes - 1, 't'));
    CHECK(d2->evac.target_identity == std::string(kEvacIdentityBytes - 1, 'i'));
  }
  SECTION("no evacuation: the record's bytes stay zero") {
    e = EvacRecord{};
    sb.encode(img.data());
    CHECK(std::all_of(img.begin() + kEvacOffset, img.end(), [](char c) { return c == 0; }));
    auto d2 = Superblock::decode(img.data());
    REQUIRE(d2.has_value());
    CHECK(d2->evac.state == 0);
    CHECK(d2->evac.intent.empty());
    CHECK(d2->evac.target.empty());
  }
  SECTION("a record that fails its CRC makes the copy invalid") {
    // One byte anywhere in the record: a field, the target, the bitmap, the
    // CRC itself. The superblock's own CRC (bytes 0-511) still holds.
    for (size_t at : {kEvacOffset + 8, kEvacOffset + 16, kEvacOffset + 144, kEvacIntentOffset,
                      kEvacIntentOffset + kEvacIntentBytes - 1, kEvacCrcAt}) {
      INFO("byte " << at);
      std::vector<char> bad = img;
      bad[at] = static_cast<char>(bad[at] ^ 0x20);
      std::string why;
      CHECK(!Superblock::decode(bad.data(), &why).has_value());
      CHECK_THAT(why, Catch::Contains("evacuation"));
    }
  }
}

TEST_CASE("evacuate: a damaged record in the newer superblock copy leaves the older copy's",
          "[evacuate]") {
  auto s = test::make_set();
  EvacRecord a;
  a.state = state_of(EvacState::kRunning);
  a.cursor = 100;
  a.region_blocks = 256;
  a.target = "/dev/older";
  a.target_size = 1 << 20;
  a.set_intent_bit(0);
  EvacRecord b = a;
  b.cursor = 200;
  b.target = "/dev/newer";
  b.set_intent_bit(3);
  REQUIRE(s.engine->save_evacuation(a).is_ok());
  REQUIRE(s.engine->save_evacuation(b).is_ok());
  // The two copies on the spare: one holds a, the newer one b.
  std::optional<Superblock> copy[2];
  for (int i = 0; i < 2; ++i) {
    std::vector<char> img(kMetaUnit);
    REQUIRE(s.spare_mem->read(img.data(), kMetaUnit, kSuperblockOffset[i]).is_ok());
    copy[i] = Superblock::decode(img.data());
    REQUIRE(copy[i].has_value());
  }
  const int newer = copy[0]->generation > copy[1]->generation ? 0 : 1;
  REQUIRE(copy[newer]->evac.cursor == 200);
  REQUIRE(copy[1 - newer]->evac.cursor == 100);

  SECTION("undamaged, the newer copy wins") {
    test::reopen(s);
    const EvacRecord r = s.engine->saved_evacuation();
    CHECK(r.cursor == 200);
    CHECK(r.target == "/dev/newer");
    CHECK(r.intent_bit(3));
  }
  SECTION("the newer copy's record damaged: the older copy wins") {
    const uint64_t at = kSuperblockOffset[newer] + kEvacOffset + 16;  // its cursor
    char byte = 0;
    REQUIRE(s.spare_mem->read(&byte, 1, at).is_ok());
    byte = static_cast<char>(byte ^ 0x01);
    REQUIRE(s.spare_mem->write(&byte, 1, at).is_ok());
    test::reopen(s);
    const EvacRecord r = s.engine->saved_evacuation();
    CHECK(r.state == state_of(EvacState::kRunning));
    CHECK(r.cursor == 100);
    CHECK(r.target == "/dev/older");
    CHECK(r.intent_bit(0));
    CHECK(!r.intent_bit(3));
  }
}

// ------------------------------------------------------------------ copy

TEST_CASE("evacuate: NEW gets the virtual disk: remapped blocks from their slots, an "
          "unreadable one as zeros, listed as lost",
          "[evacuate]") {
  test::SetParams params;
  params.main_size = 2 << 20;  // 512 blocks, two pieces
  auto s = test::make_set(params);
  const uint64_t size = params.main_size;
  const uint64_t blocks = size / B;
  const auto old = test::pattern(size, 1);
  REQUIRE(s.main_mem->write(old.data(), size, 0).is_ok());  // what main held
  // Blocks 5 and 300 fail to write: their new data goes to slots, main
  // keeps its old bytes. Block 400 is moved by hand, then written.
  s.main->add_write_error(5);
  s.main->add_write_error(300);
  const auto d5 = test::pattern(B, 5), d300 = test::pattern(B, 300), d400 = test::pattern(B, 400);
  REQUIRE(s.engine->write(d5.data(), B, 5 * B, false).is_ok());
  REQUIRE(s.engine->write(d300.data(), B, 300 * B, true).is_ok());
  REQUIRE(s.engine->remap_block(400).is_ok());
  REQUIRE(s.engine->write(d400.data(), B, 400 * B, false).is_ok());
  REQUIRE(s.engine->stats().remaps == 3);
  for (uint64_t b : {5, 300, 400}) {
    INFO("block " << b);
    CHECK(std::memcmp(s.main_mem->contents().data() + b * B, old.data() + b * B, B) == 0);
  }
  // Block 200 never reads: the copy finds out.
  s.main->add_read_error(200);

  TempDir dir;
  const uint64_t new_size = size + (1 << 20);  // a larger NEW is fine
  const std::string target = dir.file("new.img", new_size);
  Evacuator ev(*s.engine, target_options(), {});
  CHECK(ev.progress().state == EvacState::kNone);
  CHECK(ev.lost_blocks().empty());
  REQUIRE(ev.start({target, 0, false}).is_ok());
  const EvacProgress p = wait_synced(ev);
  CHECK(p.next_block == blocks);
  CHECK(p.blocks == blocks);
  CHECK(p.lost == 1);
  CHECK(p.synced != 0);
  CHECK(p.target == target);
  CHECK(p.target_size == new_size);
  CHECK(s.engine->stats().pending == 1);

  // NEW holds what a client reads, block by block; zeros where nothing reads.
  const auto on_new = read_file(target, 0, size);
  std::vector<uint64_t> wrong;
  std::vector<char> want(B);
  for (uint64_t b = 0; b < blocks; ++b) {
    const Status r = s.engine->read(want.data(), B, b * B);
    if (b == 200) {
      CHECK(r.code() == EIO);
      continue;
    }
    REQUIRE(r.is_ok());
    if (std::memcmp(on_new.data() + b * B, want.data(), B) != 0) wrong.push_back(b);
  }
  CHECK(wrong.empty());
  CHECK(same(std::vector<char>(on_new.begin() + 5 * B, on_new.begin() + 6 * B), d5));
  CHECK(same(std::vector<char>(on_new.begin() + 300 * B, on_new.begin() + 301 * B), d300));
  CHECK(same(std::vector<char>(on_new.begin() + 400 * B, on_new.begin() + 401 * B), d400));
  CHECK(all_zero(std::vector<char>(on_new.begin() + 200 * B, on_new.begin() + 201 * B)));
  CHECK(all_zero(read_file(target, size, new_size - size)));  // past the set: untouched
  CHECK(ev.lost_blocks() == std::vector<uint64_t>{200});

  auto v = ev.verify();
  REQUIRE(v.is_ok());
  CHECK(v->compared == blocks - 1);
  CHECK(v->lost == 1);
  CHECK(v->differ_count == 0);
  CHECK(v->differ.empty());
  CHECK(!v->stopped);

  const EvacRecord rec = s.engine->saved_evacuation();
  CHECK(rec.state == state_of(EvacState::kSynced));
  CHECK(rec.cursor == blocks);
  CHECK(rec.lost == 1);
  CHECK(rec.target == target);
  CHECK(rec.target_size == new_size);
  CHECK(rec.synced != 0);
  CHECK(rec.started != 0);

  SECTION("verify finds a block of NEW that differs") {
    write_file(target, 7 * B, test::pattern(B, 777));
    auto v2 = ev.verify();
    REQUIRE(v2.is_ok());
    CHECK(v2->differ_count == 1);
    CHECK(v2->differ == std::vector<uint64_t>{7});
    CHECK(v2->lost == 1);
  }
  SECTION("a write to the lost block reaches NEW, and it is lost no more") {
    const auto w = test::pattern(B, 2000);
    REQUIRE(s.engine->write(w.data(), B, 200 * B, false).is_ok());
    CHECK(same(read_file(target, 200 * B, B), w));
    CHECK(ev.lost_blocks().empty());
    auto v2 = ev.verify();
    REQUIRE(v2.is_ok());
    CHECK(v2->lost == 0);
    CHECK(v2->compared == blocks);
    CHECK(v2->differ_count == 0);
  }
}

TEST_CASE("evacuate: start refuses a small NEW, one holding data, a disk of the set, a "
          "second run and too slow a rate",
          "[evacuate]") {
  auto s = test::make_set();  // 1 MiB
  const uint64_t size = 1 << 20;
  TempDir dir;
  const std::string main_path = dir.file("main.img", size);  // stands for main, by path
  Evacuator ev(*s.engine, target_options(), {main_path, ""});
  const std::string fresh = dir.file("fresh.img", size);

  CHECK(ev.start({dir.file("small.img", size - B), 0, false}).code() == EINVAL);
  CHECK(ev.start({fresh, 100, false}).code() == EINVAL);
  CHECK(ev.start({fresh, 4095, false}).code() == EINVAL);
  CHECK(ev.start({"", 0, false}).code() == EINVAL);
  CHECK(ev.start({main_path, 0, true}).code() == EINVAL);
  CHECK(ev.start({dir.path() + "/./main.img", 0, true}).code() == EINVAL);  // the same file
  CHECK(ev.start({dir.path() + "/missing.img", 0, false}).code() == ENOENT);
  const std::string used = dir.file("used.img", size);
  write_file(used, 12345, {'x'});
  const Status refused = ev.start({used, 0, false});
  CHECK(refused.code() == EEXIST);
  CHECK_THAT(refused.message(), Catch::Contains("12345"));
  // None of them started anything, or recorded anything.
  CHECK(ev.progress().state == EvacState::kNone);
  CHECK(s.engine->saved_evacuation().state == 0);
  CHECK(ev.set_rate(1 << 20).code() == EINVAL);  // nothing under way

  // With force, its data is overwritten. 64 KiB/s: the one piece is copied,
  // then the copy waits 16 s before it is in sync.
  REQUIRE(ev.start({used, 64 << 10, true}).is_ok());
  CHECK(ev.progress().state == EvacState::kRunning);
  CHECK(s.engine->saved_evacuation().state == state_of(EvacState::kRunning));
  CHECK(ev.start({fresh, 0, false}).code() == EBUSY);
  CHECK(ev.set_rate(100).code() == EINVAL);
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(ev.set_rate(0).is_ok());  // taken at once
  wait_synced(ev);
  CHECK(std::chrono::steady_clock::now() - t0 < 5s);
  CHECK(ev.start({fresh, 0, false}).code() == EBUSY);  // in sync is still under way
  CHECK(same(read_file(used, 0, size), set_bytes(*s.engine, 0, size)));
  // Ended, it may start again.
  REQUIRE(ev.abort().is_ok());
  REQUIRE(ev.start({fresh, 0, false}).is_ok());
  wait_synced(ev);
  CHECK(ev.progress().target == fresh);
}

// ----------------------------------------------------------------- online

TEST_CASE("evacuate: clients writing during the copy: NEW ends equal to the set",
          "[evacuate][concurrency]") {
  test::SetParams params;
  params.main_size = 3 << 20;  // 768 blocks, three pieces
  auto s = test::make_set(params);
  const uint64_t size = params.main_size;
  const uint64_t blocks = size / B;
  const auto old = test::pattern(size, 9);
  REQUIRE(s.main_mem->write(old.data(), size, 0).is_ok());
  // A slow block in each piece: the copy's read of a piece takes a while,
  // and the writers write to it meanwhile.
  for (uint64_t b : {40, 300, 600}) s.main->add_slow_block(b, 40ms);
  // A remapped block, whose data lives in its slot.
  s.main->add_write_error(450);
  const auto d450 = test::pattern(B, 450);
  REQUIRE(s.engine->write(d450.data(), B, 450 * B, false).is_ok());

  TempDir dir;
  const std::string target = dir.file("new.img", size);
  Evacuator ev(*s.engine, target_options(), {});

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> ops{0};
  std::mutex errors_mu;
  std::vector<std::string> errors;  // checked on this thread
  auto writer = [&](unsigned id) {
    std::mt19937_64 rng(id * 7919 + 17);
    uint64_t seed = (uint64_t{id} + 1) << 32;
    while (!stop.load()) {
      const unsigned kind = static_cast<unsigned>(rng() % 100);
      const uint64_t first = rng() % blocks;
      const uint64_t n = std::min<uint64_t>(1 + rng() % 8, blocks - first);
      const bool fua = rng() % 4 == 0;
      Status st;
      const char* what = "";
      if (kind < 55) {
        what = "write";
        const auto d = test::pattern(n * B, ++seed);
        st = s.engine->write(d.data(), n * B, first * B, fua);
      } else if (kind < 70) {
        what = "partial write";  // not block-aligned: read-modify-write
        const uint64_t off = first * B + rng() % B;
        const uint64_t len = std::min<uint64_t>(1 + rng() % (3 * B), size - off);
        const auto d = test::pattern(len, ++seed);
        st = s.engine->write(d.data(), len, off, fua);
      } else if (kind < 85) {
        what = "write zeroes";
        const uint64_t off = first * B + (rng() % 2 ? rng() % B : 0);
        const uint64_t len = std::min<uint64_t>(n * B, size - off);
        st = s.engine->write_zeroes(len, off, fua);
      } else {
        what = "trim";
        const uint64_t off = first * B + (rng() % 2 ? rng() % B : 0);
        const uint64_t len = std::min<uint64_t>(n * B, size - off);
        st = s.engine->trim(len, off, fua);
      }
      if (!st.is_ok()) {
        std::lock_guard l(errors_mu);
        errors.push_back(std::string(what) + ": " + st.to_string());
      }
      ops.fetch_add(1);
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 400));
    }
  };
  std::vector<std::thread> writers;
  for (unsigned i = 0; i < 4; ++i) writers.emplace_back(writer, i);
  // Started while they write: writes already on their way finish first.
  std::this_thread::sleep_for(50ms);
  const Status started = ev.start({target, 0, false});
  const uint64_t ops_at_start = ops.load();
  EvacProgress p;
  if (started.is_ok()) p = ev.wait(20s);
  const uint64_t ops_during_copy = ops.load() - ops_at_start;
  std::this_thread::sleep_for(300ms);  // in sync, they go on
  stop = true;
  for (auto& t : writers) t.join();

  REQUIRE(started.is_ok());
  INFO(describe(p));
  REQUIRE(p.state == EvacState::kSynced);
  {
    std::lock_guard l(errors_mu);
    INFO((errors.empty() ? std::string() : errors.front()));
    CHECK(errors.empty());
  }
  CHECK(ops_during_copy > 100);
  const EvacProgress after = ev.progress();
  CHECK(after.state == EvacState::kSynced);
  CHECK(after.mirrored > 0);
  CHECK(after.lost == 0);

  const auto on_set = set_bytes(*s.engine, 0, size);
  const auto on_new = read_file(target, 0, size);
  CHECK(differing_blocks(on_new, on_set).empty());
  auto v = ev.verify();
  REQUIRE(v.is_ok());
  CHECK(v->compared == blocks);
  CHECK(v->differ_count == 0);
}

TEST_CASE("evacuate: write-zeroes and trims reach NEW; a trim keeps a remapped block's data "
          "there too",
          "[evacuate]") {
  test::SetParams params;
  params.main_size = 2 << 20;
  auto s = test::make_set(params);
  const uint64_t size = params.main_size;
  const auto old = test::pattern(size, 4);
  REQUIRE(s.main_mem->write(old.data(), size, 0).is_ok());
  s.main->add_write_error(112);
  const auto d112 = test::pattern(B, 112);
  REQUIRE(s.engine->write(d112.data(), B, 112 * B, false).is_ok());
  REQUIRE(s.engine->stats().remaps == 1);

  TempDir dir;
  const std::string target = dir.file("new.img", size);
  Evacuator ev(*s.engine, target_options(), {});
  REQUIRE(ev.start({target, 0, false}).is_ok());
  wait_synced(ev);

  // Zeroes from the middle of block 100 to the middle of block 105.
  const uint64_t z_off = 100 * B + 100, z_len = 5 * B - 107;
  REQUIRE(s.engine->write_zeroes(z_len, z_off, false).is_ok());
  // A trim from the middle of block 110 to the middle of block 116: blocks
  // 111 to 115 go, but for 112, which is remapped and keeps its data.
  REQUIRE(s.engine->trim(6 * B - 995, 110 * B + 1000, true).is_ok());
  // And zeroes over a remapped block, with FUA.
  s.main->add_write_error(130);
  const auto d130 = test::pattern(B, 130);
  REQUIRE(s.engine->write(d130.data(), B, 130 * B, false).is_ok());
  REQUIRE(s.engine->write_zeroes(3 * B, 129 * B, true).is_ok());

  const auto on_set = set_bytes(*s.engine, 0, size);
  const auto on_new = read_file(target, 0, size);
  CHECK(differing_blocks(on_new, on_set).empty());
  auto bytes = [&](uint64_t off, uint64_t len) {
    return std::vector<char>(on_new.begin() + static_cast<std::ptrdiff_t>(off),
                             on_new.begin() + static_cast<std::ptrdiff_t>(off + len));
  };
  CHECK(all_zero(bytes(z_off, z_len)));
  CHECK(same(bytes(z_off - 100, 100),
             std::vector<char>(old.begin() + 100 * B, old.begin() + 100 * B + 100)));
  CHECK(same(bytes(112 * B, B), d112));
  CHECK(all_zero(bytes(111 * B, B)));
  CHECK(all_zero(bytes(113 * B, 3 * B)));
  CHECK(same(bytes(110 * B, B), std::vector<char>(old.begin() + 110 * B, old.begin() + 111 * B)));
  CHECK(all_zero(bytes(129 * B, 3 * B)));
  auto v = ev.verify();
  REQUIRE(v.is_ok());
  CHECK(v->differ_count == 0);
}

TEST_CASE("evacuate: holes of main reach NEW as zeros, over what NEW held", "[evacuate]") {
  const uint64_t size = 2 << 20;
  TempDir dir;
  // Main is a sparse file: data in blocks 100-102 and 400, holes elsewhere.
  const std::string main_path = dir.file("main.img", size);
  const auto d100 = test::pattern(3 * B, 100), d400 = test::pattern(B, 400);
  write_file(main_path, 100 * B, d100);
  write_file(main_path, 400 * B, d400);
  auto main = open_device(main_path, "main", target_options());
  REQUIRE(main.is_ok());
  auto spare = std::make_shared<MemoryDevice>(1 << 20, "spare");
  LayoutParams lp;
  lp.main_size = size;
  lp.block_size = B;
  REQUIRE(MetadataStore::format(*spare, lp, "").is_ok());
  auto opened = Engine::open(main.value(), spare, {});
  INFO(opened.status().to_string());
  REQUIRE(opened.is_ok());
  std::unique_ptr<Engine> engine = std::move(opened.value());
  // The set says which runs are holes: NEW must get zeros there.
  bool holes = false;
  REQUIRE(engine->extents(size, 0, [&](uint64_t, uint64_t, bool hole) { holes |= hole; }).is_ok());
  REQUIRE(holes);

  const std::string target = dir.file("new.img", size);
  write_file(target, 0, test::pattern(size, 99));  // NEW held something else
  {
    Evacuator ev(*engine, target_options(), {main_path});
    CHECK(ev.start({target, 0, false}).code() == EEXIST);
    REQUIRE(ev.start({target, 0, true}).is_ok());
    wait_synced(ev);
    const auto on_new = read_file(target, 0, size);
    CHECK(differing_blocks(on_new, set_bytes(*engine, 0, size)).empty());
    CHECK(all_zero(std::vector<char>(on_new.begin(), on_new.begin() + 100 * B)));
    CHECK(same(std::vector<char>(on_new.begin() + 100 * B, on_new.begin() + 103 * B), d100));
    CHECK(same(std::vector<char>(on_new.begin() + 400 * B, on_new.begin() + 401 * B), d400));
    auto v = ev.verify();
    REQUIRE(v.is_ok());
    CHECK(v->differ_count == 0);
  }
  REQUIRE(engine->close().is_ok());
}

// ---------------------------------------------------------- crash, resume

TEST_CASE("evacuate: after a crash the copy goes on from its place, and first copies again "
          "the regions written meanwhile",
          "[evacuate]") {
  test::SetParams params;
  params.main_size = 4 << 20;  // 1024 blocks: four pieces, four 1 MiB regions
  auto s = test::make_set(params);
  const uint64_t size = params.main_size;
  const uint64_t blocks = size / B;
  auto power = std::make_shared<PowerSwitch>();
  s.main->attach(power);
  s.spare->attach(power);
  const auto old = test::pattern(size, 3);
  REQUIRE(s.main_mem->write(old.data(), size, 0).is_ok());

  TempDir dir;
  const std::string target = dir.file("new.img", size);
  auto ev = std::make_unique<Evacuator>(*s.engine, target_options(), std::vector<std::string>{});
  REQUIRE(ev->start({target, 2 << 20, false}).is_ok());  // 2 MiB/s: 2 s in all
  wait_block(*ev, 256);
  // A save point (pause): the copy's place is on the spare.
  REQUIRE(ev->pause().is_ok());
  const EvacRecord paused = s.engine->saved_evacuation();
  CHECK(paused.state == state_of(EvacState::kPaused));
  REQUIRE(paused.cursor >= 256);
  REQUIRE(paused.cursor < blocks);
  REQUIRE(paused.region_blocks == 256);
  CHECK(!paused.intent_bit(0));
  REQUIRE(ev->resume().is_ok());

  // A write below the saved place: its region's bit is on the spare before
  // the write is answered.
  const auto w = test::pattern(B, 4242);
  REQUIRE(s.engine->write(w.data(), B, 10 * B, true).is_ok());
  CHECK(same(read_file(target, 10 * B, B), w));  // mirrored
  const EvacRecord marked = s.engine->saved_evacuation();
  CHECK(marked.state == state_of(EvacState::kRunning));
  CHECK(marked.intent_bit(0));
  CHECK(!marked.intent_bit(1));

  crash_and_reopen(s, *power, ev);
  // NEW's cache lost the write: it holds something else there.
  write_file(target, 10 * B, test::pattern(B, 666));
  CHECK(same(set_bytes(*s.engine, 10 * B, B), w));  // FUA: durable in the set
  const EvacRecord after = s.engine->saved_evacuation();
  CHECK(after.state == state_of(EvacState::kRunning));
  CHECK(after.cursor == paused.cursor);
  CHECK(after.intent_bit(0));

  Evacuator again(*s.engine, target_options(), {});
  const EvacProgress p0 = again.progress();
  CHECK(p0.state == EvacState::kRunning);
  CHECK(p0.next_block >= paused.cursor);  // from its place, not from 0
  CHECK(p0.rate_limit == uint64_t{2} << 20);
  REQUIRE(again.set_rate(0).is_ok());
  const EvacProgress done = wait_synced(again);
  CHECK(done.resync_regions == 0);
  const auto on_set = set_bytes(*s.engine, 0, size);
  const auto on_new = read_file(target, 0, size);
  CHECK(differing_blocks(on_new, on_set).empty());
  CHECK(same(read_file(target, 10 * B, B), w));
  CHECK(!s.engine->saved_evacuation().intent_bit(0));  // cleared once both were flushed
  auto v = again.verify();
  REQUIRE(v.is_ok());
  CHECK(v->differ_count == 0);
}

TEST_CASE("evacuate: a write made while the copy's last save point flushes the set survives "
          "a crash on NEW too",
          "[evacuate]") {
  // The copy has reached the end; its save point has flushed NEW and now
  // flushes the set (slowly) before it records "in sync, all copied". A
  // client write lands on both disks then, after NEW's flush. A crash after
  // the record is written may lose it from NEW's cache while the set keeps
  // it: the record must make the next open copy that region again (its
  // bit), or NEW must be flushed again before the record says all copied.
  test::SetParams params;  // 1 MiB: one piece, one region
  auto s = test::make_set(params);
  const uint64_t size = params.main_size;
  const uint64_t blocks = size / B;
  auto power = std::make_shared<PowerSwitch>();
  s.main->attach(power);
  s.spare->attach(power);
  const auto old = test::pattern(size, 12);
  REQUIRE(s.main_mem->write(old.data(), size, 0).is_ok());
  // Main has a write not yet flushed: the save point's flush of the set
  // reaches it, and takes 600 ms.
  const auto early = test::pattern(B, 200);
  REQUIRE(s.engine->write(early.data(), B, 200 * B, false).is_ok());
  s.main->set_flush_delay(600ms);

  TempDir dir;
  const std::string target = dir.file("new.img", size);
  auto ev = std::make_unique<Evacuator>(*s.engine, target_options(), std::vector<std::string>{});
  REQUIRE(ev->start({target, 0, false}).is_ok());
  wait_block(*ev, blocks);
  std::this_thread::sleep_for(100ms);  // NEW is flushed; the set's flush is under way
  const EvacProgress mid = ev->progress();
  const auto w = test::pattern(B, 4343);
  REQUIRE(s.engine->write(w.data(), B, 10 * B, false).is_ok());
  CHECK(same(read_file(target, 10 * B, B), w));  // mirrored
  wait_synced(*ev);
  INFO("when the client wrote: " << describe(mid));
  const EvacRecord rec = s.engine->saved_evacuation();
  CHECK(rec.state == state_of(EvacState::kSynced));
  CHECK(rec.cursor == blocks);

  crash_and_reopen(s, *power, ev);
  s.main->set_flush_delay(0us);
  write_file(target, 10 * B, test::pattern(B, 666));  // NEW's cache lost it
  const auto on_set_10 = set_bytes(*s.engine, 10 * B, B);
  Evacuator again(*s.engine, target_options(), {});
  wait_synced(again);
  const auto on_set = set_bytes(*s.engine, 0, size);
  const auto on_new = read_file(target, 0, size);
  CHECK(differing_blocks(on_new, on_set).empty());
  CHECK(same(read_file(target, 10 * B, B), on_set_10));
}

TEST_CASE("evacuate: a lost block read again after a crash is counted once", "[evacuate]") {
  test::SetParams params;
  params.main_size = 2 << 20;  // two pieces, two regions
  auto s = test::make_set(params);
  const uint64_t size = params.main_size;
  auto power = std::make_shared<PowerSwitch>();
  s.main->attach(power);
  s.spare->attach(power);
  s.main->add_read_error(50);
  TempDir dir;
  const std::string target = dir.file("new.img", size);
  auto ev = std::make_unique<Evacuator>(*s.engine, target_options(), std::vector<std::string>{});
  REQUIRE(ev->start({target, 2 << 20, false}).is_ok());
  wait_block(*ev, 256);
  REQUIRE(ev->pause().is_ok());  // a save point past the lost block
  CHECK(s.engine->saved_evacuation().lost == 1);
  REQUIRE(ev->resume().is_ok());
  const auto w = test::pattern(B, 60);
  REQUIRE(s.engine->write(w.data(), B, 60 * B, true).is_ok());  // region 0's bit
  REQUIRE(s.engine->saved_evacuation().intent_bit(0));
  crash_and_reopen(s, *power, ev);
  Evacuator again(*s.engine, target_options(), {});
  REQUIRE(again.set_rate(0).is_ok());
  const EvacProgress p = wait_synced(again);  // region 0 read again, block 50 with it
  CHECK(again.lost_blocks() == std::vector<uint64_t>{50});
  CHECK(p.lost == 1);
  CHECK(s.engine->saved_evacuation().lost == 1);
  auto v = again.verify();
  REQUIRE(v.is_ok());
  CHECK(v->lost == 1);
  CHECK(v->differ_count == 0);
}

TEST_CASE("evacuate: pause holds the copy and writes still reach NEW; resume finishes; abort "
          "ends it for good",
          "[evacuate]") {
  test::SetParams params;
  params.main_size = 4 << 20;
  auto s = test::make_set(params);
  const uint64_t size = params.main_size;
  const uint64_t blocks = size / B;
  const auto old = test::pattern(size, 6);
  REQUIRE(s.main_mem->write(old.data(), size, 0).is_ok());
  TempDir dir;
  const std::string target = dir.file("new.img", size);
  auto ev = std::make_unique<Evacuator>(*s.engine, target_options(), std::vector<std::string>{});
  CHECK(ev->pause().code() == EINVAL);
  CHECK(ev->resume().code() == EINVAL);
  CHECK(ev->abort().code() == EINVAL);
  CHECK(ev->verify().status().code() == EINVAL);

  REQUIRE(ev->start({target, 2 << 20, false}).is_ok());  // 0.5 s a piece
  CHECK(ev->verify().status().code() == EINVAL);          // not in sync yet
  CHECK(ev->resume().code() == EINVAL);                   // not paused
  wait_block(*ev, 256);
  REQUIRE(ev->pause().is_ok());
  CHECK(ev->progress().state == EvacState::kPaused);
  CHECK(ev->pause().code() == EINVAL);
  const uint64_t at = ev->progress().next_block;
  CHECK(at < blocks);
  std::this_thread::sleep_for(700ms);  // more than a piece takes at this rate
  CHECK(ev->progress().next_block == at);
  CHECK(ev->progress().state == EvacState::kPaused);
  const EvacRecord rec = s.engine->saved_evacuation();
  CHECK(rec.state == state_of(EvacState::kPaused));
  CHECK(rec.cursor == at);

  // Writes while paused reach NEW, below the copy's place and above it.
  const uint64_t mirrored = ev->progress().mirrored;
  const auto below = test::pattern(B, 20), above = test::pattern(2 * B, 1000);
  REQUIRE(s.engine->write(below.data(), B, 20 * B, false).is_ok());
  REQUIRE(s.engine->write(above.data(), 2 * B, 1000 * B, false).is_ok());
  REQUIRE(s.engine->write_zeroes(B, 1010 * B, false).is_ok());
  CHECK(same(read_file(target, 20 * B, B), below));
  CHECK(same(read_file(target, 1000 * B, 2 * B), above));
  CHECK(ev->progress().mirrored == mirrored + 3);
  CHECK(ev->progress().next_block == at);

  REQUIRE(ev->resume().is_ok());
  const EvacProgress resumed = ev->progress();
  CHECK(resumed.state == EvacState::kRunning);
  CHECK(resumed.next_block >= at);  // from where it was
  CHECK(s.engine->saved_evacuation().state == state_of(EvacState::kRunning));
  REQUIRE(ev->set_rate(0).is_ok());
  wait_synced(*ev);
  CHECK(differing_blocks(read_file(target, 0, size), set_bytes(*s.engine, 0, size)).empty());

  // Abort: later writes reach only the set.
  REQUIRE(ev->abort().is_ok());
  CHECK(ev->progress().state == EvacState::kAborted);
  CHECK(s.engine->saved_evacuation().state == state_of(EvacState::kAborted));
  const auto before30 = read_file(target, 30 * B, B);
  const auto q = test::pattern(B, 3030);
  REQUIRE(!same(before30, q));
  REQUIRE(s.engine->write(q.data(), B, 30 * B, true).is_ok());
  REQUIRE(s.engine->flush().is_ok());
  CHECK(same(read_file(target, 30 * B, B), before30));
  CHECK(same(set_bytes(*s.engine, 30 * B, B), q));
  CHECK(ev->abort().code() == EINVAL);
  CHECK(ev->pause().code() == EINVAL);
  CHECK(ev->resume().code() == EINVAL);
  CHECK(ev->verify().status().code() == EINVAL);

  // Across a restart it stays aborted, and nothing reaches NEW.
  ev.reset();
  test::reopen(s);
  CHECK(s.engine->saved_evacuation().state == state_of(EvacState::kAborted));
  Evacuator later(*s.engine, target_options(), {});
  CHECK(later.progress().state == EvacState::kAborted);
  const auto before31 = read_file(target, 31 * B, B);
  const auto r = test::pattern(B, 3131);
  REQUIRE(!same(before31, r));
  REQUIRE(s.engine->write(r.data(), B, 31 * B, true).is_ok());
  CHECK(same(read_file(target, 31 * B, B), before31));
  CHECK(later.progress().mirrored == 0);
  CHECK(later.progress().state == EvacState::kAborted);
}

// --------------------------------------------------------- NEW refuses

TEST_CASE("evacuate: a NEW that refuses a write ends the evacuation as failed; the set goes on",
          "[evacuate]") {
  test::SetParams params;
  params.main_size = 4 << 20;
  auto s = test::make_set(params);
  const uint64_t size = params.main_size;
  TempDir dir;
  const std::string target = dir.file("new.img", size);  // made before the limit
  Evacuator ev(*s.engine, target_options(), {});

  SECTION("a client's write that NEW refuses") {
    const FileSizeLimit limit(2 << 20);  // NEW refuses writes past 2 MiB
    REQUIRE(ev.start({target, 1 << 20, false}).is_ok());  // 1 s a piece: far from 2 MiB
    const auto w = test::pattern(B, 900);
    REQUIRE(s.engine->write(w.data(), B, 900 * B, false).is_ok());  // the set takes it
    const EvacProgress p = ev.progress();
    INFO(describe(p));
    CHECK(p.state == EvacState::kFailed);
    CHECK(!p.error.empty());
    CHECK(s.engine->saved_evacuation().state == state_of(EvacState::kFailed));
    CHECK(same(set_bytes(*s.engine, 900 * B, B), w));
    // From now on writes reach only the set.
    const auto before = read_file(target, 10 * B, B);
    const auto x = test::pattern(B, 10);
    REQUIRE(!same(before, x));
    REQUIRE(s.engine->write(x.data(), B, 10 * B, false).is_ok());
    CHECK(same(read_file(target, 10 * B, B), before));
    CHECK(ev.pause().code() == EINVAL);
    CHECK(ev.abort().code() == EINVAL);
  }
  SECTION("the copy's own write that NEW refuses") {
    const FileSizeLimit limit(2 << 20);
    REQUIRE(ev.start({target, 0, false}).is_ok());
    const EvacProgress p = ev.wait(3s);
    INFO(describe(p));
    // Main is healthy: NEW is what failed, and that ends the evacuation
    // (evacuate.h: kFailed, "NEW refused a write").
    CHECK(p.state == EvacState::kFailed);
    CHECK(!p.waiting_for_main);
    CHECK(p.next_block <= 512);
    CHECK(s.engine->saved_evacuation().state == state_of(EvacState::kFailed));
  }
}

// ------------------------------------------------------------------ close

TEST_CASE("evacuate: a clean close in sync finishes it; NEW is written no more", "[evacuate]") {
  test::SetParams params;
  params.main_size = 2 << 20;
  auto s = test::make_set(params);
  const uint64_t size = params.main_size;
  const uint64_t blocks = size / B;
  const auto old = test::pattern(size, 8);
  REQUIRE(s.main_mem->write(old.data(), size, 0).is_ok());
  TempDir dir;
  const std::string target = dir.file("new.img", size);
  {
    Evacuator ev(*s.engine, target_options(), {});
    REQUIRE(ev.start({target, 0, false}).is_ok());
    wait_synced(ev);
    const auto w = test::pattern(B, 77);
    REQUIRE(s.engine->write(w.data(), B, 77 * B, false).is_ok());
    CHECK(same(read_file(target, 77 * B, B), w));  // in sync, writes go to both
  }  // the frontend stops, then the set closes
  REQUIRE(s.engine->close().is_ok());
  CHECK(s.engine->saved_evacuation().state == state_of(EvacState::kFinished));
  test::reopen(s);
  const EvacRecord rec = s.engine->saved_evacuation();
  CHECK(rec.state == state_of(EvacState::kFinished));
  CHECK(rec.cursor == blocks);
  CHECK(rec.intent.empty());
  CHECK(rec.synced != 0);
  CHECK(rec.target == target);

  Evacuator after(*s.engine, target_options(), {});
  CHECK(after.progress().state == EvacState::kFinished);
  auto v = after.verify();  // opens NEW read-only for it
  REQUIRE(v.is_ok());
  CHECK(v->compared == blocks);
  CHECK(v->differ_count == 0);
  const auto before = read_file(target, 3 * B, B);
  const auto x = test::pattern(B, 33);
  REQUIRE(!same(before, x));
  REQUIRE(s.engine->write(x.data(), B, 3 * B, true).is_ok());
  CHECK(same(read_file(target, 3 * B, B), before));
  CHECK(after.progress().mirrored == 0);
  CHECK(after.progress().state == EvacState::kFinished);
  auto v2 = after.verify();
  REQUIRE(v2.is_ok());
  CHECK(v2->differ == std::vector<uint64_t>{3});
  // A finished evacuation is over: a new one may start.
  CHECK(after.start({dir.file("next.img", size), 0, false}).is_ok());
}

TEST_CASE("evacuate: a clean close while copying keeps it running; the next open goes on",
          "[evacuate]") {
  test::SetParams params;
  params.main_size = 3 << 20;
  auto s = test::make_set(params);
  const uint64_t size = params.main_size;
  const auto old = test::pattern(size, 11);
  REQUIRE(s.main_mem->write(old.data(), size, 0).is_ok());
  TempDir dir;
  const std::string target = dir.file("new.img", size);
  uint64_t at = 0;
  {
    Evacuator ev(*s.engine, target_options(), {});
    REQUIRE(ev.start({target, 2 << 20, false}).is_ok());
    at = wait_block(ev, 256).next_block;
    CHECK(at < size / B);
  }
  REQUIRE(s.engine->close().is_ok());
  const EvacRecord closed = s.engine->saved_evacuation();
  CHECK(closed.state == state_of(EvacState::kRunning));
  CHECK(closed.cursor >= at);
  CHECK(closed.intent.empty());
  test::reopen(s);
  Evacuator again(*s.engine, target_options(), {});
  CHECK(again.progress().state == EvacState::kRunning);
  CHECK(again.progress().next_block >= at);
  REQUIRE(again.set_rate(0).is_ok());
  wait_synced(again);
  CHECK(differing_blocks(read_file(target, 0, size), set_bytes(*s.engine, 0, size)).empty());
}

TEST_CASE("evacuate: a NEW that is another disk at the next open is waited for, never written",
          "[evacuate]") {
  test::SetParams params;
  params.main_size = 2 << 20;
  auto s = test::make_set(params);
  const uint64_t size = params.main_size;
  TempDir dir;
  const std::string target = dir.file("new.img", size);
  {
    Evacuator ev(*s.engine, target_options(), {});
    REQUIRE(ev.start({target, 0, false}).is_ok());
    wait_synced(ev);
  }
  test::reopen(s);  // a crash; meanwhile NEW was replaced by a larger disk
  REQUIRE(::truncate(target.c_str(), static_cast<off_t>(size + (1 << 20))) == 0);
  Evacuator again(*s.engine, target_options(), {});
  const EvacProgress p = again.progress();
  INFO(describe(p));
  // Not given up (the right disk may come back under that path), but not
  // written: the write's region is recorded in the bitmap instead.
  CHECK(p.state == EvacState::kSynced);
  CHECK_THAT(p.error, Catch::Contains("waiting for NEW") && Catch::Contains("another disk"));
  const auto before = read_file(target, 5 * B, B);
  const auto x = test::pattern(B, 55);
  REQUIRE(s.engine->write(x.data(), B, 5 * B, false).is_ok());
  CHECK(same(read_file(target, 5 * B, B), before));
  CHECK(s.engine->saved_evacuation().intent_bit(0));
  CHECK_FALSE(again.verify().is_ok());
}
