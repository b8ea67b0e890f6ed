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

export async function summaryPage() {
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
