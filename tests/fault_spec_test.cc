#include <catch2/catch.hpp>

#include "dmremap/fault_spec.h"
#include "dmremap/memory_device.h"

using namespace dmremap;

TEST_CASE("fault spec: parses every kind, rejects nonsense", "[device]") {
  FaultyDevice dev(std::make_shared<MemoryDevice>(64 * 4096), 4096);
  REQUIRE(apply_fault_spec(dev, "read:1,write:3-4,weak:6x2,read:10-30/10").is_ok());
  std::vector<char> buf(4096);
  CHECK(dev.read(buf.data(), 4096, 4096).code() == EIO);
  CHECK(dev.write(buf.data(), 4096, 4 * 4096).code() == EIO);
  CHECK(dev.read(buf.data(), 4096, 6 * 4096).code() == EIO);
  CHECK(dev.read(buf.data(), 4096, 6 * 4096).code() == EIO);
  CHECK(dev.read(buf.data(), 4096, 6 * 4096).is_ok());
  CHECK(dev.has_read_error(20));
  CHECK_FALSE(dev.has_read_error(21));
  for (const char* bad : {"read", "read:x", "read:5-2", "weak:3", "weak:3x0", "melt:1",
                          "read:64", "write:1-9/0"}) {
    INFO(bad);
    const Status s = apply_fault_spec(dev, bad);
    CHECK(s.code() == EINVAL);
    CHECK_THAT(s.message(), Catch::Contains(bad));
  }
}
