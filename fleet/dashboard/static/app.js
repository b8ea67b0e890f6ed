// The fleet dashboard: one page, hash routes (#/ the fleet, #/rollouts/ID, #/devices/ID),
// every figure read from the bearer-token API (api.js) and drawn with charts.js.

import { api, ApiError, token } from "./api.js";
import { formatTime, formatValue, lineChart, stackedBar } from "./charts.js";

const main = document.getElementById("main");
const banner = document.getElementById("error");
const crumbs = document.getElementById("crumbs");
const forget = document.getElementById("forget");

const RANGES = { "1h": 3600, "6h": 21600, "24h": 86400, "7d": 604800 };
const STEPS = [60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600];
// The rollout actions, and the states each is allowed from (fleet/rollouts/store.py).
const ACTIONS = {
  pause: { label: "Pause", from: ["running"] },
  resume: { label: "Resume", from: ["paused", "halted"] },
  abort: { label: "Abort", from: ["running", "paused", "halted"], confirm: "Abort this rollout for good?" },
  rollback: {
    label: "Roll back",
    from: ["running", "paused", "halted", "aborted", "completed"],
    confirm: "Send every device that took the new pack back to the pack it had?",
  },
};
// Device states in a rollout, grouped for the wave bars.
const DONE = ["confirmed"];
const MOVING = ["sent", "downloading", "activated"];
const BAD = ["failed", "rolled_back"];
const IDLE = ["skipped_incompatible", "expired", "aborted"];
const NOT_ERRORS = ["ok", "queued"]; // request outcomes that are not failures (as the API counts)

let generation = 0; // each render's number: a slower, older render never overwrites a newer one
let refresh = null;

// ------------------------------------------------------------------ DOM helpers

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const link = (href, text) => h("a", { href }, text);
const deviceLink = (id) => link(`#/devices/${encodeURIComponent(id)}`, id);
const badge = (state) => h("span", { class: `badge state-${state ?? "unknown"}` }, state ?? "unknown");
const when = (ts) => (ts === null || ts === undefined ? "–" : formatTime(ts));

function ago(ts) {
  if (ts === null || ts === undefined) return "–";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function table(headers, rows, attrs = {}) {
  return h(
    "table",
    attrs,
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: headers.length, class: "muted" }, "none"))),
  );
}

function facts(pairs, attrs = {}) {
  return h("dl", { class: "facts", ...attrs }, pairs.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "–")]));
}

function errorText(err) {
  return err instanceof ApiError ? `${err.code}: ${err.message}` : `error: ${err.message ?? err}`;
}

function showError(err) {
  banner.textContent = errorText(err);
  banner.hidden = false;
}

// A 401 means the token is gone or wrong: back to the token form, with the API's message.
function signOutOn401(err) {
  if (!(err instanceof ApiError && err.status === 401)) return false;
  token.clear();
  showTokenForm(err);
  return true;
}

// A section that loads on its own: a failed call shows its error in place, the rest of the
// page stays.
function section(title, load, draw, attrs = {}) {
  const body = h("p", { class: "muted loading" }, "loading…");
  const mine = generation;
  load()
    .then((data) => {
      if (mine === generation) body.replaceWith(draw(data));
    })
    .catch((err) => {
      if (mine === generation && !signOutOn401(err)) {
        body.replaceWith(h("p", { class: "error", role: "alert" }, errorText(err)));
      }
    });
  return h("section", attrs, title ? h("h2", {}, title) : null, body);
}

// ------------------------------------------------------------------ routing

function parseHash() {
  const [path, query = ""] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query);
  if (parts[0] === "rollouts" && parts[1]) return { page: rolloutPage, id: parts[1], params };
  if (parts[0] === "devices" && parts[1]) return { page: devicePage, id: parts[1], params };
  return { page: summaryPage, id: null, params };
}

function setCrumbs(...items) {
  crumbs.replaceChildren(...items.flatMap((item, i) => (i ? [" › ", item] : [item])));
}

async function render() {
  generation += 1;
  clearInterval(refresh);
  banner.hidden = true;
  if (!token.get()) {
    showTokenForm(null);
    return;
  }
  forget.hidden = false;
  const { page, id, params } = parseHash();
  const mine = generation;
  try {
    const view = await page(id, params);
    if (mine === generation) main.replaceChildren(view);
  } catch (err) {
    if (mine === generation && !signOutOn401(err)) {
      main.replaceChildren(h("p", { class: "error page-error", role: "alert" }, errorText(err)));
    }
  }
}

function showTokenForm(err) {
  generation += 1;
  clearInterval(refresh);
  forget.hidden = true;
  setCrumbs();
  const form = document.getElementById("token-form").content.firstElementChild.cloneNode(true);
  const message = form.querySelector("[data-role=message]");
  if (err) {
    message.textContent = errorText(err);
    message.hidden = false;
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = form.elements.token.value.trim();
    if (!value) return;
    token.set(value);
    render();
  });
  banner.hidden = true;
  main.replaceChildren(form);
  form.elements.token.focus();
}

// ------------------------------------------------------------------ #/ the fleet

async function summaryPage() {
  setCrumbs(link("#/", "Fleet"));
  const summary = await api("/summary", { params: { window: "24h" } });
  const counted = (title, what, id, counts) => {
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    const rows = Object.entries(counts)
      .sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]))
      .map(([key, n]) =>
        h("tr", { dataset: { key } }, h("td", {}, key), h("td", { class: "num" }, n), h("td", {}, stackedBar([{ name: "fill", n }], total, 96, 10))),
      );
    return h("div", { class: "card" }, h("h2", {}, title), table([what, "devices", ""], rows, { id }));
  };
  const errors = summary.error_rate === null ? "–" : `${formatValue(summary.error_rate * 100)} %`;
  return h(
    "div",
    { class: "page summary" },
    h("h1", {}, "Fleet"),
    h(
      "div",
      { class: "cards" },
      h("div", { class: "card big" }, h("h2", {}, "Devices"), h("p", { class: "figure", id: "device-count" }, summary.devices)),
      counted("By state", "state", "by-state", summary.by_state),
      counted("By pack version", "pack", "by-pack", summary.by_pack),
      h(
        "div",
        { class: "card" },
        h("h2", {}, "Requests, last 24 h"),
        facts(
          [
            ["requests", summary.requests_total],
            ["errors", summary.errors_total],
            ["error rate", errors],
          ],
          { id: "requests" },
        ),
      ),
      section("Telemetry gaps", () => api("/gaps", { params: { limit: 1 } }), (g) =>
        facts(
          [
            ["open (may still arrive)", g.counts.open ?? 0],
            ["lost (dropped on the device)", g.counts.lost ?? 0],
          ],
          { id: "gap-counts" },
        ),
      { class: "card" }),
    ),
    section("Rollouts", () => api("/rollouts"), (r) => h("div", {}, rolloutsTable(r.rollouts), startForm()), { id: "rollouts" }),
    section("Devices", () => api("/devices", { params: { limit: 500 } }), (d) => devicesTable(d.devices), { id: "devices" }),
  );
}

function rolloutsTable(rollouts) {
  const rows = rollouts.map((r) => {
    const total = Object.values(r.counts).reduce((a, b) => a + b, 0);
    return h(
      "tr",
      { dataset: { id: r.id } },
      h("td", { class: "nowrap" }, link(`#/rollouts/${encodeURIComponent(r.id)}`, r.id)),
      h("td", {}, r.target),
      h("td", {}, badge(r.state)),
      h("td", { class: "num" }, `${r.current_wave} of ${r.waves.length}`),
      h("td", { class: "nowrap" }, progress(r.counts, total), ` ${r.counts.confirmed ?? 0}/${total}`),
      h("td", {}, r.halt ? `${r.halt.rule}: ${r.halt.message}` : ""),
      h("td", {}, when(r.created_at)),
    );
  });
  return table(["rollout", "target", "state", "wave", "confirmed", "halt", "started"], rows, { id: "rollout-list" });
}

function progress(counts, total) {
  const sum = (names) => names.reduce((n, s) => n + (counts[s] ?? 0), 0);
  return stackedBar(
    [
      { name: "done", n: sum(DONE) },
      { name: "moving", n: sum(MOVING) },
      { name: "bad", n: sum(BAD) },
      { name: "idle", n: sum(IDLE) },
    ],
    total,
  );
}

function startForm() {
  const field = (label, name, attrs) => h("label", {}, label, h("input", { name, spellcheck: "false", ...attrs }));
  const form = h(
    "form",
    { class: "start", id: "start-rollout", autocomplete: "off" },
    field("Target", "target", { placeholder: "NAME@VERSION", required: true }),
    field("Selector", "selector", { placeholder: "tag=greenhouse (empty: every device)" }),
    field("Waves", "waves", { value: "1%,10%,50%,100%", required: true }),
    field("Canaries", "canary", { placeholder: "dev-1,dev-2" }),
    h("button", { type: "submit" }, "Start rollout"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = (name) => form.elements[name].value.trim();
    const body = {
      target: value("target"),
      selector: value("selector") || null,
      waves: value("waves"),
      canary: value("canary").split(",").map((s) => s.trim()).filter(Boolean),
    };
    try {
      const rollout = await api("/rollouts", { method: "POST", body });
      location.hash = `#/rollouts/${encodeURIComponent(rollout.id)}`;
    } catch (err) {
      if (!signOutOn401(err)) showError(err);
    }
  });
  return h("details", { class: "start" }, h("summary", {}, "Start a rollout (admin token)"), form);
}

function devicesTable(devices) {
  const rows = devices.map((d) =>
    h(
      "tr",
      { dataset: { id: d.device_id } },
      h("td", {}, deviceLink(d.device_id)),
      h("td", {}, badge(d.state)),
      h("td", {}, d.pack ?? "–"),
      h("td", {}, d.agent_version ?? "–"),
      h("td", {}, d.hardware.join(", ")),
      h("td", {}, d.tags.join(", ")),
      h("td", { title: when(d.last_seen) }, ago(d.last_seen)),
    ),
  );
  return table(["device", "state", "pack", "agent", "hardware", "tags", "last seen"], rows, { id: "device-list" });
}

// ------------------------------------------------------------------ #/rollouts/ID

async function rolloutPage(id, params) {
  setCrumbs(link("#/", "Fleet"), `Rollout ${id}`);
  const path = `/rollouts/${encodeURIComponent(id)}`;
  const rollout = await api(path);
  const mine = generation;
  let shown = JSON.stringify(rollout);
  refresh = setInterval(async () => {
    // a running rollout moves on its own: redraw when the API's document changed
    try {
      const now = await api(path);
      if (mine === generation && JSON.stringify(now) !== shown) render();
    } catch (err) {
      if (mine === generation && !signOutOn401(err)) showError(err);
    }
  }, 5000);
  return rolloutView(rollout, params, (doc) => {
    shown = JSON.stringify(doc);
  });
}

function rolloutView(r, params, onChange) {
  const state = params.get("state") || "";
  const actions = Object.entries(ACTIONS).map(([action, spec]) =>
    h("button", {
      type: "button",
      class: `action action-${action}`,
      dataset: { action },
      disabled: !spec.from.includes(r.state),
      title: `allowed when ${spec.from.join(", ")}`,
      onclick: async (event) => {
        if (spec.confirm && !window.confirm(spec.confirm)) return;
        event.target.disabled = true;
        try {
          const doc = await api(`/rollouts/${encodeURIComponent(r.id)}/${action}`, { method: "POST" });
          banner.hidden = true;
          onChange(doc);
          main.replaceChildren(rolloutView(doc, params, onChange));
        } catch (err) {
          if (!signOutOn401(err)) {
            showError(err);
            event.target.disabled = false;
          }
        }
      },
    }, spec.label),
  );
  const total = Object.values(r.counts).reduce((a, b) => a + b, 0);
  const stateFilter = h(
    "select",
    {
      name: "state",
      onchange: (event) => {
        const v = event.target.value;
        location.hash = `#/rollouts/${encodeURIComponent(r.id)}${v ? `?state=${v}` : ""}`;
      },
    },
    h("option", { value: "" }, "every state"),
    [...DONE, ...MOVING, ...BAD, ...IDLE, "pending", "offline_waiting"].map((s) =>
      h("option", { value: s, selected: s === state }, s),
    ),
  );
  return h(
    "div",
    { class: "page rollout", dataset: { id: r.id, state: r.state } },
    h("h1", {}, `Rollout ${r.id} `, h("span", { id: "rollout-state" }, badge(r.state))),
    h("div", { class: "actions", id: "rollout-actions" }, actions),
    r.halt ? haltBox(r.halt) : null,
    h(
      "div",
      { class: "cards" },
      h("div", { class: "card" }, h("h2", {}, "Rollout"), facts(
      [
        ["target", r.target],
        ["selector", r.selector ?? "every device"],
        ["waves", r.waves_spec ?? r.waves.map((w) => w.size).join(", ")],
        ["canaries", (r.canary ?? []).join(", ") || "–"],
        ["devices", `${total} (${Object.entries(r.counts).map(([s, n]) => `${s} ${n}`).join(", ") || "none"})`],
        ["started", `${when(r.created_at)}${r.created_by ? ` by ${r.created_by}` : ""}`],
        ["updated", when(r.updated_at)],
        ["deadline", when(r.deadline)],
      ],
      { id: "rollout-facts" },
    )),
      h("div", { class: "card" }, h("h2", {}, "Halt rules"), facts(Object.entries(r.rules ?? {}).map(([k, v]) => [k, String(v)]), { id: "rollout-rules", class: "facts two" })),
    ),
    h("h2", {}, "Waves"),
    wavesTable(r),
    h("h2", {}, "Devices ", stateFilter),
    section(null, () => api(`/rollouts/${encodeURIComponent(r.id)}/devices`, { params: { state, limit: 1000 } }), (d) =>
      table(
        ["device", "wave", "state", "reason", "from pack", "sent", "updated"],
        d.devices.map((x) =>
          h(
            "tr",
            { dataset: { id: x.device_id } },
            h("td", {}, deviceLink(x.device_id)),
            h("td", { class: "num" }, x.wave),
            h("td", {}, badge(x.state)),
            h("td", {}, [x.reason_code, x.reason].filter(Boolean).join(": ")),
            h("td", {}, x.from_pack ?? "–"),
            h("td", {}, when(x.sent_at)),
            h("td", {}, when(x.updated_at)),
          ),
        ),
        { id: "rollout-devices" },
      ),
    ),
  );
}

function haltBox(halt) {
  return h(
    "div",
    { class: "halt", id: "halt", role: "alert" },
    h("h2", {}, `Halted in wave ${halt.wave} by rule ${halt.rule}`),
    h("p", {}, halt.message, halt.at ? ` (${when(halt.at)})` : ""),
    facts(Object.entries(halt.figures ?? {}).map(([k, v]) => [k, typeof v === "number" ? formatValue(v) : JSON.stringify(v)])),
    (halt.devices ?? []).length ? h("p", {}, "devices: ", halt.devices.flatMap((d, i) => (i ? [", ", deviceLink(d)] : [deviceLink(d)]))) : null,
    h("p", { class: "muted" }, "Resume accepts this wave's results and carries on; abort stops for good."),
  );
}

function wavesTable(r) {
  const now = Date.now() / 1000;
  const phase = (w) => {
    if (w.started_at === null) return "waiting";
    if (w.completed_at === null) return "in progress";
    if (w.soak_until && w.soak_until > now) return `soaking until ${formatTime(w.soak_until)}`;
    return "done";
  };
  const rows = r.waves.map((w) =>
    h(
      "tr",
      { dataset: { wave: w.index }, class: w.index === r.current_wave ? "current" : null },
      h("td", { class: "num" }, w.index),
      h("td", { class: "num" }, w.size),
      h("td", {}, progress(w.counts, w.size)),
      h("td", {}, Object.entries(w.counts).map(([s, n]) => `${s} ${n}`).join(", ") || "–"),
      h("td", {}, phase(w)),
      h("td", {}, when(w.started_at)),
      h("td", {}, when(w.completed_at)),
    ),
  );
  return table(["wave", "devices", "progress", "by state", "phase", "started", "completed"], rows, { id: "waves" });
}

// ------------------------------------------------------------------ #/devices/ID

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

async function devicePage(id, params) {
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
          h("td", {}, e.rollout_id ? link(`#/rollouts/${encodeURIComponent(e.rollout_id)}`, e.rollout_id) : "–"),
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

// ------------------------------------------------------------------ start

forget.addEventListener("click", () => {
  token.clear();
  showTokenForm(null);
});
document.getElementById("refresh")?.addEventListener("click", () => render());
window.addEventListener("hashchange", render);
render();
