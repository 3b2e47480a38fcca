// The control channel (control.h): a running set's live status over a Unix
// socket, its access, and what it does with requests it cannot answer.
#include <catch2/catch.hpp>

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <string>
#include <thread>

#include "dmremap/control.h"
#include "dmremap/metadata_store.h"
#include "dmremap/scan.h"
#include "dmremap/set_actions.h"
#include "test_util.h"

using namespace dmremap;

namespace {
constexpr uint32_t B = 4096;

// A fresh directory for sockets, removed with its contents.
struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/dmremap-control-XXXXXX";
    REQUIRE(::mkdtemp(tmpl) != nullptr);
    path = tmpl;
  }
  ~TempDir() { (void)std::system(("rm -rf '" + path + "'").c_str()); }
};

// A client socket connected to `path`, speaking no protocol of its own.
int connect_raw(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  return fd;
}

// Sends raw bytes and returns what comes back before `lines` newlines.
std::string raw_exchange(const std::string& path, const std::string& bytes, int lines) {
  const int fd = connect_raw(path);
  REQUIRE(::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size()));
  std::string in;
  while (std::count(in.begin(), in.end(), '\n') < lines) {
    char buf[4096];
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    in.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return in;
}

EngineOptions quick_reconnect() {
  EngineOptions o;
  o.reconnect_first = std::chrono::milliseconds(0);
  o.reconnect_max = std::chrono::milliseconds(0);
  return o;
}
}  // namespace

TEST_CASE("control: status of a served set says main offline since T, then online again",
          "[control][offline]") {
  TempDir dir;
  test::SetParams p;
  p.options = quick_reconnect();
  auto s = test::make_set(p);
  auto server = ControlServer::start(dir.path + "/ctl", engine_commands(*s.engine));
  REQUIRE(server.is_ok());

  const auto data = test::pattern(B, 1);
  REQUIRE(s.engine->write(data.data(), B, 0, false).is_ok());
  REQUIRE(s.engine->flush().is_ok());
  auto before = control_call(dir.path + "/ctl", Json{{"command", "status"}});
  REQUIRE(before.is_ok());
  CHECK(before.value()["served"] == true);
  CHECK(before.value()["main"]["state"] == "online");
  CHECK(before.value()["health"] == "ok");
  CHECK(before.value()["requests"]["writes"] == 1);
  CHECK(before.value()["uuid"] == uuid_string(s.engine->superblock().uuid));

  s.main->set_gone(ENOTCONN);
  std::vector<char> buf(B);
  REQUIRE(s.engine->read(buf.data(), B, 5 * B).code() == EIO);
  auto during = control_call(dir.path + "/ctl", Json{{"command", "status"}});
  REQUIRE(during.is_ok());
  const Json& j = during.value();
  CHECK(j["main"]["state"] == "offline");
  const std::string since = j["main"]["offline_since"];
  CHECK(since.size() == 20);  // 2026-11-30T16:19:06Z
  CHECK(j["health"] == "failing");
  CHECK(j["health_reason"].get<std::string>().rfind("main offline since " + since, 0) == 0);
  CHECK(j["pending"] == 0);
  CHECK(j["remaps"] == 0);

  s.main->set_back();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  for (;;) {
    auto after = control_call(dir.path + "/ctl", Json{{"command", "status"}});
    REQUIRE(after.is_ok());
    if (after.value()["main"]["state"] == "online") {
      CHECK(after.value()["health"] == "ok");
      break;
    }
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  server.value().reset();
  REQUIRE(s.engine->close().is_ok());
}

TEST_CASE("control: the socket is its owner's only, and it goes when the server does",
          "[control]") {
  TempDir dir;
  auto s = test::make_set();
  const std::string path = dir.path + "/ctl";
  {
    auto server = ControlServer::start(path, engine_commands(*s.engine));
    REQUIRE(server.is_ok());
    struct stat st {};
    REQUIRE(::lstat(path.c_str(), &st) == 0);
    CHECK(S_ISSOCK(st.st_mode));
    CHECK((st.st_mode & 0777) == 0600);

    // A second server on the same path is refused while the first answers.
    auto second = ControlServer::start(path, engine_commands(*s.engine));
    REQUIRE_FALSE(second.is_ok());
    CHECK(second.status().code() == EADDRINUSE);
  }
  struct stat st {};
  CHECK(::lstat(path.c_str(), &st) != 0);
  auto gone = control_call(path, Json{{"command", "status"}});
  REQUIRE_FALSE(gone.is_ok());
  CHECK(gone.status().code() == ENOENT);
  REQUIRE(s.engine->close().is_ok());
}

TEST_CASE("control: a socket left by a dead process is replaced; a regular file is not",
          "[control]") {
  TempDir dir;
  auto s = test::make_set();
  const std::string stale = dir.path + "/stale";
  {
    // Bound, then closed without unlink: what a killed server leaves.
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, stale.c_str(), sizeof addr.sun_path - 1);
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    ::close(fd);
  }
  auto server = ControlServer::start(stale, engine_commands(*s.engine));
  REQUIRE(server.is_ok());
  CHECK(control_call(stale, Json{{"command", "status"}}).is_ok());

  const std::string file = dir.path + "/file";
  std::ofstream(file) << "not a socket";
  auto refused = ControlServer::start(file, engine_commands(*s.engine));
  REQUIRE_FALSE(refused.is_ok());
  CHECK(refused.status().code() == EEXIST);
  std::ifstream in(file);
  std::string kept;
  std::getline(in, kept);
  CHECK(kept == "not a socket");

  auto too_long = ControlServer::start(dir.path + "/" + std::string(200, 'x'),
                                       engine_commands(*s.engine));
  CHECK(too_long.status().code() == ENAMETOOLONG);
  server.value().reset();
  REQUIRE(s.engine->close().is_ok());
}

TEST_CASE("control: bad requests get an error reply and the connection goes on",
          "[control]") {
  TempDir dir;
  auto s = test::make_set();
  const std::string path = dir.path + "/ctl";
  auto server = ControlServer::start(path, engine_commands(*s.engine));
  REQUIRE(server.is_ok());
  const std::string out = raw_exchange(
      path, "not json\n[1,2]\n{\"command\":\"explode\"}\n{}\n{\"command\":\"status\"}\n", 5);
  std::vector<Json> replies;
  size_t at = 0;
  for (size_t nl; (nl = out.find('\n', at)) != std::string::npos; at = nl + 1) {
    replies.push_back(Json::parse(out.substr(at, nl - at)));
  }
  REQUIRE(replies.size() == 5);
  for (int i = 0; i < 4; ++i) {
    CHECK(replies[i]["ok"] == false);
    CHECK(replies[i]["errno"] == EINVAL);
  }
  CHECK(replies[2]["error"].get<std::string>().find("explode") != std::string::npos);
  CHECK(replies[4]["ok"] == true);

  auto unknown = control_call(path, Json{{"command", "explode"}});
  CHECK(unknown.status().code() == EINVAL);

  // A line that never ends is cut off at 1 MiB, with a reply that says so.
  const std::string flood = raw_exchange(path, std::string((1 << 20) + 1, 'x'), 1);
  CHECK(flood.find("too long") != std::string::npos);
  CHECK(control_call(path, Json{{"command", "status"}}).is_ok());
  server.value().reset();
  REQUIRE(s.engine->close().is_ok());
}


TEST_CASE("control: a client that never reads its replies is not read either", "[control]") {
  TempDir dir;
  const std::string path = dir.path + "/ctl";
  // A big reply per request, as a status is.
  auto server = ControlServer::start(path, [](const Json&) {
    return Json{{"filler", std::string(4000, 'x')}};
  });
  REQUIRE(server.is_ok());
  const int fd = connect_raw(path);
  const std::string req = "{\"command\":\"status\"}\n";
  std::string flood;
  for (int i = 0; i < 4096; ++i) flood += req;
  // Send without reading until the server stops taking requests.
  timeval tv{0, 300000};
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  size_t accepted = 0;
  for (int round = 0; round < 200; ++round) {
    const ssize_t n = ::send(fd, flood.data(), flood.size(), MSG_NOSIGNAL);
    if (n <= 0) break;
    accepted += static_cast<size_t>(n);
  }
  // 200 rounds of 86 KiB would be 17 MiB of requests and 3 GiB of replies;
  // the server stopped reading once about 1 MiB of replies waited.
  CHECK(accepted < 8u * 1024 * 1024);
  // Everyone else is still answered.
  CHECK(control_call(path, Json{{"command", "status"}}).is_ok());
  ::close(fd);
}

TEST_CASE("control: a client that half-closes gets every reply, in order", "[control]") {
  TempDir dir;
  const std::string path = dir.path + "/ctl";
  int n = 0;
  auto server = ControlServer::start(path, [&n](const Json&) { return Json{{"n", n++}}; });
  REQUIRE(server.is_ok());
  const int fd = connect_raw(path);
  std::string reqs;
  for (int i = 0; i < 1000; ++i) reqs += "{\"command\":\"count\"}\n";
  REQUIRE(::send(fd, reqs.data(), reqs.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(reqs.size()));
  ::shutdown(fd, SHUT_WR);
  std::string in;
  char buf[65536];
  for (ssize_t got; (got = ::recv(fd, buf, sizeof buf, 0)) > 0;) in.append(buf, static_cast<size_t>(got));
  ::close(fd);
  int lines = 0;
  size_t at = 0;
  for (size_t nl; (nl = in.find('\n', at)) != std::string::npos; at = nl + 1, ++lines) {
    CHECK(Json::parse(in.substr(at, nl - at))["n"] == lines);
  }
  CHECK(lines == 1000);
}

TEST_CASE("control: a reply that is not UTF-8, or a handler that throws, harms nothing",
          "[control]") {
  TempDir dir;
  const std::string path = dir.path + "/ctl";
  auto server = ControlServer::start(path, [](const Json& r) -> Json {
    if (r["command"] == "latin1") return Json{{"serial", "disk \xe9"}};
    if (r["command"] == "throw") throw std::runtime_error("handler broke");
    return Json{{"fine", true}};
  });
  REQUIRE(server.is_ok());
  auto latin1 = control_call(path, Json{{"command", "latin1"}});
  REQUIRE(latin1.is_ok());
  CHECK(latin1.value()["serial"].get<std::string>().rfind("disk ", 0) == 0);
  auto thrown = control_call(path, Json{{"command", "throw"}});
  CHECK(thrown.status().code() == EIO);
  CHECK_THAT(thrown.status().message(), Catch::Contains("handler broke"));
  CHECK(control_call(path, Json{{"command", "ok"}}).is_ok());
}

TEST_CASE("control: idle clients are dropped, and past the limit a client gets EBUSY",
          "[control]") {
  TempDir dir;
  const std::string path = dir.path + "/ctl";
  ControlOptions o;
  o.idle_timeout = std::chrono::milliseconds(300);
  o.max_clients = 4;
  auto server = ControlServer::start(path, [](const Json&) { return Json::object(); }, o);
  REQUIRE(server.is_ok());
  std::vector<int> idle;
  for (int i = 0; i < 4; ++i) idle.push_back(connect_raw(path));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  auto busy = control_call(path, Json{{"command", "status"}});
  CHECK(busy.status().code() == EBUSY);
  // The idle ones are closed by the server (end of file for them) ...
  for (int fd : idle) {
    char c;
    timeval tv{5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    CHECK(::recv(fd, &c, 1, 0) == 0);
    ::close(fd);
  }
  // ... and their places are free again.
  CHECK(control_call(path, Json{{"command", "status"}}).is_ok());
}

TEST_CASE("control: list pages through the table; remap and forget-pending change it",
          "[control]") {
  TempDir dir;
  auto s = test::make_set();
  const std::string path = dir.path + "/ctl";
  auto server = ControlServer::start(path, engine_commands(*s.engine));
  REQUIRE(server.is_ok());
  for (uint64_t b : {3u, 7u, 9u}) REQUIRE(s.engine->remap_block(b).is_ok());
  s.main->add_read_error(20);
  auto remapped = control_call(path, Json{{"command", "remap"}, {"blocks", {7, 20, 99999}}});
  REQUIRE(remapped.is_ok());
  const Json& r = remapped.value()["results"];
  REQUIRE(r.size() == 3);
  CHECK(r[0]["result"] == "already");
  CHECK(r[1]["result"] == "pending");
  CHECK(r[2]["result"] == "past_end");

  // Two entries a page: 3 7 | 9 20.
  auto first = control_call(path, Json{{"command", "list"}, {"limit", 2}});
  REQUIRE(first.is_ok());
  CHECK(first.value()["remaps"].size() == 2);
  CHECK(first.value()["next"] == 9);
  auto second = control_call(path, Json{{"command", "list"}, {"limit", 2}, {"from", 9}});
  REQUIRE(second.is_ok());
  CHECK(second.value()["remaps"][0]["block"] == 9);
  CHECK(second.value()["pending"][0]["block"] == 20);
  CHECK(second.value()["next"].is_null());
  CHECK(first.value()["bad_slots"].is_array());
  CHECK_FALSE(second.value().contains("bad_slots"));  // said once, on the first page
  auto only_pending = control_call(path, Json{{"command", "list"}, {"remapped", false}});
  REQUIRE(only_pending.is_ok());
  CHECK(only_pending.value()["remaps"].empty());
  CHECK(only_pending.value()["pending"].size() == 1);

  // Still unreadable: kept. Then the sector recovers: cleared.
  auto kept = control_call(path, Json{{"command", "forget-pending"}, {"all", true}});
  REQUIRE(kept.is_ok());
  CHECK(kept.value()["kept"] == Json{20});
  s.main->clear_faults();
  auto cleared = control_call(path, Json{{"command", "forget-pending"}, {"blocks", {20}}});
  REQUIRE(cleared.is_ok());
  CHECK(cleared.value()["cleared"] == Json{20});
  CHECK(s.engine->stats().pending == 0);

  auto bad = control_call(path, Json{{"command", "list"}, {"limit", "ten"}});
  CHECK(bad.status().code() == EINVAL);
  // Without a scanner (a read-only set): no scan.
  CHECK(control_call(path, Json{{"command", "scan"}}).status().code() == ENOTSUP);
}

TEST_CASE("control: only root or the serving user may change the set", "[control]") {
  // The server adds the kernel's word about the client (SO_PEERCRED) as
  // "peer"; a client's own "peer" is replaced. Here the handler is called
  // directly, as for a client of another user.
  auto s = test::make_set();
  auto handler = engine_commands(*s.engine);
  const Json stranger{{"uid", 4242424}, {"pid", 1}};
  CHECK(handler(Json{{"command", "status"}, {"peer", stranger}}).reply["served"] == true);
  CHECK(handler(Json{{"command", "list"}, {"peer", stranger}}).reply["remaps"].empty());
  for (const char* cmd : {"remap", "forget-pending"}) {
    CAPTURE(cmd);
    try {
      handler(Json{{"command", cmd}, {"blocks", {1}}, {"peer", stranger}});
      FAIL("a stranger changed the set");
    } catch (const ControlError& e) {
      CHECK(e.code == EPERM);
    }
  }
  CHECK(s.engine->stats().remaps == 0);
  // Through the socket the peer is this process's own user: allowed, and a
  // "peer" the client claims is not believed.
  TempDir dir;
  auto server = ControlServer::start(dir.path + "/ctl", engine_commands(*s.engine));
  REQUIRE(server.is_ok());
  auto done = control_call(dir.path + "/ctl",
                           Json{{"command", "remap"}, {"blocks", {1}}, {"peer", stranger}});
  REQUIRE(done.is_ok());
  CHECK(done.value()["results"][0]["result"] == "remapped");
}

TEST_CASE("control: a long remap holds up neither status nor the server's stop", "[control]") {
  // Each of these blocks takes 300 ms to read, as a disk retries a bad
  // sector inside (a real one takes seconds).
  auto s = test::make_set();
  for (uint64_t b = 1; b < 40; ++b) s.main->add_slow_block(b, std::chrono::milliseconds(300));
  TempDir dir;
  const std::string path = dir.path + "/ctl";
  auto server = ControlServer::start(path, engine_commands(*s.engine));
  REQUIRE(server.is_ok());
  auto remaps = [&] { return s.engine->stats().remaps; };
  auto wait_for_remaps = [&](uint64_t n) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (remaps() < n) {
      REQUIRE(std::chrono::steady_clock::now() < deadline);
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  };

  SECTION("status is answered while a remap works") {
    Result<Json> done = Status::ok();
    std::thread admin([&] {
      done = control_call(path, Json{{"command", "remap"}, {"blocks", {1, 2, 3, 4, 5}}});
    });
    wait_for_remaps(1);
    auto st = control_call(path, Json{{"command", "status"}});
    const uint64_t seen = remaps();
    admin.join();
    REQUIRE(st.is_ok());
    CHECK(seen < 5);  // answered before the remap was over
    REQUIRE(done.is_ok());
    CHECK(done.value()["results"].size() == 5);
    CHECK(remaps() == 5);
  }
  SECTION("a client that gives up stops its remap after the block it is on") {
    auto gave_up = control_call(path, Json{{"command", "remap"}, {"blocks", {10, 11, 12, 13, 14,
                                                                            15, 16, 17, 18, 19}}},
                                std::chrono::milliseconds(500));
    CHECK(gave_up.status().code() == ETIMEDOUT);
    // Long enough for all ten (3 s) had it gone on.
    std::this_thread::sleep_for(std::chrono::seconds(4));
    CHECK(remaps() < 5);
    // The server still answers.
    REQUIRE(control_call(path, Json{{"command", "status"}}).is_ok());
  }
  SECTION("the server's stop waits for one block, not for the whole list") {
    Result<Json> done = Status::ok();
    std::thread admin([&] {
      std::vector<uint64_t> blocks;
      for (uint64_t b = 20; b < 40; ++b) blocks.push_back(b);
      done = control_call(path, Json{{"command", "remap"}, {"blocks", blocks}});
    });
    wait_for_remaps(1);
    server.value().reset();
    const uint64_t at_stop = remaps();
    admin.join();
    CHECK_FALSE(done.is_ok());  // the connection closed unanswered
    CHECK(at_stop < 20);
    std::this_thread::sleep_for(std::chrono::milliseconds(700));
    CHECK(remaps() == at_stop);  // nothing goes on behind the stop
  }
}

TEST_CASE("list: a page never holds more than kMaxListLimit entries, whatever the limit",
          "[control]") {
  RemapTable table;
  const uint64_t n = kMaxListLimit + 100;
  for (uint64_t b = 0; b < n; ++b) table.apply(Record{Record::kPending, Cause::kManual, 2 * b, 0});
  Superblock sb;
  sb.main_size = 4 * n * 4096;
  sb.block_size = 4096;
  ListQuery q;
  q.limit = ~uint64_t{0};
  const Json first = list_json(table, sb, nullptr, q);
  CHECK(first["pending"].size() == kMaxListLimit);
  CHECK(first["next"] == 2 * kMaxListLimit);
  q.from = first["next"].get<uint64_t>();
  const Json rest = list_json(table, sb, nullptr, q);
  CHECK(rest["pending"].size() == 100);
  CHECK(rest["next"].is_null());
}

TEST_CASE("control: scan answers its status to anyone, a bad action plainly", "[control]") {
  auto s = test::make_set();
  Scanner scanner(*s.engine);
  auto handler = engine_commands(*s.engine, &scanner);
  const Json stranger{{"uid", 4242424}, {"pid", 1}};
  CHECK(handler(Json{{"command", "scan"}, {"peer", stranger}}).reply["state"] == "none");
  try {
    (void)handler(Json{{"command", "scan"}, {"action", 7}, {"peer", stranger}});
    FAIL("a non-string action was taken");
  } catch (const ControlError& e) {
    CHECK(e.code == EINVAL);
  }
  try {
    (void)handler(Json{{"command", "scan"}, {"action", "start"}, {"peer", stranger}});
    FAIL("a stranger started a scan");
  } catch (const ControlError& e) {
    CHECK(e.code == EPERM);
  }
  CHECK(scanner.progress().state == ScanState::kNone);
}

TEST_CASE("list: a remap and a pending mark carry when they happened, across a crash",
          "[control]") {
  auto s = test::make_set();
  const auto before = static_cast<uint64_t>(std::time(nullptr));
  std::vector<char> buf(4096);
  s.main->add_read_error(3);
  CHECK_FALSE(s.engine->read(buf.data(), 4096, 3 * 4096).is_ok());  // block 3: pending
  s.main->add_write_error(5);
  REQUIRE(s.engine->write(buf.data(), 4096, 5 * 4096, true).is_ok());  // block 5: remapped
  const auto after = static_cast<uint64_t>(std::time(nullptr));
  auto check = [&](const Json& j) {
    REQUIRE(j["pending"].size() == 1);
    REQUIRE(j["remaps"].size() == 1);
    const uint64_t marked = j["pending"][0]["time"].get<uint64_t>();
    const uint64_t remapped = j["remaps"][0]["time"].get<uint64_t>();
    CHECK(marked >= before);
    CHECK(marked <= after);
    CHECK(remapped >= before);
    CHECK(remapped <= after);
  };
  check(list_json(*s.engine, ListQuery{}));
  // From the journal after a crash, then from the checkpoint after a clean
  // close, offline as `dmremap list --spare` reads it.
  test::reopen(s);
  check(list_json(*s.engine, ListQuery{}));
  REQUIRE(s.engine->close().is_ok());
  s.engine.reset();
  RemapTable table;
  auto store = MetadataStore::open(s.spare, table, false);
  REQUIRE(store.is_ok());
  check(list_json(table, store.value()->superblock(), s.spare.get(), ListQuery{}));
  // Without the spare to read the slot headers, a remap's time is not known.
  CHECK(list_json(table, store.value()->superblock(), nullptr, ListQuery{})["remaps"][0]["time"]
            .is_null());
}

TEST_CASE("control: the spare records the frontend's socket, and --spare finds it", "[control]") {
  TempDir dir;
  auto s = test::make_set();
  const std::string path = dir.path + "/ctl";
  CHECK(find_control(*s.spare).empty());  // nothing recorded
  auto server = ControlServer::start(path, engine_commands(*s.engine));
  REQUIRE(server.is_ok());
  advertise_control(*s.engine, path);
  auto sb = read_superblock(*s.spare);
  REQUIRE(sb.is_ok());
  CHECK(sb->sb.control_path == path);
  CHECK(find_control(*s.spare) == path);
  // Another set's frontend on that path (a crash left the path behind, and
  // the socket went to someone else): not this set, not found.
  server.value().reset();
  auto other = test::make_set();
  auto impostor = ControlServer::start(path, engine_commands(*other.engine));
  REQUIRE(impostor.is_ok());
  CHECK(find_control(*s.spare).empty());
  impostor.value().reset();
  // Nobody answers: not found either.
  CHECK(find_control(*s.spare).empty());
  // A clean close forgets it.
  REQUIRE(s.engine->close().is_ok());
  sb = read_superblock(*s.spare);
  REQUIRE(sb.is_ok());
  CHECK(sb->sb.control_path.empty());
}
