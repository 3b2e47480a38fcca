#include <catch2/catch.hpp>

#include "test_util.h"

using namespace dmremap;

TEST_CASE("a fresh set reads zeros and stores a write", "[engine]") {
  auto s = test::make_set();
  std::vector<char> buf(8192, 'x');
  REQUIRE(s.engine->read(buf.data(), buf.size(), 0).is_ok());
  CHECK(std::all_of(buf.begin(), buf.end(), [](char c) { return c == 0; }));
  auto data = test::pattern(8192, 1);
  REQUIRE(s.engine->write(data.data(), data.size(), 4096, false).is_ok());
  REQUIRE(s.engine->read(buf.data(), buf.size(), 4096).is_ok());
  CHECK(buf == data);
}
