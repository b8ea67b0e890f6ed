// #/rollouts/ID a rollout: the buttons (each enabled only in the states that allow it), the
// halt, each wave's progress, the rules and the devices; redrawn when the API's document
// changes.

import { api } from "./api.js";
import { formatTime, formatValue } from "./charts.js";
import {
  BAD,
  DONE,
  IDLE,
  MOVING,
  WAITING,
  badge,
  deviceLink,
  every,
  facts,
  h,
  hideError,
  link,
  main,
  page,
  progress,
  section,
  setCrumbs,
  showError,
  signOutOn401,
  table,
  when,
} from "./view.js";

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

export async function rolloutPage(id, params) {
  setCrumbs(link("#/", "Fleet"), `Rollout ${id}`);
  const path = `/rollouts/${encodeURIComponent(id)}`;
  const rollout = await api(path);
  const mine = page.generation;
  let shown = JSON.stringify(rollout);
  every(5000, async () => {
    // a running rollout moves on its own: redraw when the API's document changed
    try {
      const now = await api(path);
      if (mine === page.generation && JSON.stringify(now) !== shown) page.rerender();
    } catch (err) {
      if (mine === page.generation && !signOutOn401(err)) showError(err);
    }
  });
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
          hideError();
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
    [...WAITING, ...MOVING, ...DONE, ...BAD, ...IDLE].map((s) =>
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
