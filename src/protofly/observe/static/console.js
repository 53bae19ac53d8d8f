// protofly console: one snapshot (/api/state), then Server-Sent Events (/api/events). No polling, no build step.
// Everything the runtime sends is shown with textContent / SVG attributes, never parsed as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const state = { seq: -1, stubs: new Map(), timelines: new Map(), pending: [] };

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

const clock = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "");
const ago = (t) => {
  if (!t) return "";
  const s = Math.max(0, Date.now() / 1000 - t);
  return s < 60 ? `${s.toFixed(0)} s ago` : s < 3600 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
};
const bytes = (n) => (n == null ? "–" : n < 1 << 20 ? `${(n / 1024).toFixed(0)} KiB` : `${(n / (1 << 20)).toFixed(1)} MiB`);

// -- the stub table ----------------------------------------------------------------------------------

function renderTable() {
  const body = document.querySelector("#stubs tbody");
  body.replaceChildren();
  for (const row of [...state.stubs.values()].sort((a, b) => a.domain.localeCompare(b.domain))) {
    const tr = el("tr", { "data-domain": row.domain });
    tr.append(el("td", {}, row.domain), el("td", { class: "url", title: row.url }, row.url));
    const cell = el("td", { class: "status-cell" });
    cell.append(el("span", { class: `status ${row.status || "none"}`, title: row.description || "" }, row.status || "–"));
    tr.append(cell, el("td", { title: clock(row.since) }, ago(row.since)));
    const layers = el("td", { class: "layers", title: (row.missing || []).join("; ") }, (row.layers || []).join(" + "));
    tr.append(layers);
    for (const value of [row.restarts, row.messages_in, row.messages_out, row.cpu_seconds ?? "–"]) {
      tr.append(el("td", { class: "num" }, String(value)));
    }
    tr.append(el("td", { class: "num" }, bytes(row.memory_bytes)));
    body.append(tr);
  }
  document.getElementById("no-stubs").hidden = state.stubs.size > 0;
  renderDetails();
}

// -- per stub: the deploy timeline (one bar per seed step) and the status history ----------------------

function timelineSvg(domain, timeline) {
  const steps = timeline.steps;
  const total = steps.reduce((sum, s) => sum + s.ms, 0) || 1;
  const rowHeight = 22, labelWidth = 150, width = 560, barWidth = width - labelWidth - 70;
  const svg = el("svg:svg", {
    class: "timeline", "data-domain": domain, viewBox: `0 0 ${width} ${steps.length * rowHeight + 4}`,
    role: "img", "aria-label": `deploy timeline of ${domain}`,
  });
  let start = 0;
  steps.forEach((step, i) => {
    const y = i * rowHeight + 2;
    svg.append(el("svg:text", { x: 0, y: y + 14 }, `${step.step} (seed ${step.seed})`));
    svg.append(el("svg:rect", { class: "track", x: labelWidth, y, width: barWidth, height: rowHeight - 6, rx: 3 }));
    const x = labelWidth + (start / total) * barWidth;
    const w = Math.max(2, (step.ms / total) * barWidth);
    const bar = el("svg:rect", {
      class: `step ${step.step}`, "data-step": step.step, "data-ms": step.ms, x, y, width: w, height: rowHeight - 6, rx: 3,
    });
    bar.append(el("svg:title", {}, `${step.step}: ${step.ms.toFixed(2)} ms${step.detail ? " — " + step.detail : ""}`));
    svg.append(bar);
    svg.append(el("svg:text", { class: "ms", x: width - 66, y: y + 14 }, `${step.ms.toFixed(1)} ms`));
    start += step.ms;
  });
  return svg;
}

function renderDetails() {
  const details = document.getElementById("details");
  details.replaceChildren();
  for (const row of [...state.stubs.values()].sort((a, b) => a.domain.localeCompare(b.domain))) {
    const card = el("div", { class: "card", "data-domain": row.domain });
    card.append(el("h3", {}, `${row.domain} — deploy timeline`));
    const timeline = state.timelines.get(row.domain);
    if (timeline && timeline.steps.length) {
      card.append(timelineSvg(row.domain, timeline));
      const total = timeline.steps.reduce((sum, s) => sum + s.ms, 0);
      card.append(el("div", { class: "total" }, `${timeline.steps.length} steps, ${total.toFixed(1)} ms${timeline.outcome ? " → " + timeline.outcome : " (in progress)"}`));
    } else {
      card.append(el("p", { class: "dim" }, "no deployment seen since the console started"));
    }
    card.append(el("h3", {}, "status history"));
    const list = el("ul", { class: "history" });
    for (const entry of [...(row.history || [])].reverse()) {
      const item = el("li");
      item.append(el("span", { class: "dim" }, `${clock(entry.at)} `));
      item.append(el("span", { class: `status ${entry.value}` }, entry.value));
      if (entry.description) item.append(el("span", { class: "dim" }, ` ${entry.description}`));
      list.append(item);
    }
    card.append(list);
    details.append(card);
  }
}

// -- runtime events --------------------------------------------------------------------------------

function showEvent(event) {
  const list = document.getElementById("events");
  const item = el("li", { "data-kind": event.event });
  item.append(el("span", { class: "dim" }, `${clock(event.t)} `), el("span", { class: "kind" }, event.event));
  item.append(el("span", { class: "domain" }, event.domain || ""));
  const { seq, t, event: kind, domain, stub_url, at, ...fields } = event;
  const text = Object.entries(fields)
    .filter(([, value]) => value !== null && value !== undefined)
    .map(([key, value]) => `${key}=${typeof value === "object" ? JSON.stringify(value) : value}`)
    .join("  ");
  item.append(document.createTextNode(text));
  list.prepend(item);
  while (list.children.length > 200) list.lastChild.remove();
}

function applyEvent(event) {
  if (event.seq <= state.seq) return; // already in the snapshot
  state.seq = event.seq;
  const row = state.stubs.get(event.domain);
  switch (event.event) {
    case "status":
      if (row) {
        row.status = event.value; row.since = event.at; row.description = event.description;
        row.history = [...(row.history || []), { at: event.at, value: event.value, description: event.description }].slice(-20);
      } else {
        state.stubs.set(event.domain, { domain: event.domain, url: event.stub_url, status: event.value, since: event.at,
          history: [{ at: event.at, value: event.value, description: event.description }], restarts: 0, messages_in: 0, messages_out: 0 });
      }
      break;
    case "step": {
      let timeline = state.timelines.get(event.domain);
      if (!timeline || timeline.outcome) state.timelines.set(event.domain, (timeline = { steps: [], outcome: null }));
      timeline.steps.push(event);
      break;
    }
    case "live":
    case "deployment-failed": {
      const timeline = state.timelines.get(event.domain);
      if (timeline && !timeline.outcome) timeline.outcome = event.event;
      break;
    }
    case "unloaded":
      state.stubs.delete(event.domain);
      break;
  }
  showEvent(event);
  renderTable();
}

function applyState(snapshot) {
  state.seq = snapshot.seq;
  state.stubs = new Map(snapshot.stubs.map((row) => [row.domain, row]));
  state.timelines = new Map(Object.entries(snapshot.timelines));
  document.getElementById("runtime").textContent = `${snapshot.runtime.url} · sandbox ${snapshot.runtime.sandbox}`;
  const note = document.getElementById("listener");
  note.textContent = snapshot.listener.loopback
    ? `Bound to ${snapshot.listener.address} (loopback only). Read-only.`
    : `Bound to ${snapshot.listener.address}: NOT loopback — anyone who can reach it sees this page.`;
  note.classList.toggle("warn", !snapshot.listener.loopback);
  snapshot.events.forEach(showEvent);
  for (const event of state.pending) applyEvent(event);
  state.pending = null;
  renderTable();
  document.body.dataset.loaded = "1";
}

function connect() {
  const source = new EventSource("/api/events");
  const badge = document.getElementById("connection");
  source.addEventListener("hello", async () => {
    badge.textContent = "live updates"; badge.classList.remove("off");
    document.body.dataset.connected = "1";
    state.pending = [];
    const response = await fetch("/api/state", { cache: "no-store" });
    applyState(await response.json());
  });
  source.addEventListener("runtime", (message) => {
    const event = JSON.parse(message.data);
    if (state.pending) state.pending.push(event); else applyEvent(event);
  });
  source.addEventListener("stubs", (message) => {
    if (state.pending) return; // the snapshot on its way is at least as new
    state.stubs = new Map(JSON.parse(message.data).map((row) => [row.domain, row]));
    renderTable();
  });
  source.onerror = () => {
    badge.textContent = "reconnecting…"; badge.classList.add("off");
    document.body.dataset.connected = "0";
  };
}

connect();
