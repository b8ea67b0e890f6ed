// What every page shares: DOM nodes built from text (never from HTML strings), the error
// banner, sections that load on their own, and the page's life (a render generation and its
// timers).

import { ApiError } from "./api.js";
import { formatTime, stackedBar } from "./charts.js";

export const main = document.getElementById("main");
const banner = document.getElementById("error");
const crumbs = document.getElementById("crumbs");

// Each render starts a generation: what an older, slower render loads is dropped, and its
// timers stop. app.js sets what a 401 does and how to render the route again.
export const page = { generation: 0, timers: [], onUnauthorized: () => {}, rerender: () => {} };

export function nextGeneration() {
  page.generation += 1;
  page.timers.forEach(clearInterval);
  page.timers = [];
  return page.generation;
}

export function every(ms, fn) {
  page.timers.push(setInterval(fn, ms));
}

export function h(tag, attrs = {}, ...children) {
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

export const link = (href, text) => h("a", { href }, text);
export const deviceLink = (id) => link(`#/devices/${encodeURIComponent(id)}`, id);
export const rolloutLink = (id) => link(`#/rollouts/${encodeURIComponent(id)}`, id);
export const badge = (state) => h("span", { class: `badge state-${state ?? "unknown"}` }, state ?? "unknown");
export const when = (ts) => (ts === null || ts === undefined ? "–" : formatTime(ts));

export function ago(ts) {
  if (ts === null || ts === undefined) return "–";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export function table(headers, rows, attrs = {}) {
  return h(
    "table",
    attrs,
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: headers.length, class: "muted" }, "none"))),
  );
}

export function facts(pairs, attrs = {}) {
  return h("dl", { class: "facts", ...attrs }, pairs.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "–")]));
}

export function setCrumbs(...items) {
  crumbs.replaceChildren(...items.flatMap((item, i) => (i ? [" › ", item] : [item])));
}

export function errorText(err) {
  return err instanceof ApiError ? `${err.code}: ${err.message}` : `error: ${err.message ?? err}`;
}

export function showError(err) {
  banner.textContent = errorText(err);
  banner.hidden = false;
}

export function hideError() {
  banner.hidden = true;
}

// A 401 means the token is gone or wrong: back to the token form, with the API's message.
export function signOutOn401(err) {
  if (!(err instanceof ApiError && err.status === 401)) return false;
  page.onUnauthorized(err);
  return true;
}

// A section that loads on its own: a failed call shows its error in place, the rest of the
// page stays.
export function section(title, load, draw, attrs = {}) {
  const body = h("p", { class: "muted loading" }, "loading…");
  const mine = page.generation;
  load()
    .then((data) => {
      if (mine === page.generation) body.replaceWith(draw(data));
    })
    .catch((err) => {
      if (mine === page.generation && !signOutOn401(err)) {
        body.replaceWith(h("p", { class: "error", role: "alert" }, errorText(err)));
      }
    });
  return h("section", attrs, title ? h("h2", {}, title) : null, body);
}

// Device states in a rollout (fleet/rollouts/states.py), grouped for the progress bars.
export const DONE = ["confirmed"];
export const MOVING = ["sent", "downloading", "activated"];
export const BAD = ["failed", "rolled_back"];
export const IDLE = ["skipped_incompatible", "expired", "aborted"];
export const WAITING = ["pending", "offline_waiting"];

export function progress(counts, total) {
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
