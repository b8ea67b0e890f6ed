// Small SVG charts, no library: a time-series line chart whose missing buckets show as gaps
// (the line breaks and the span is shaded), and a stacked progress bar. Times are Unix
// seconds, shown in UTC.

const NS = "http://www.w3.org/2000/svg";
const W = 640;
const H = 200;
const PAD = { left: 52, right: 12, top: 22, bottom: 24 };
const TIME_STEPS = [60, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800];

function svg(name, attrs = {}, text) {
  const node = document.createElementNS(NS, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

// 3 significant digits, no exponent for the sizes a fleet sees.
export function formatValue(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const abs = Math.abs(value);
  if (abs >= 1000) return Math.round(value).toLocaleString("en");
  if (abs === 0) return "0";
  return String(Number(value.toPrecision(3)));
}

export function formatTime(ts, withDate = true) {
  const iso = new Date(ts * 1000).toISOString(); // 2026-12-04T13:28:27.000Z
  return withDate ? `${iso.slice(0, 10)} ${iso.slice(11, 19)} UTC` : iso.slice(11, 16);
}

// About `count` round values covering [lo, hi].
export function valueTicks(lo, hi, count = 5) {
  if (hi <= lo) hi = lo + 1;
  const raw = (hi - lo) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const ticks = [];
  let v = Math.floor(lo / step) * step;
  do {
    ticks.push(Number(v.toPrecision(12)));
    v += step;
  } while (ticks.at(-1) < hi - step * 1e-9);
  return ticks;
}

// Round UTC times between since and until, about `count` of them.
export function timeTicks(since, until, count = 6) {
  const step = TIME_STEPS.find((s) => (until - since) / s <= count) ?? TIME_STEPS.at(-1);
  const ticks = [];
  for (let t = Math.ceil(since / step) * step; t <= until; t += step) ticks.push(t);
  return { ticks, step };
}

// Runs of consecutive buckets: a missing bucket (t jumps by more than one step) ends a run.
export function segments(points, step) {
  const runs = [];
  let run = [];
  for (const p of points) {
    if (run.length && p.t - run.at(-1).t > step * 1.001) {
      runs.push(run);
      run = [];
    }
    run.push(p);
  }
  if (run.length) runs.push(run);
  return runs;
}

/**
 * A line chart of one or more series over [since, until) in buckets of `step` seconds.
 * series: [{name, points: [{t, value}]}] (t: a bucket's start, as the API answers).
 * Missing buckets between points, and two or more at the end, are shaded as gaps.
 */
export function lineChart({ series, since, until, step, unit = "", label = "" }) {
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": label });
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const x = (t) => PAD.left + ((t - since) / (until - since)) * plotW;
  const values = series.flatMap((s) => s.points.map((p) => p.value)).filter((v) => Number.isFinite(v));
  const count = series.reduce((n, s) => n + s.points.length, 0);
  Object.assign(root.dataset, { points: count, since, until, step });

  let lo = values.length ? Math.min(...values) : 0;
  let hi = values.length ? Math.max(...values) : 1;
  if (lo >= 0 && lo < hi * 0.5) lo = 0; // a positive quantity starts at zero unless that hides it
  const pad = (hi - lo) * 0.08 || Math.abs(hi) * 0.1 || 1;
  const yTicks = valueTicks(lo === 0 ? 0 : lo - pad, hi + pad);
  const yMin = yTicks[0];
  const yMax = yTicks.at(-1);
  const y = (v) => PAD.top + plotH - ((v - yMin) / (yMax - yMin || 1)) * plotH;

  const axes = svg("g", { class: "axes" });
  for (const v of yTicks) {
    axes.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v), class: "grid" }));
    axes.append(svg("text", { x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end" }, formatValue(v)));
  }
  const { ticks, step: tickStep } = timeTicks(since, until);
  for (const t of ticks) {
    axes.append(svg("line", { x1: x(t), x2: x(t), y1: PAD.top, y2: PAD.top + plotH, class: "grid" }));
    const text = tickStep >= 86400 || (t % 86400 === 0 && tickStep >= 3600) ? formatTime(t).slice(5, 10) : formatTime(t, false);
    axes.append(svg("text", { x: x(t), y: H - 6, "text-anchor": "middle" }, text));
  }
  if (unit) axes.append(svg("text", { x: PAD.left - 6, y: 12, "text-anchor": "end", class: "unit" }, unit));
  root.append(axes);

  // gaps: where no series has a bucket (between points, and at the end)
  const starts = [...new Set(series.flatMap((s) => s.points.map((p) => p.t)))].sort((a, b) => a - b);
  const gaps = svg("g", { class: "gaps" });
  const shade = (from, to) => {
    const rect = svg("rect", { x: x(from), y: PAD.top, width: Math.max(1, x(to) - x(from)), height: plotH, class: "gap" });
    rect.append(svg("title", {}, `no data ${formatTime(from)} – ${formatTime(to)}`));
    gaps.append(rect);
  };
  starts.forEach((t, i) => {
    const next = starts[i + 1];
    if (next !== undefined && next - t > step * 1.001) shade(t + step, next);
  });
  if (starts.length && until - (starts.at(-1) + step) >= 2 * step) shade(starts.at(-1) + step, until);
  root.dataset.gaps = String(gaps.childElementCount);
  root.append(gaps);

  series.forEach((s, index) => {
    const g = svg("g", { class: `series s${index}`, "data-name": s.name });
    const mid = (p) => x(p.t + step / 2);
    for (const run of segments(s.points, step)) {
      const d = run.map((p, i) => `${i ? "L" : "M"}${mid(p).toFixed(1)},${y(p.value).toFixed(1)}`).join(" ");
      g.append(svg("path", { d, class: "line", "data-points": run.length }));
    }
    for (const p of s.points) {
      const dot = svg("circle", { cx: mid(p).toFixed(1), cy: y(p.value).toFixed(1), r: 2.2, class: "dot" });
      dot.append(svg("title", {}, `${s.name} ${formatValue(p.value)}${unit ? ` ${unit}` : ""} at ${formatTime(p.t)}`));
      g.append(dot);
    }
    root.append(g);
  });

  if (!count) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no data in this range"));
  }
  if (series.length > 1) {
    const legend = svg("g", { class: "legend" });
    let at = W - PAD.right;
    for (let i = series.length - 1; i >= 0; i -= 1) {
      const name = series[i].name;
      at -= name.length * 6.5 + 22;
      legend.append(svg("rect", { x: at, y: 6, width: 12, height: 4, class: `swatch s${i}` }));
      legend.append(svg("text", { x: at + 16, y: 12 }, name));
    }
    root.append(legend);
  }
  return root;
}

/**
 * A horizontal bar of `total` split into parts [{name, n}] (in order), each its own class,
 * with the rest of the total left empty; a <title> names every part.
 */
export function stackedBar(parts, total, width = 240, height = 12) {
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "bar", width, height });
  root.append(svg("rect", { x: 0, y: 0, width, height, class: "bar-bg" }));
  let at = 0;
  for (const { name, n } of parts) {
    if (!n) continue;
    const w = (n / Math.max(total, 1)) * width;
    const rect = svg("rect", { x: at, y: 0, width: Math.max(w, 1), height, class: `bar-${name}` });
    rect.append(svg("title", {}, `${name}: ${n} of ${total}`));
    root.append(rect);
    at += w;
  }
  return root;
}
