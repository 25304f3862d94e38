// slotkeeper's dashboard: one page (views chosen by the URL's hash), fed by the server's live
// views (server-sent events, /api/live/...) and acting through the HTTP API. No build step: a
// plain ES module; uPlot (vendored) draws the chart. See docs/dashboard.md.

const V2 = "/api/v2/concurrency_limits";
const PAGE_SIZE = 50;
const EVENTS_SHOWN = 200;
const STATS_REFRESH_MS = 15000;
const TICK_MS = 250;

// --- small helpers ------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== undefined && child !== null && child !== false) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

const limitPath = (name) => `${V2}/${encodeURIComponent(name)}`;
const limitHash = (name) => `#/limits/${encodeURIComponent(name)}`;

function toast(text, kind = "info") {
  const node = h("div", { class: `toast ${kind}` }, text);
  document.getElementById("toasts").append(node);
  setTimeout(() => node.remove(), kind === "error" ? 8000 : 4000);
}

// Every write is JSON, with or without a body (the API refuses other content types on writes).
async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (method !== "GET") init.headers["Content-Type"] = "application/json";
  if (body !== undefined) init.body = JSON.stringify(body);
  const res = await fetch(path, init);
  if (res.status === 401) throw new Error("Not authorised: reload the page to sign in again.");
  if (!res.ok) {
    let detail = res.statusText;
    try {
      const answer = await res.json();
      detail = answer.detail
        || (answer.exception_detail || []).map((e) => `${e.loc.slice(1).join(".")}: ${e.msg}`).join("; ")
        || answer.exception_message || detail;
    } catch { /* not JSON: keep the status text */ }
    throw new Error(`${detail} (${res.status})`);
  }
  return res.status === 204 ? null : res.json();
}

// The server's clock, as of the last view received: decay and countdowns run on it.
const clock = {
  offset: 0,
  sync(serverNow) { this.offset = serverNow - Date.now() / 1000; },
  now() { return Date.now() / 1000 + this.offset; },
};

// The pool as the server decays it (domain.decay_pool): whole slots leave at `rate` per second.
function decayedPool(pool, since, rate, now) {
  if (pool <= 0) return 0;
  if (rate <= 0 || now <= since) return pool;
  const gone = Math.floor((now - since) * rate);
  return gone >= pool ? 0 : pool - gone;
}

const epoch = (iso) => Date.parse(iso) / 1000;

function duration(seconds) {
  const s = Math.max(0, seconds);
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function clockTime(iso) {
  const d = new Date(iso);
  return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

const holderText = (holder) => (holder ? `${holder.type} ${holder.id}` : "—");

function setConnection(state) {
  const node = document.getElementById("connection");
  node.className = `connection ${state}`;
  node.textContent = state;
}

// A live view: an EventSource on /api/live/..., reconnected by the browser when it ends.
function live(url, handlers) {
  const source = new EventSource(url);
  for (const [kind, handler] of Object.entries(handlers)) {
    source.addEventListener(kind, (message) => handler(JSON.parse(message.data)));
  }
  source.onopen = () => setConnection("live");
  source.onerror = () => setConnection(source.readyState === EventSource.CLOSED ? "down" : "connecting");
  return source;
}

// --- dialogs --------------------------------------------------------------------------------------

// A form in the page's <dialog>; `submit(values)` runs the action: an error keeps it open.
function formDialog({ title, fields, submitLabel, submit, danger = false, text }) {
  const dialog = document.getElementById("dialog");
  const form = document.getElementById("dialog-form");
  const error = h("p", { class: "error" });
  const inputs = {};
  const rows = fields.map((f) => {
    const input = f.type === "checkbox"
      ? h("input", { type: "checkbox", name: f.name, checked: f.value })
      : h("input", {
        type: f.type || "text", name: f.name, value: f.value ?? "", required: f.required,
        min: f.min, step: f.step, autocomplete: "off",
      });
    inputs[f.name] = input;
    return f.type === "checkbox"
      ? h("label", {}, input, " ", f.label)
      : h("label", {}, f.label, input);
  });
  const ok = h("button", { type: "submit", class: danger ? "danger" : "primary", value: "ok" }, submitLabel);
  const cancel = h("button", { type: "button", onclick: () => dialog.close() }, "Cancel");
  form.replaceChildren(h("h2", {}, title), text ? h("p", {}, text) : "", ...rows, error,
    h("div", { class: "actions" }, cancel, ok));
  form.onsubmit = async (e) => {
    e.preventDefault();
    const values = {};
    for (const f of fields) {
      const input = inputs[f.name];
      values[f.name] = f.type === "checkbox" ? input.checked
        : f.type === "number" ? (input.value === "" ? null : Number(input.value)) : input.value;
    }
    ok.disabled = true;
    try {
      await submit(values);
      dialog.close();
    } catch (err) {
      error.textContent = err.message;
    } finally {
      ok.disabled = false;
    }
  };
  dialog.showModal();
  (fields[0] ? inputs[fields[0].name] : ok).focus();
}

const limitFields = (lim = {}) => [
  { name: "name", label: "Name", value: lim.name, required: true },
  { name: "limit", label: "Limit (slots)", type: "number", value: lim.limit ?? 1, min: 0, required: true },
  { name: "slot_decay_per_second", label: "Slot decay per second (over 0: a rate limit)", type: "number", value: lim.slot_decay_per_second ?? 0, min: 0, step: "any" },
  { name: "active", label: "Active", type: "checkbox", value: lim.active ?? true },
];

function createLimit() {
  formDialog({
    title: "New limit", fields: limitFields(), submitLabel: "Create",
    submit: async (values) => {
      await api("POST", `${V2}/`, { ...values, slot_decay_per_second: values.slot_decay_per_second ?? 0 });
      toast(`Limit ${values.name} created`);
    },
  });
}

function editLimit(lim, onRenamed) {
  formDialog({
    title: `Edit ${lim.name}`, fields: limitFields(lim), submitLabel: "Save",
    submit: async (values) => {
      const changes = {};
      for (const [key, value] of Object.entries(values)) {
        if (value !== null && value !== lim[key]) changes[key] = value;
      }
      if (Object.keys(changes).length) await api("PATCH", limitPath(lim.name), changes);
      toast(`Limit ${values.name} saved`);
      if (changes.name && onRenamed) onRenamed(changes.name);
    },
  });
}

async function setActive(lim, active) {
  try {
    await api("PATCH", limitPath(lim.name), { active });
    toast(`Limit ${lim.name} ${active ? "enabled" : "disabled"}`);
  } catch (err) {
    toast(err.message, "error");
  }
}

function deleteLimit(lim, onDeleted) {
  formDialog({
    title: `Delete ${lim.name}?`, fields: [], submitLabel: "Delete", danger: true,
    text: "Its leases are released (with their events) and the requests waiting for it are refused.",
    submit: async () => {
      await api("DELETE", limitPath(lim.name));
      toast(`Limit ${lim.name} deleted`);
      if (onDeleted) onDeleted();
    },
  });
}

function endLease(lease) {
  formDialog({
    title: "End this lease?", fields: [], submitLabel: "End lease", danger: true,
    text: `Lease ${lease.lease_id} (${lease.slots} slot(s), ${holderText(lease.holder)}) is released on every `
      + "limit it holds; its released events say an operator ended it, and its holder can no longer renew it.",
    submit: async () => {
      await api("DELETE", `${V2}/leases/${lease.lease_id}`);
      toast(`Lease ${lease.lease_id} ended`);
    },
  });
}

// --- shared pieces of both views --------------------------------------------------------------------

function usageBar(lim, pool) {
  const size = Math.max(lim.limit, lim.leased_slots + pool, 1);
  return h("span", { class: "bar", title: `${lim.leased_slots} leased, ${pool} in the pool, limit ${lim.limit}` },
    h("span", { class: "leased", style: `width:${(100 * lim.leased_slots) / size}%` }),
    h("span", { class: "pool", style: `width:${(100 * pool) / size}%` }));
}

function badges(lim) {
  return [
    h("span", { class: `badge ${lim.active ? "on" : "off"}` }, lim.active ? "active" : "inactive"),
    lim.rate_limit ? h("span", { class: "badge rate", title: "Slots leave the pool by decay" },
      `rate limit ${lim.slot_decay_per_second}/s`) : "",
  ];
}

const poolNow = (lim) => decayedPool(lim.pool_slots, lim.pool_clock, lim.slot_decay_per_second, clock.now());

const legend = () => h("span", { class: "legend" },
  h("i", { style: "background:var(--leased)" }), "leased", h("i", { style: "background:var(--pool)" }), "pool",
  h("i", { style: "background:var(--free)" }), "free");

// --- the overview of every limit ----------------------------------------------------------------------

function overviewPage(params) {
  const view = document.getElementById("view");
  const offset = Math.max(0, Number(params.get("offset")) || 0);
  const prefix = params.get("prefix") || "";
  document.getElementById("crumbs").replaceChildren("Limits");
  let limits = [];
  let total = 0;

  const go = (next) => {
    const query = new URLSearchParams();
    if (next.offset) query.set("offset", next.offset);
    if (next.prefix) query.set("prefix", next.prefix);
    location.hash = `#/?${query}`;
  };
  const search = h("input", { type: "search", placeholder: "Name starts with…", value: prefix, id: "search", "aria-label": "Name starts with" });
  search.addEventListener("keydown", (e) => { if (e.key === "Enter") go({ offset: 0, prefix: search.value }); });
  const pager = h("span", { class: "pager", id: "pager" });
  const prev = h("button", { id: "prev", onclick: () => go({ offset: Math.max(0, offset - PAGE_SIZE), prefix }) }, "‹ Previous");
  const next = h("button", { id: "next", onclick: () => go({ offset: offset + PAGE_SIZE, prefix }) }, "Next ›");
  const body = h("tbody", { id: "limits" });
  view.replaceChildren(
    h("div", { class: "toolbar" }, search, h("button", { onclick: () => go({ offset: 0, prefix: search.value }) }, "Search"),
      h("span", { class: "spacer" }), legend(), pager, prev, next,
      h("button", { class: "primary", id: "new-limit", onclick: createLimit }, "New limit")),
    h("div", { class: "card" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Status"), h("th", { class: "num" }, "Limit"),
        h("th", {}, "In use"), h("th", { class: "num" }, "Leased"), h("th", { class: "num" }, "Pool"),
        h("th", { class: "num" }, "Waiters"), h("th", {}, ""))),
      body)));

  // A row's cells are filled again in place by each view (`fill`): its buttons stay the same
  // nodes, so a click is never lost to an update arriving under the pointer. Their handlers read
  // the row's latest limit.
  const rows = new Map();
  function row(name) {
    const tr = h("tr", { "data-limit": name });
    const toggle = h("button", { class: "small toggle", onclick: () => setActive(tr.lim, !tr.lim.active) });
    tr.append(
      h("td", { class: "name" }, h("a", { href: limitHash(name) }, name)),
      h("td", { class: "status" }), h("td", { class: "num limit" }), h("td", { class: "usage" }),
      h("td", { class: "num leased" }), h("td", { class: "num pool" }), h("td", { class: "num waiters" }),
      h("td", {}, toggle, " ",
        h("button", { class: "small", onclick: () => editLimit(tr.lim) }, "Edit"), " ",
        h("button", { class: "small danger", onclick: () => deleteLimit(tr.lim) }, "Delete")));
    return tr;
  }

  function fill(tr, lim) {
    tr.lim = lim;
    const pool = poolNow(lim);
    const cell = (name) => tr.querySelector(`td.${name}`);
    tr.className = lim.active ? "" : "inactive";
    cell("status").replaceChildren(...badges(lim));
    cell("limit").textContent = lim.limit;
    cell("usage").replaceChildren(usageBar(lim, pool), " ", `${lim.leased_slots + pool} / ${lim.limit}`);
    cell("leased").textContent = lim.leased_slots;
    cell("pool").textContent = pool;
    cell("waiters").textContent = lim.waiters;
    cell("waiters").title = `${lim.waiting_slots} slot(s) asked`;
    tr.querySelector("button.toggle").textContent = lim.active ? "Disable" : "Enable";
  }

  function render() {
    const names = limits.map((lim) => lim.name);
    for (const name of [...rows.keys()]) if (!names.includes(name)) rows.delete(name);
    for (const lim of limits) {
      if (!rows.has(lim.name)) rows.set(lim.name, row(lim.name));
      fill(rows.get(lim.name), lim);
    }
    const shown = [...body.querySelectorAll("tr[data-limit]")].map((tr) => tr.dataset.limit);
    if (!limits.length) {
      body.replaceChildren(h("tr", {}, h("td", { colspan: 8, class: "empty" }, prefix ? "No limit starts with that." : "No limits yet.")));
    } else if (shown.join("\n") !== names.join("\n")) {
      body.replaceChildren(...names.map((name) => rows.get(name)));
    }
    pager.textContent = total ? `${offset + 1}–${offset + limits.length} of ${total}` : "";
    prev.disabled = offset === 0;
    next.disabled = offset + limits.length >= total;
  }

  const query = new URLSearchParams({ offset, limit: PAGE_SIZE, prefix });
  const source = live(`/api/live/limits?${query}`, {
    overview: (page) => {
      clock.sync(page.now);
      limits = page.limits;
      total = page.total;
      render();
    },
  });
  // Decay, shown as it happens: only rate limits' pools change between views (cells updated in
  // place, so a button is never replaced under the pointer).
  const ticker = setInterval(() => {
    for (const lim of limits) {
      if (!lim.rate_limit || lim.pool_slots === 0) continue;
      const tr = rows.get(lim.name);
      if (tr) fill(tr, lim);
    }
  }, TICK_MS);
  return { close: () => { source.close(); clearInterval(ticker); } };
}

// --- one limit ------------------------------------------------------------------------------------------

function limitPage(name) {
  const view = document.getElementById("view");
  document.getElementById("crumbs").replaceChildren(h("a", { href: "#/" }, "Limits"), " / ", name);
  let state = null;
  const title = h("h1", {}, name);
  const figures = h("div", { class: "stats", id: "figures" });
  const holders = h("tbody", { id: "holders" });
  const queue = h("tbody", { id: "queue" });
  const events = h("ul", { id: "events" });
  const chartBox = h("div", { class: "chart", id: "chart" });
  const seen = new Set();
  view.replaceChildren(
    title,
    h("div", { class: "card" }, figures),
    h("div", {},
      h("div", { class: "card" }, h("h2", {}, "Holders"), h("table", {},
        h("thead", {}, h("tr", {}, h("th", {}, "Lease"), h("th", {}, "Holder"), h("th", { class: "num" }, "Slots"),
          h("th", {}, "Since"), h("th", {}, "Expires in"), h("th", { class: "num" }, "Fencing token"), h("th", {}, ""))),
        holders)),
      h("div", { class: "card" }, h("h2", { id: "queue-title" }, "Queue"), h("table", {},
        h("thead", {}, h("tr", {}, h("th", { class: "num" }, "Position"), h("th", { class: "num" }, "Priority"),
          h("th", {}, "Waiting since"), h("th", { class: "num" }, "Slots asked"), h("th", {}, "Holder"))),
        queue))),
    h("div", { class: "grid" },
      h("div", { class: "card" }, h("h2", {}, "Last hour: grants per second and waits in the queue"), chartBox),
      h("div", { class: "card events" }, h("h2", {}, "Events (live)"), events)));

  function renderTitle(lim) {
    title.replaceChildren(lim.name, ...badges(lim), h("span", { class: "spacer" }),
      h("button", { class: "small", id: "toggle", onclick: () => setActive(lim, !lim.active) }, lim.active ? "Disable" : "Enable"),
      h("button", { class: "small", id: "edit", onclick: () => editLimit(lim, (renamed) => { location.hash = limitHash(renamed); }) }, "Edit"),
      h("button", { class: "small danger", id: "delete", onclick: () => deleteLimit(lim, () => { location.hash = "#/"; }) }, "Delete"));
  }

  function renderFigures() {
    const lim = state.limit;
    const pool = poolNow(lim);
    const stat = (id, value, label) => h("div", { class: "stat", id }, h("b", {}, value), h("span", {}, label));
    figures.replaceChildren(
      stat("fig-limit", lim.limit, "limit"),
      stat("fig-used", lim.leased_slots + pool, "in use"),
      stat("fig-leased", lim.leased_slots, "leased"),
      stat("fig-pool", pool, lim.rate_limit ? `pool (decays ${lim.slot_decay_per_second}/s)` : "pool"),
      stat("fig-free", Math.max(0, lim.limit - lim.leased_slots - pool), "free"),
      stat("fig-waiters", lim.waiters, `waiting (${lim.waiting_slots} slots)`),
      h("div", { class: "stat" }, usageBar(lim, pool), legend()));
  }

  // Holder rows are kept by lease id (a lease's row, and its button, stay the same node while it
  // lives); only a renewal changes one: its expiry.
  const holderRows = new Map();
  function holderRow(lease, now) {
    return h("tr", { "data-lease": lease.lease_id },
      h("td", { class: "mono" }, lease.lease_id),
      h("td", { class: "mono" }, holderText(lease.holder)),
      h("td", { class: "num" }, lease.slots),
      h("td", { class: "since", title: lease.created, "data-at": epoch(lease.created) }, `${duration(now - epoch(lease.created))} ago`),
      h("td", { class: "expires" }),
      h("td", { class: "num" }, lease.fencing_token),
      h("td", {}, h("button", { class: "small danger", onclick: () => endLease(lease) }, "End lease")));
  }

  function renderHolders() {
    const now = clock.now();
    const ids = state.holders.map((lease) => lease.lease_id);
    for (const id of [...holderRows.keys()]) if (!ids.includes(id)) holderRows.delete(id);
    for (const lease of state.holders) {
      if (!holderRows.has(lease.lease_id)) holderRows.set(lease.lease_id, holderRow(lease, now));
      const expires = holderRows.get(lease.lease_id).querySelector("td.expires");
      expires.title = lease.expires;
      expires.dataset.at = epoch(lease.expires);
      expires.textContent = duration(epoch(lease.expires) - now);
    }
    const shown = [...holders.querySelectorAll("tr[data-lease]")].map((tr) => tr.dataset.lease);
    if (!ids.length) {
      holders.replaceChildren(h("tr", {}, h("td", { colspan: 7, class: "empty" }, "Nobody holds this limit.")));
    } else if (shown.join() !== ids.join()) {
      holders.replaceChildren(...ids.map((id) => holderRows.get(id)));
    }
  }

  function renderQueue() {
    const now = clock.now();
    const lim = state.limit;
    document.getElementById("queue-title").textContent = lim.waiters > state.queue.length
      ? `Queue (first ${state.queue.length} of ${lim.waiters})` : "Queue";
    queue.replaceChildren(...(state.queue.length ? state.queue.map((w) => h("tr", { "data-waiter": w.waiter_id },
      h("td", { class: "num" }, w.position),
      h("td", { class: "num" }, w.priority),
      h("td", { class: "since", title: w.enqueued, "data-at": epoch(w.enqueued) }, `${duration(now - epoch(w.enqueued))} ago`),
      h("td", { class: "num" }, w.slots),
      h("td", { class: "mono" }, holderText(w.holder))))
      : [h("tr", {}, h("td", { colspan: 5, class: "empty" }, "Nobody is waiting."))]));
  }

  function addEvent(event) {
    if (seen.has(event.id)) return;
    seen.add(event.id);
    const short = event.event.replace("prefect.concurrency-limit.", "");
    const kind = short.endsWith("acquired") ? "acquired" : short.endsWith("released") ? "released" : "other";
    const details = [];
    if (event.resource["slots-acquired"]) details.push(`${event.resource["slots-acquired"]} slot(s)`);
    const holder = event.related.find((r) => r["prefect.resource.role"] !== "concurrency-limit");
    if (holder) details.push(holder["prefect.resource.id"]);
    if (event.resource.task_run_id) details.push(`task run ${event.resource.task_run_id}`);
    if (event.payload.waited_seconds !== undefined) details.push(`waited ${duration(event.payload.waited_seconds)}`);
    if (event.payload.reason) details.push(`ended by ${event.payload.reason}`);
    if (kind === "other" && event.payload.limit !== undefined) details.push(`limit ${event.payload.limit}`);
    events.prepend(h("li", { "data-event": event.event, "data-event-id": event.id, "data-follows": event.follows || "" },
      h("span", { class: "when", title: event.occurred }, clockTime(event.occurred)),
      h("span", { class: kind }, short), " ", details.join(", ")));
    while (events.children.length > EVENTS_SHOWN) events.lastChild.remove();
  }

  let chart = null;
  async function refreshChart() {
    let stats;
    try {
      stats = await api("GET", `${limitPath(name)}/stats?window_seconds=3600&bucket_seconds=60`);
    } catch (err) {
      return; // the live view says when the limit is gone
    }
    const data = [
      stats.buckets.map((b) => epoch(b.start)),
      stats.buckets.map((b) => b.grants_per_second),
      stats.buckets.map((b) => b.wait_seconds.p50),
      stats.buckets.map((b) => b.wait_seconds.p90),
      stats.buckets.map((b) => b.wait_seconds.p99),
    ];
    chartBox.dataset.grants = String(stats.buckets.reduce((n, b) => n + b.grants, 0));
    if (chart) { chart.setData(data); return; }
    if (typeof uPlot === "undefined") return;
    chart = new uPlot({
      width: Math.max(320, chartBox.clientWidth - 4),
      height: 240,
      scales: { x: { time: true }, grants: { auto: true }, wait: { auto: true } },
      series: [
        {},
        { label: "grants/s", scale: "grants", stroke: "#2f6fed", width: 2, fill: "rgba(47,111,237,.08)" },
        { label: "wait p50 (s)", scale: "wait", stroke: "#12a150", width: 1.5, points: { show: true, size: 4 } },
        { label: "wait p90 (s)", scale: "wait", stroke: "#f59e0b", width: 1.5, points: { show: true, size: 4 } },
        { label: "wait p99 (s)", scale: "wait", stroke: "#d92d20", width: 1.5, points: { show: true, size: 4 } },
      ],
      axes: [{}, { scale: "grants", label: "grants/s" }, { scale: "wait", side: 1, label: "wait (s)", grid: { show: false } }],
    }, data, chartBox);
  }

  const source = live(`/api/live/limits/${encodeURIComponent(name)}?backfill=50`, {
    state: (next) => {
      clock.sync(next.now);
      state = next;
      renderTitle(next.limit);
      renderFigures();
      renderHolders();
      renderQueue();
    },
    event: addEvent,
    deleted: () => {
      source.close();
      setConnection("down");
      view.prepend(h("div", { class: "card", id: "gone" }, "This limit was deleted. ", h("a", { href: "#/" }, "Back to the limits")));
    },
  });
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED && !state) {
      view.replaceChildren(h("div", { class: "card", id: "gone" }, `No limit named ${name}. `, h("a", { href: "#/" }, "Back to the limits")));
    }
  });
  refreshChart();
  const charting = setInterval(refreshChart, STATS_REFRESH_MS);
  // Countdowns and decay between views (cells updated in place).
  const ticker = setInterval(() => {
    if (!state) return;
    renderFigures();
    const now = clock.now();
    for (const cell of view.querySelectorAll("td.since")) cell.textContent = `${duration(now - Number(cell.dataset.at))} ago`;
    for (const cell of view.querySelectorAll("td.expires")) cell.textContent = duration(Number(cell.dataset.at) - now);
  }, TICK_MS * 4);
  return { close: () => { source.close(); clearInterval(charting); clearInterval(ticker); chart?.destroy(); } };
}

// --- routing ------------------------------------------------------------------------------------------------

let current = null;
function route() {
  current?.close();
  const hash = location.hash || "#/";
  const match = hash.match(/^#\/limits\/([^?]+)$/);
  current = match
    ? limitPage(decodeURIComponent(match[1]))
    : overviewPage(new URLSearchParams(hash.split("?")[1] || ""));
}
window.addEventListener("hashchange", route);
route();
