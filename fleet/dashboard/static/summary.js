// #/ the fleet: devices by state and pack version, requests and errors, telemetry gaps, the
// rollouts (and a form to start one), the registry.

import { api } from "./api.js";
import { formatValue, stackedBar } from "./charts.js";
import {
  ago,
  badge,
  deviceLink,
  facts,
  h,
  link,
  progress,
  rolloutLink,
  section,
  setCrumbs,
  showError,
  signOutOn401,
  table,
  when,
} from "./view.js";

const DEVICES_SHOWN = 500;

export async function summaryPage(_, params) {
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
    h(
      "section",
      { id: "devices" },
      h("h2", {}, "Devices ", selectorForm(params.get("selector") ?? "")),
      section(
        null,
        () => api("/devices", { params: { selector: params.get("selector"), limit: DEVICES_SHOWN } }),
        (d) => devicesTable(d.devices, summary.devices),
      ),
    ),
  );
}

function rolloutsTable(rollouts) {
  const rows = rollouts.map((r) => {
    const total = Object.values(r.counts).reduce((a, b) => a + b, 0);
    return h(
      "tr",
      { dataset: { id: r.id } },
      h("td", { class: "nowrap" }, rolloutLink(r.id)),
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

// The registry by selector (docs/fleet.md#registry-and-selectors), kept in the route: #/?selector=S
function selectorForm(value) {
  const input = h("input", {
    name: "selector",
    value,
    placeholder: "selector: tag=greenhouse,state=online",
    spellcheck: "false",
  });
  const form = h("form", { class: "selector", id: "device-selector" }, input, h("button", { type: "submit" }, "Filter"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const selector = input.value.trim();
    location.hash = selector ? `#/?selector=${encodeURIComponent(selector)}` : "#/";
  });
  return form;
}

function devicesTable(devices, total) {
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
  const listed = table(["device", "state", "pack", "agent", "hardware", "tags", "last seen"], rows, { id: "device-list" });
  const more = devices.length === DEVICES_SHOWN && total > DEVICES_SHOWN;
  return h("div", {}, listed, more ? h("p", { class: "muted" }, `the first ${DEVICES_SHOWN} of ${total}: narrow with a selector`) : null);
}
