// One conformance suite, run against every BlockDevice implementation.
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cstdlib>
#include <filesystem>
#include <thread>

#include "dmremap/faulty_device.h"
#include "dmremap/file_device.h"
#include "dmremap/memory_device.h"
#include "test_util.h"

using namespace dmremap;
namespace fs = std::filesystem;

namespace {

constexpr uint64_t kSize = 1 << 20;

struct TempFile {
  explicit TempFile(uint64_t size) {
    char tmpl[] = "/tmp/dmremap-test-XXXXXX";
    const int fd = ::mkstemp(tmpl);
    REQUIRE(fd >= 0);
    REQUIRE(::ftruncate(fd, static_cast<off_t>(size)) == 0);
    ::close(fd);
    path = tmpl;
  }
  ~TempFile() { std::error_code ec; fs::remove(path, ec); }
  std::string path;
};

// The contract every device keeps.
void conformance(BlockDevice& dev) {
  REQUIRE(dev.size() == kSize);
  std::vector<char> buf(64 * 1024);

  SECTION("a new device reads zeros") {
    REQUIRE(dev.read(buf.data(), buf.size(), 0).is_ok());
    CHECK(std::count(buf.begin(), buf.end(), 0) == static_cast<long>(buf.size()));
  }
  SECTION("writes read back exactly, aligned and not") {
    for (auto [off, len] : {std::pair<uint64_t, size_t>{0, 4096}, {8192, 65536}, {100, 1000},
                            {4095, 2}, {kSize - 513, 513}}) {
      const auto data = test::pattern(len, off + len);
      REQUIRE(dev.write(data.data(), len, off).is_ok());
      std::vector<char> back(len);
      REQUIRE(dev.read(back.data(), len, off).is_ok());
      CHECK(back == data);
    }
    REQUIRE(dev.flush().is_ok());
  }
  SECTION("an unaligned write keeps its neighbours") {
    const auto base = test::pattern(8192, 7);
    REQUIRE(dev.write(base.data(), base.size(), 0).is_ok());
    const auto patch = test::pattern(100, 8);
    REQUIRE(dev.write(patch.data(), patch.size(), 4000).is_ok());
    std::vector<char> back(8192);
    REQUIRE(dev.read(back.data(), back.size(), 0).is_ok());
    auto expect = base;
    std::copy(patch.begin(), patch.end(), expect.begin() + 4000);
    CHECK(back == expect);
  }
  SECTION("out of range is EINVAL and touches nothing") {
    CHECK(dev.read(buf.data(), 2, kSize - 1).code() == EINVAL);
    CHECK(dev.write(buf.data(), 1, kSize).code() == EINVAL);
    CHECK(dev.read(buf.data(), 1, ~uint64_t{0}).code() == EINVAL);
    CHECK(dev.write_zeroes(4096, kSize - 2048).code() == EINVAL);
    CHECK(dev.trim(1, kSize).code() == EINVAL);
    CHECK(dev.read(buf.data(), 0, kSize).is_ok());
  }
  SECTION("write-zeroes zeroes, trim never fails") {
    const auto data = test::pattern(16384, 3);
    REQUIRE(dev.write(data.data(), data.size(), 4096).is_ok());
    REQUIRE(dev.write_zeroes(8192, 4096).is_ok());
    std::vector<char> back(16384);
    REQUIRE(dev.read(back.data(), back.size(), 4096).is_ok());
    CHECK(std::count(back.begin(), back.begin() + 8192, 0) == 8192);
    CHECK(std::equal(back.begin() + 8192, back.end(), data.begin() + 8192));
    CHECK(dev.trim(8192, 65536).is_ok());
    CHECK(dev.flush().is_ok());
  }
  SECTION("threads writing disjoint ranges all land") {
    // Catch2's assertions are not thread-safe: the threads count failures.
    std::vector<std::thread> threads;
    std::atomic<int> failed{0};
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&dev, &failed, t] {
        for (int i = 0; i < 32; ++i) {
          const uint64_t off = (static_cast<uint64_t>(i) * 4 + t) * 4096;
          const auto d = test::pattern(4096, off);
          if (!dev.write(d.data(), d.size(), off).is_ok()) ++failed;
        }
      });
    }
    for (auto& th : threads) th.join();
    REQUIRE(failed == 0);
    for (uint64_t off = 0; off < 128 * 4096; off += 4096) {
      std::vector<char> back(4096);
      REQUIRE(dev.read(back.data(), 4096, off).is_ok());
      CHECK(back == test::pattern(4096, off));
    }
  }
}

}  // namespace

TEST_CASE("conformance: MemoryDevice", "[device]") {
  MemoryDevice dev(kSize);
  conformance(dev);
}

TEST_CASE("conformance: FileDevice on a regular file", "[device]") {
  TempFile f(kSize);
  auto dev = FileDevice::open(f.path, "file", OpenOptions{});
  REQUIRE(dev.is_ok());
  conformance(*dev.value());
}

TEST_CASE("conformance: FileDevice with O_DIRECT", "[device]") {
  TempFile f(kSize);
  OpenOptions o;
  o.io = IoMode::kDirect;
  auto dev = FileDevice::open(f.path, "file", o);
  if (!dev.is_ok() && dev.status().code() == EINVAL) {
    WARN("filesystem has no O_DIRECT here: " << dev.status().to_string());
    return;
  }
  REQUIRE(dev.is_ok());
  CHECK(dev.value()->alignment() == 4096);
  conformance(*dev.value());
}

TEST_CASE("conformance: FaultyDevice with no faults", "[device]") {
  FaultyDevice dev(std::make_shared<MemoryDevice>(kSize));
  conformance(dev);
}

TEST_CASE("conformance: FileDevice on a loop device", "[device][loop]") {
  if (::geteuid() != 0 || std::system("losetup -f >/dev/null 2>&1") != 0) {
    WARN("skipped: needs root and a free loop device");
    return;
  }
  TempFile f(kSize);
  std::string cmd = "losetup -f --show " + f.path;
  FILE* p = ::popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  char line[256] = {};
  const bool got = std::fgets(line, sizeof line, p) != nullptr;
  ::pclose(p);
  if (!got) {
    WARN("skipped: losetup could not attach a loop device");
    return;
  }
  std::string loop = line;
  loop.erase(loop.find_last_not_of("\n ") + 1);
  struct Detach {
    std::string dev;
    ~Detach() { (void)!std::system(("losetup -d " + dev).c_str()); }
  } detach{loop};
  auto dev = FileDevice::open(loop, "loop", OpenOptions{});
  REQUIRE(dev.is_ok());
  CHECK(dev.value()->is_block_device());
  conformance(*dev.value());
  // O_EXCL: a second exclusive open of the same block device is refused.
  auto second = FileDevice::open(loop, "loop", OpenOptions{});
  CHECK(second.status().code() == EBUSY);
}

TEST_CASE("FileDevice: exclusive lock, clear errors", "[device]") {
  TempFile f(kSize);
  auto first = FileDevice::open(f.path, "spare", OpenOptions{});
  REQUIRE(first.is_ok());
  auto second = FileDevice::open(f.path, "spare", OpenOptions{});
  CHECK(second.status().code() == EBUSY);
  CHECK_THAT(second.status().message(), Catch::Contains("locked by another process"));
  OpenOptions peek;
  peek.read_only = true;
  peek.exclusive = false;
  auto inspector = FileDevice::open(f.path, "spare", peek);
  REQUIRE(inspector.is_ok());
  char c = 0;
  CHECK(inspector.value()->write(&c, 1, 0).code() == EPERM);

  auto missing = FileDevice::open(f.path + ".missing", "main", OpenOptions{});
  CHECK(missing.status().code() == ENOENT);
  CHECK_THAT(missing.status().to_string(), Catch::StartsWith("main (") &&
                                               Catch::Contains("No such file or directory"));
  auto dir = FileDevice::open("/", "main", OpenOptions{});
  CHECK(dir.status().code() == EINVAL);
}

TEST_CASE("FileDevice: holes are reported for the blank-spare scan", "[device]") {
  TempFile f(kSize);
  auto dev = FileDevice::open(f.path, "spare", OpenOptions{});
  REQUIRE(dev.is_ok());
  auto blank = spare_is_blank(*dev.value());
  REQUIRE(blank.is_ok());
  CHECK(blank.value());
  const char one = 1;
  REQUIRE(dev.value()->write(&one, 1, kSize - 10).is_ok());
  auto used = spare_is_blank(*dev.value());
  REQUIRE(used.is_ok());
  CHECK_FALSE(used.value());
}

TEST_CASE("FaultyDevice: dm-dust faults", "[device]") {
  auto mem = std::make_shared<MemoryDevice>(kSize);
  FaultyDevice dev(mem, 4096);
  std::vector<char> buf(8192);
  dev.add_read_error(1);
  CHECK(dev.read(buf.data(), 8192, 0).code() == EIO);
  CHECK(dev.read(buf.data(), 4096, 0).is_ok());
  REQUIRE(dev.write(buf.data(), 4096, 4096).is_ok());  // a write clears it
  CHECK(dev.read(buf.data(), 8192, 0).is_ok());

  dev.add_write_error(3);
  const auto data = test::pattern(3 * 4096, 5);
  CHECK(dev.write(data.data(), data.size(), 2 * 4096).code() == EIO);
  // The part before the bad block was written, the bad block kept its data.
  REQUIRE(dev.read(buf.data(), 4096, 2 * 4096).is_ok());
  CHECK(std::equal(buf.begin(), buf.begin() + 4096, data.begin()));
  REQUIRE(dev.read(buf.data(), 4096, 3 * 4096).is_ok());
  CHECK(std::count(buf.begin(), buf.begin() + 4096, 0) == 4096);

  dev.add_weak_block(7, 2);
  CHECK(dev.read(buf.data(), 4096, 7 * 4096).code() == EIO);
  CHECK(dev.read(buf.data(), 4096, 7 * 4096).code() == EIO);
  CHECK(dev.read(buf.data(), 4096, 7 * 4096).is_ok());
}

TEST_CASE("FaultyDevice: power cut drops or tears unflushed writes", "[device]") {
  auto mem = std::make_shared<MemoryDevice>(kSize);
  auto power = std::make_shared<PowerSwitch>();
  FaultyDevice dev(mem, 512);
  dev.attach(power);
  const auto durable = test::pattern(8192, 1);
  REQUIRE(dev.write(durable.data(), durable.size(), 0).is_ok());
  REQUIRE(dev.flush().is_ok());
  const auto lost = test::pattern(8192, 2);
  REQUIRE(dev.write(lost.data(), lost.size(), 0).is_ok());
  CHECK(dev.unflushed_writes() == 1);

  SECTION("drop") {
    dev.power_cut(FaultyDevice::CutMode::kDrop, 1);
    std::vector<char> back(8192);
    REQUIRE(mem->read(back.data(), back.size(), 0).is_ok());
    CHECK(back == durable);
  }
  SECTION("tear: every sector is old or new, and some of each") {
    dev.power_cut(FaultyDevice::CutMode::kTear, 42);
    std::vector<char> back(8192);
    REQUIRE(mem->read(back.data(), back.size(), 0).is_ok());
    int old_sectors = 0, new_sectors = 0;
    for (size_t s = 0; s < 16; ++s) {
      const bool is_old = std::equal(back.begin() + s * 512, back.begin() + (s + 1) * 512,
                                     durable.begin() + s * 512);
      const bool is_new = std::equal(back.begin() + s * 512, back.begin() + (s + 1) * 512,
                                     lost.begin() + s * 512);
      CHECK((is_old || is_new));
      old_sectors += is_old;
      new_sectors += is_new;
    }
    CHECK(old_sectors > 0);
    CHECK(new_sectors > 0);
  }
  SECTION("the switch cuts every attached device at one tick") {
    power->cut_after(2);
    char c = 'x';
    CHECK(dev.write(&c, 1, 0).is_ok());
    CHECK(dev.write(&c, 1, 1).code() == EIO);  // the cut lands here
    CHECK(power->is_off());
    CHECK(dev.flush().code() == EIO);
    CHECK(dev.read(&c, 1, 0).code() == EIO);
  }
}
