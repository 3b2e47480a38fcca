// The set's figures in the Prometheus text exposition format (version
// 0.0.4), for dmremap-server's --metrics endpoint, the control channel's
// "metrics" command and `dmremap status --format=prometheus` (a file for
// node_exporter's textfile collector). docs/metrics.md lists every metric.
#pragma once

#include <string>

#include "dmremap/engine.h"
#include "dmremap/metadata.h"

namespace dmremap {

// The content type an HTTP endpoint serves them with.
inline constexpr const char* kPrometheusContentType = "text/plain; version=0.0.4; charset=utf-8";

// `live`: the stats of a running engine, so the request counters, the
// latency histograms and the devices' state are included; otherwise only
// what the spare's metadata says.
// With `scan`, also the surface scan's progress.
struct ScanProgress;
std::string prometheus_text(const EngineStats& s, const Superblock& sb, bool live,
                            const ScanProgress* scan = nullptr);

// What `dmremap status --format=prometheus` prints when the set cannot be
// read: dmremap_up 0 (the text above has dmremap_up 1).
std::string prometheus_unreadable_text();

}  // namespace dmremap
