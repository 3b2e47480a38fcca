// The Prometheus text (lib/metrics.h): names, labels, the histogram's
// cumulative buckets, and what a set that is not served leaves out.
#include <catch2/catch.hpp>

#include <chrono>
#include <sstream>
#include <string>

#include "dmremap/latency.h"
#include "dmremap/metrics.h"
#include "test_util.h"

using namespace dmremap;

namespace {
// The value of the one line that starts with `sample` and a space.
std::string sample_value(const std::string& text, const std::string& sample) {
  std::istringstream in(text);
  std::string line, found;
  int seen = 0;
  while (std::getline(in, line)) {
    if (line.rfind(sample + " ", 0) == 0) {
      found = line.substr(sample.size() + 1);
      ++seen;
    }
  }
  REQUIRE(seen == 1);
  return found;
}
}  // namespace

TEST_CASE("latency histogram: each duration in the first bucket that holds it", "[metrics]") {
  LatencyHistogram h;
  h.record(std::chrono::microseconds(50));    // <= 100 us
  h.record(std::chrono::microseconds(100));   // <= 100 us: bounds are inclusive
  h.record(std::chrono::milliseconds(3));     // <= 5 ms
  h.record(std::chrono::seconds(60));         // past 30 s: the last bucket
  const auto s = h.snapshot();
  CHECK(s.count == 4);
  CHECK(s.buckets[0] == 2);
  CHECK(s.buckets[5] == 1);
  CHECK(s.buckets.back() == 1);
  CHECK(s.sum_seconds == Approx(60.00315));
}

TEST_CASE("metrics: a served set's figures, counters and histogram", "[metrics]") {
  auto s = test::make_set();
  std::vector<char> buf(4096);
  s.main->add_read_error(5);
  s.main->add_write_error(9);
  REQUIRE(s.engine->read(buf.data(), buf.size(), 0).is_ok());
  REQUIRE(s.engine->read(buf.data(), buf.size(), 5 * 4096).code() == EIO);
  REQUIRE(s.engine->write(buf.data(), buf.size(), 9 * 4096, false).is_ok());
  REQUIRE(s.engine->flush().is_ok());
  const std::string text = prometheus_text(s.engine->stats(), s.engine->superblock(), true);

  CHECK(sample_value(text, "dmremap_pending_blocks") == "1");
  CHECK(sample_value(text, "dmremap_remapped_blocks") == "1");
  CHECK(sample_value(text, "dmremap_remap_events_total{cause=\"write-error\"}") == "1");
  CHECK(sample_value(text, "dmremap_health{state=\"warning\"}") == "1");
  CHECK(sample_value(text, "dmremap_health{state=\"ok\"}") == "0");
  CHECK(sample_value(text, "dmremap_requests_total{op=\"read\"}") == "2");
  CHECK(sample_value(text, "dmremap_requests_total{op=\"write\"}") == "1");
  CHECK(sample_value(text, "dmremap_device_online{device=\"spare\"}") == "1");
  // Cumulative buckets end at the count.
  CHECK(sample_value(text, "dmremap_request_duration_seconds_bucket{op=\"read\",le=\"+Inf\"}") ==
        "2");
  CHECK(sample_value(text, "dmremap_request_duration_seconds_count{op=\"flush\"}") == "1");
  CHECK(sample_value(text, "dmremap_request_duration_seconds_bucket{op=\"read\",le=\"30\"}") ==
        "2");
  // One HELP and one TYPE per family.
  CHECK(text.find("# TYPE dmremap_request_duration_seconds histogram\n") != std::string::npos);
  CHECK(text.find("# TYPE dmremap_remap_events_total counter\n") != std::string::npos);
  CHECK(text.back() == '\n');
}

TEST_CASE("metrics: from the spare alone, no live figures", "[metrics]") {
  auto s = test::make_set();
  const std::string text = prometheus_text(s.engine->stats(), s.engine->superblock(), false);
  CHECK(sample_value(text, "dmremap_pending_blocks") == "0");
  CHECK(text.find("dmremap_requests_total") == std::string::npos);
  CHECK(text.find("dmremap_request_duration_seconds") == std::string::npos);
  CHECK(text.find("dmremap_device_online") == std::string::npos);
}

TEST_CASE("metrics: every problem assess_health can name is a health_problem sample", "[metrics]") {
  // All problems at once, so that a key added to the one list and not the
  // other shows here.
  EngineStats s;
  s.main_offline_since = 1;
  s.lease_lapsed_seconds = 6;
  // std::string temporaries: GCC 12's -Wrestrict misfires on assigning a
  // short literal here under ASan (GCC bug 105329).
  s.flush_failure = std::string("flush failed");
  s.journal_broken = true;
  s.metadata_degraded = {std::string("superblock copy B")};
  s.pending = 1;
  s.slots_total = 10;
  s.slots_used = 9;
  s.slots_free = 1;  // nearly full, not exhausted
  assess_health(s, 80);
  Superblock sb;
  const std::string text = prometheus_text(s, sb, false);
  for (const std::string& p : s.health_problems) {
    CHECK(sample_value(text, "dmremap_health_problem{problem=\"" + p + "\"}") == "1");
  }
  CHECK(s.health_problems.size() == 7);  // all but pool_exhausted
  CHECK(sample_value(text, "dmremap_health_problem{problem=\"pool_exhausted\"}") == "0");
}
