// gpuboss dashboard: polls v1/status, v1/events and v1/consumers every second and draws them.
// No framework, no build step. Everything from the service is put into the page as text (never as HTML):
// holder names and labels come from any client.
"use strict";

(function () {
  const REFRESH_MS = 1000;
  const TIMEOUT_MS = 5000;
  const EVENTS = 50;
  const TOKEN_KEY = "gpuboss.token";
  const PRIORITY_NAMES = { 10: "low", 50: "normal", 90: "high" };
  const GOOD_EVENTS = new Set(["granted", "released", "busy", "device_added", "device_updated"]);
  const BAD_EVENTS = new Set(["expired", "revoked", "force_released", "abandoned", "device_removed"]);
  // The colour of a managed consumer's state: resident, moving, or in trouble (unloaded: plain).
  const CONSUMER_STATES = {
    ready: "ok", idle: "ok", loading: "busy", unloading: "busy", stuck: "bad", unhealthy: "bad",
  };

  // A token in the address (#token=SECRET) is kept in this browser and taken out of the address
  // bar, so it is neither bookmarked nor shown; "#token=" alone forgets it.
  let memoryToken = ""; // where the token lives if the browser refuses local storage
  function takeToken() {
    const match = /^#token=(.*)$/.exec(window.location.hash);
    if (!match) return;
    let secret = match[1];
    try {
      secret = decodeURIComponent(secret);
    } catch (err) {
      // not percent-encoded after all: keep it as written
    }
    memoryToken = secret;
    try {
      if (secret) window.localStorage.setItem(TOKEN_KEY, secret);
      else window.localStorage.removeItem(TOKEN_KEY);
    } catch (err) {
      // storage disabled: the token lasts as long as this page
    }
    window.history.replaceState(null, "", window.location.pathname + window.location.search);
  }
  function token() {
    try {
      return window.localStorage.getItem(TOKEN_KEY) || memoryToken;
    } catch (err) {
      return memoryToken;
    }
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const $ = (id) => document.getElementById(id);

  function mib(n) {
    return Number(n).toLocaleString("en-US");
  }

  function size(n) {
    if (Math.abs(n) < 1024) return `${n} MiB`;
    return `${(n / 1024).toFixed(1)} GiB`;
  }

  function duration(ms) {
    if (ms === null || ms === undefined || !Number.isFinite(ms)) return "";
    const s = Math.max(0, Math.floor(ms / 1000));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${String(Math.floor(s / 60) % 60).padStart(2, "0")}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor(s / 3600) % 24}h`;
  }

  function clock(ms) {
    return new Date(ms).toLocaleTimeString("en-GB", { hour12: false });
  }

  function priority(p) {
    const name = PRIORITY_NAMES[p];
    return name ? `${p} (${name})` : String(p);
  }

  function labels(obj) {
    const out = el("td", { class: "wrap" });
    for (const [k, v] of Object.entries(obj || {}).sort()) out.append(el("span", { class: "chip", text: `${k}=${v}` }));
    return out;
  }

  function badge(state) {
    const known = ["active", "idle", "evicting", "queued"];
    return el("span", { class: `badge badge-${known.includes(state) ? state : "other"}`, text: state });
  }

  function consumerBadge(state) {
    return el("span", { class: `badge consumer-${CONSUMER_STATES[state] || "other"}`, text: state });
  }

  function consumerName(c) {
    return c.model ? `${c.name}/${c.model}` : c.name;
  }

  // ---- fetching -------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.message) || `HTTP ${status}`);
      this.status = status;
      this.code = (body && body.error) || "";
    }
  }

  async function getJson(path) {
    const headers = { Accept: "application/json" };
    const secret = token();
    if (secret) headers.Authorization = `Bearer ${secret}`;
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
    let response;
    try {
      response = await fetch(path, { headers, cache: "no-store", signal: abort.signal });
    } finally {
      clearTimeout(timer);
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (!response.ok) throw new ApiError(response.status, body);
    if (body === null) throw new ApiError(response.status, { message: "the reply is not JSON" });
    return body;
  }

  // ---- the banner -------------------------------------------------------------------------------

  let lastGood = null;

  function showProblem(err) {
    const banner = $("banner");
    let title;
    let detail = "";
    if (err instanceof ApiError && err.status === 401) {
      title = token()
        ? "The token this browser keeps was refused."
        : "This service needs a token to show its state.";
      detail = "Open this page as …/#token=YOUR_SECRET (the token is then kept in this browser).";
    } else if (err instanceof ApiError) {
      title = `The gpuboss service answered with an error (HTTP ${err.status}${err.code ? " " + err.code : ""}).`;
      detail = err.message;
    } else {
      title = "Cannot reach the gpuboss service.";
      detail = `${new URL("v1/status", window.location.href).href} did not answer; retrying every second.`;
    }
    if (lastGood !== null) detail += ` Showing the state of ${clock(lastGood)}.`;
    // Replaced only when the problem changes: screen readers announce every change of an alert.
    if (banner.hidden || banner.dataset.text !== title + detail) {
      banner.replaceChildren(el("span", { text: title }), el("span", { class: "detail", text: detail }));
      banner.dataset.text = title + detail;
      banner.hidden = false;
    }
    $("content").classList.toggle("stale", lastGood !== null);
    document.body.dataset.state = "error";
    if (lastGood === null) $("summary").textContent = "No data yet";
  }

  function clearProblem() {
    const banner = $("banner");
    banner.hidden = true;
    if (banner.dataset.text) {
      banner.replaceChildren();
      delete banner.dataset.text;
    }
    $("content").classList.remove("stale");
    document.body.dataset.state = "live";
  }

  // ---- drawing ----------------------------------------------------------------------------------

  function noDevices() {
    return el(
      "div",
      { class: "guide" },
      el("p", { text: "No devices are registered, so nothing can be leased yet. Add one:" }),
      el(
        "ul",
        null,
        el("li", null, "start the service with ", el("code", { text: "gpuboss serve --device gpu0=24GiB:0" }),
          " (or set ", el("code", { text: "GPUBOSS_DEVICES=gpu0=24GiB:0" }), "),"),
        el("li", null, "run ", el("code", { text: "gpuboss agent" }), " on each GPU host to register its GPUs, or"),
        el("li", null, el("code", { text: "gpuboss devices add gpu0 --vram 24GiB" }), ".")
      )
    );
  }

  // The consumers holding a lease on ``device``: a chip each under its bar (name, state, size).
  function deviceConsumers(device, consumers) {
    const mine = consumers.filter((c) => c.lease && (c.device || "").split(",").includes(device.name));
    if (!mine.length) return null;
    const list = el("ul", { class: "device-consumers", "aria-label": `Consumers on ${device.name}` });
    for (const c of mine) {
      list.append(el(
        "li",
        { class: `consumer-chip consumer-${CONSUMER_STATES[c.state] || "other"}`, "data-consumer": consumerName(c) },
        el("span", { class: "consumer-name", text: consumerName(c) }),
        ` ${c.state} · ${size(c.vram_mib)}`
      ));
    }
    return list;
  }

  function deviceView(device, leases, consumers) {
    const mine = leases.filter((x) => (x.devices || []).includes(device.name));
    const sum = (state) => mine.filter((x) => x.state === state).reduce((a, x) => a + x.mib, 0);
    const idle = sum("idle");
    const evicting = sum("evicting");
    const active = Math.max(0, device.used_mib - idle - evicting);
    const free = Math.max(0, device.free_mib);
    const unavailable = device.reserved_mib + device.unmanaged_mib;
    const total = Math.max(1, device.total_mib, active + idle + evicting + free + unavailable);
    const parts = [
      ["active", active, "active"],
      ["evicting", evicting, "evicting"],
      ["idle", idle, "idle"],
      ["free", free, "free"],
      ["unavailable", unavailable, "reserved / unmanaged"],
    ];
    const described = parts.filter(([, n]) => n > 0).map(([, n, what]) => `${size(n)} ${what}`);
    const bar = el("div", {
      class: "bar",
      role: "img",
      "aria-label": `${device.name}: ${described.join(", ") || "no memory"}, of ${size(device.total_mib)}`,
      "data-device": device.name,
    });
    for (const [kind, n, what] of parts) {
      if (n <= 0) continue;
      const seg = el("div", { class: `seg seg-${kind}`, title: `${what}: ${mib(n)} MiB`, "data-mib": n });
      seg.style.width = `${(100 * n) / total}%`;
      bar.append(seg);
    }
    const meta = [device.host, device.cuda_index === null ? null : `cuda ${device.cuda_index}`];
    meta.push(`${device.leases} lease${device.leases === 1 ? "" : "s"}`);
    const nums = el("span", { class: "device-nums" },
      `${size(device.used_mib)} leased of ${size(device.budget_mib)} budget`,
      device.budget_mib !== device.total_mib ? ` (${size(device.total_mib)} total)` : "");
    const list = el("ul", { class: "device-parts", "aria-hidden": "true" });
    for (const [kind, n, what] of parts) {
      if (n <= 0) continue;
      list.append(el("li", null, el("span", { class: `swatch seg-${kind}` }), `${size(n)} ${what}`));
    }
    if (device.free_mib < 0) list.append(el("li", { class: "over", text: `over budget by ${size(-device.free_mib)}` }));
    return el(
      "div",
      { class: "device" },
      el("div", { class: "device-head" },
        el("span", { class: "device-name", text: device.name }),
        el("span", { class: "device-meta", text: meta.filter(Boolean).join(" · ") }),
        nums),
      bar,
      list,
      deviceConsumers(device, consumers)
    );
  }

  function leaseRows(pools, multiPool) {
    const rows = [];
    for (const p of pools) {
      for (const x of p.leases) {
        const where = (x.devices || []).join(", ");
        rows.push(el(
          "tr",
          { "data-lease": x.id },
          el("td", { text: x.holder }),
          el("td", { text: `${x.holder_host}:${x.holder_pid}` }),
          el("td", { text: priority(x.priority) }),
          el("td", { class: "num", text: (x.devices || []).length > 1 ? `${mib(x.mib)} × ${x.devices.length}` : mib(x.mib) }),
          el("td", { text: multiPool ? `${p.pool}/${where}` : where }),
          el("td", { class: "num", text: x.granted_at_ms ? duration(p.now_ms - x.granted_at_ms) : "" }),
          el("td", null, badge(x.state)),
          el("td", { class: "num", text: x.expires_at_ms ? duration(x.expires_at_ms - p.now_ms) : "" }),
          labels(x.labels),
          el("td", { class: "id", text: x.id })
        ));
      }
    }
    return rows;
  }

  function queueRows(pools, multiPool) {
    const rows = [];
    for (const p of pools) {
      p.queue.forEach((x, i) => {
        const wants = x.device ? x.device : "any device";
        rows.push(el(
          "tr",
          { "data-lease": x.id },
          el("td", { class: "num", text: i + 1 }),
          el("td", { text: x.holder }),
          el("td", { text: `${x.holder_host}:${x.holder_pid}` }),
          el("td", { text: priority(x.priority) }),
          el("td", { class: "num", text: mib(x.mib) }),
          el("td", { text: multiPool ? `${p.pool}/${wants}` : wants }),
          el("td", { class: "num", text: x.requested_at_ms ? duration(p.now_ms - x.requested_at_ms) : "" }),
          labels(x.labels),
          el("td", { class: "id", text: x.id })
        ));
      });
    }
    return rows;
  }

  function consumerRows(consumers, multiPool) {
    return consumers.map((c) => {
      const where = c.device ? (multiPool ? `${c.pool}/${c.device}` : c.device) : "";
      const since = Number.isFinite(c.since_s) ? duration(c.since_s * 1000) : "";
      return el(
        "tr",
        { "data-consumer": consumerName(c) },
        el("td", { text: consumerName(c) }),
        el("td", null, consumerBadge(c.state), since ? el("span", { class: "since", text: ` ${since}` }) : null),
        el("td", { text: c.lease ? where : "" }),
        el("td", { class: "num", text: c.lease ? mib(c.vram_mib) : "" }),
        el("td", { class: "num", text: c.measured_mib === null || c.measured_mib === undefined ? "" : mib(c.measured_mib) }),
        el("td", { class: "wrap error-text", text: c.error || "" })
      );
    });
  }

  function eventRows(events, multiPool) {
    const shown = new Set(["lease", "holder", "device", "mib"]);
    return events.slice().reverse().map((e) => {
      const f = e.fields || {};
      const cls = GOOD_EVENTS.has(e.event) ? "badge-good" : BAD_EVENTS.has(e.event) ? "badge-bad"
        : e.event === "evicting" ? "badge-evicting" : e.event === "idle" ? "badge-idle" : "badge-other";
      const details = Object.entries(f)
        .filter(([k]) => !shown.has(k))
        .map(([k, v]) => (k === "deadline" && /^\d+$/.test(v) ? `deadline ${clock(Number(v))}` : `${k}=${v}`));
      if (multiPool) details.unshift(`pool=${e.pool}`);
      return el(
        "tr",
        null,
        el("td", { text: clock(e.time_ms) }),
        el("td", null, el("span", { class: `badge ${cls}`, text: e.event })),
        el("td", { text: f.holder || "" }),
        el("td", { text: f.device || "" }),
        el("td", { class: "num", text: f.mib ? mib(f.mib) : "" }),
        el("td", { class: "wrap", text: details.join(" ") }),
        el("td", { class: "id", text: f.lease || "" })
      );
    });
  }

  function emptyRow(table, text) {
    const cols = table.tHead.rows[0].cells.length;
    return el("tr", null, el("td", { class: "empty", colspan: cols, text }));
  }

  function fill(id, rows, emptyText) {
    const table = $(id);
    table.tBodies[0].replaceChildren(...(rows.length ? rows : [emptyRow(table, emptyText)]));
  }

  // ``consumers`` is null when v1/consumers is not there (an older service) or failed: the
  // section stays hidden, and everything else is drawn as usual.
  function draw(status, events, consumers) {
    const pools = Object.values(status.pools || {}).sort((a, b) => a.pool.localeCompare(b.pool));
    const multiPool = pools.length > 1;
    const managed = consumers || [];
    const devices = $("devices");
    const views = [];
    for (const p of pools) {
      if (multiPool) views.push(el("h3", { class: "pool-title", text: `pool ${p.pool}` }));
      const here = managed.filter((c) => c.pool === p.pool);
      for (const d of p.devices) views.push(deviceView(d, p.leases, here));
    }
    const deviceCount = pools.reduce((a, p) => a + p.devices.length, 0);
    devices.replaceChildren(...(deviceCount ? views : [noDevices()]));

    const leaseList = leaseRows(pools, multiPool);
    const queueList = queueRows(pools, multiPool);
    fill("leases", leaseList, "No leases are held.");
    fill("queue", queueList, "Nobody is waiting.");
    fill("events", eventRows(events, multiPool), "No events yet.");
    $("leases-count").textContent = `(${leaseList.length})`;
    $("queue-count").textContent = `(${queueList.length})`;
    $("consumers-section").hidden = managed.length === 0;
    fill("consumers", consumerRows(managed, multiPool), "No consumers are managed.");
    $("consumers-count").textContent = `(${managed.length})`;

    const leased = pools.reduce((a, p) => a + p.devices.reduce((b, d) => b + d.used_mib, 0), 0);
    const budget = pools.reduce((a, p) => a + p.devices.reduce((b, d) => b + d.budget_mib, 0), 0);
    $("summary").textContent = [
      `${deviceCount} device${deviceCount === 1 ? "" : "s"}`,
      `${size(leased)} of ${size(budget)} leased`,
      `${leaseList.length} lease${leaseList.length === 1 ? "" : "s"}`,
      `${queueList.length} waiting`,
    ].join(" · ");
    lastGood = Date.now();
    $("updated").textContent = `updated ${clock(lastGood)}`;
    document.body.dataset.renders = String(Number(document.body.dataset.renders || 0) + 1);
  }

  async function refresh() {
    try {
      const [status, events, consumers] = await Promise.all([
        getJson("v1/status"),
        getJson(`v1/events?count=${EVENTS}`),
        getJson("v1/consumers").then((body) => body.consumers || [], () => null), // optional
      ]);
      draw(status, events.events || [], consumers);
      clearProblem();
    } catch (err) {
      showProblem(err);
    } finally {
      setTimeout(refresh, REFRESH_MS);
    }
  }

  takeToken();
  window.addEventListener("hashchange", takeToken);
  refresh();
})();
