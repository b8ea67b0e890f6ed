// #/devices/ID a device: registry row, latest metrics, sequence gaps, charts of its metrics
// over a chosen range (a bucket without data is a gap), update and other events.

import { api } from "./api.js";
import { formatValue, lineChart } from "./charts.js";
import { ago, badge, facts, h, link, rolloutLink, section, setCrumbs, table, when } from "./view.js";

const RANGES = { "1h": 3600, "6h": 21600, "24h": 86400, "7d": 604800 };
const STEPS = [60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600];
const NOT_ERRORS = ["ok", "queued"]; // request outcomes that are not failures (as the API counts)

// The charts: a title, a unit and the series (metric names from docs/protocol.md#telemetry).
const CHARTS = [
  { id: "tokens", title: "Tokens per second (p50)", unit: "tok/s", metrics: [["p50", "answers.tokens_per_s_p50"]] },
  { id: "latency", title: "Answer latency", unit: "ms", metrics: [["p50", "answers.latency_ms.p50"], ["p95", "answers.latency_ms.p95"]] },
  { id: "ttft", title: "Time to first token", unit: "ms", metrics: [["p50", "answers.ttft_ms.p50"], ["p95", "answers.ttft_ms.p95"]] },
  { id: "rss", title: "Resident memory", unit: "MB", metrics: [["rss", "rss_mb"]] },
  { id: "temperature", title: "CPU temperature", unit: "°C", metrics: [["cpu", "cpu_temp_c"]] },
];

function stepFor(range) {
  return STEPS.find((s) => range / s <= 100) ?? STEPS.at(-1);
}

export async function devicePage(id, params) {
  setCrumbs(link("#/", "Fleet"), `Device ${id}`);
  const rangeName = RANGES[params.get("since")] ? params.get("since") : "6h";
  const range = RANGES[rangeName];
  const step = stepFor(range);
  const until = Math.ceil(Date.now() / 1000 / step) * step;
  const since = until - range;
  const path = `/devices/${encodeURIComponent(id)}`;
  const detail = await api(path);
  const d = detail.device;
  const latest = detail.latest_metrics;
  const data = latest?.data ?? {};
  const pick = (name) => name.split(".").reduce((v, k) => (v && typeof v === "object" ? v[k] : undefined), data);
  const series = (metric, agg = "avg") =>
    api(`${path}/series`, { params: { metric, since, until, step, agg } }).then((r) => r.points);
  const chart = (spec) =>
    section(
      spec.title,
      () => Promise.all(spec.metrics.map(([, metric]) => series(metric))),
      (all) => {
        const svg = lineChart({
          series: all.map((points, i) => ({ name: spec.metrics[i][0], points })),
          since,
          until,
          step,
          unit: spec.unit,
          label: spec.title,
        });
        svg.dataset.metric = spec.metrics.map(([, m]) => m).join(",");
        return svg;
      },
      { class: "card chart-card", id: `chart-${spec.id}` },
    );
  const errorsChart = section(
    "Errors",
    async () => {
      // request outcomes other than ok/queued that this device or the fleet had in the range,
      // and failed replies: summed per bucket
      const summary = await api("/summary", { params: { window: `${Math.ceil(range / 3600)}h` } });
      const names = new Set(["reply_failures"]);
      for (const requests of [summary.requests, data.requests ?? {}]) {
        for (const [kind, outcomes] of Object.entries(requests)) {
          for (const outcome of Object.keys(outcomes)) {
            if (!NOT_ERRORS.includes(outcome)) names.add(`requests.${kind}.${outcome}`);
          }
        }
      }
      const found = await Promise.all([...names].map((m) => series(m, "sum")));
      const sums = new Map();
      for (const points of found) for (const p of points) sums.set(p.t, (sums.get(p.t) ?? 0) + p.value);
      return { names: [...names], points: [...sums].sort((a, b) => a[0] - b[0]).map(([t, value]) => ({ t, value })) };
    },
    (found) => {
      const svg = lineChart({ series: [{ name: "errors", points: found.points }], since, until, step, unit: "per step", label: "Errors" });
      svg.dataset.metric = found.names.join(",");
      return h("div", {}, svg, h("p", { class: "muted small" }, `sum of ${found.names.join(", ")}`));
    },
    { class: "card chart-card", id: "chart-errors" },
  );
  const rangeLinks = Object.keys(RANGES).map((name) =>
    name === rangeName ? h("strong", {}, name) : link(`#/devices/${encodeURIComponent(id)}?since=${name}`, name),
  );
  return h(
    "div",
    { class: "page device", dataset: { id } },
    h("h1", {}, `Device ${id} `, badge(d.state)),
    h(
      "div",
      { class: "cards" },
      h(
        "div",
        { class: "card" },
        h("h2", {}, "Registry"),
        facts([
          ["pack", d.pack ?? "none"],
          ["agent", d.agent_version],
          ["hardware", d.hardware.join(", ") || "–"],
          ["tags", d.tags.join(", ") || "–"],
          ["first seen", when(d.first_seen)],
          ["last seen", `${when(d.last_seen)} (${ago(d.last_seen)})`],
          ["records up to seq", d.max_seq],
        ], { id: "device-facts" }),
      ),
      h(
        "div",
        { class: "card" },
        h("h2", {}, latest ? `Latest metrics (seq ${latest.seq}, ${ago(latest.ts)})` : "Latest metrics"),
        latest
          ? facts(
              [
                ["tokens/s p50", formatValue(pick("answers.tokens_per_s_p50"))],
                ["latency p95", `${formatValue(pick("answers.latency_ms.p95"))} ms`],
                ["TTFT p95", `${formatValue(pick("answers.ttft_ms.p95"))} ms`],
                ["RSS", `${formatValue(pick("rss_mb"))} MB`],
                ["CPU temperature", `${formatValue(pick("cpu_temp_c"))} °C`],
                ["queue depth", formatValue(pick("queue_depth"))],
                ["uptime", `${formatValue((pick("uptime_s") ?? NaN) / 3600)} h`],
              ],
              { id: "latest-metrics" },
            )
          : h("p", { class: "muted" }, "no metrics record yet"),
      ),
      gapsCard(detail.gaps),
    ),
    h("h2", { class: "range" }, "Metrics over the last ", rangeLinks.flatMap((x, i) => (i ? [" · ", x] : [x])), h("span", { class: "muted small" }, ` (${step / 60} min buckets; shaded: no data)`)),
    h("div", { class: "charts" }, CHARTS.map(chart), errorsChart),
    h("h2", {}, "Update events"),
    table(
      ["time", "source", "rollout", "target", "state", "progress", "reason"],
      detail.update_events.map((e) =>
        h(
          "tr",
          {},
          h("td", {}, when(e.ts)),
          h("td", {}, e.source),
          h("td", {}, e.rollout_id ? rolloutLink(e.rollout_id) : "–"),
          h("td", {}, e.target ?? "–"),
          h("td", {}, badge(e.state)),
          h("td", { class: "num" }, e.percent === null || e.percent === undefined ? "" : `${e.percent} %`),
          h("td", {}, e.reason_code ?? ""),
        ),
      ),
      { id: "update-events" },
    ),
    h("h2", {}, "Recent events"),
    table(
      ["seq", "time", "kind", "what"],
      detail.recent_events.map((e) =>
        h("tr", {}, h("td", { class: "num" }, e.seq), h("td", {}, when(e.ts)), h("td", {}, e.kind), h("td", { class: "mono" }, JSON.stringify(e.data))),
      ),
      { id: "recent-events" },
    ),
  );
}

function gapsCard(gaps) {
  const rows = gaps.map((g) =>
    h(
      "tr",
      { class: `gap-${g.state}`, dataset: { from: g.from_seq, to: g.to_seq } },
      h("td", { class: "num" }, g.from_seq === g.to_seq ? g.from_seq : `${g.from_seq}–${g.to_seq}`),
      h("td", { class: "num" }, g.to_seq - g.from_seq + 1),
      h("td", {}, badge(g.state)),
      h("td", {}, when(g.detected_at)),
    ),
  );
  return h(
    "div",
    { class: "card" },
    h("h2", {}, "Sequence gaps"),
    h("p", { class: "muted small" }, "open: records not yet delivered; lost: dropped on the device"),
    table(["seq", "records", "state", "detected"], rows, { id: "device-gaps" }),
  );
}
