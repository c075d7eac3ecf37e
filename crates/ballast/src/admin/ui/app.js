// ballast status page: reads the admin API (the same calls as the CLI) every few
// seconds and draws the last hour as SVG. No library, no request to another origin.
"use strict";

(function () {
  const TOKEN_KEY = "ballast-admin-token";
  const params = new URLSearchParams(location.search);
  const REFRESH_MS = Math.max(500, Number(params.get("refresh") || 5) * 1000);
  const COLORS = ["#2f6fde", "#d9480f", "#2b8a3e", "#ae3ec9", "#e8590c", "#1098ad", "#5c940d", "#c2255c"];
  const SVG = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  const state = { status: null, mode: null, history: null, alerts: null, deadDest: null, timer: null, confirm: null };

  // --- small DOM helpers (text only: event data never becomes markup) -----------------
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") el.className = v;
      else if (k === "on") for (const [ev, f] of Object.entries(v)) el.addEventListener(ev, f);
      else if (v !== undefined && v !== null) el.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }
  function s(tag, attrs, text) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    return el;
  }
  function show(el, on) { el.classList.toggle("hidden", !on); }

  // --- formatting -------------------------------------------------------------------------
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0, v = Number(n);
    while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
    return (i ? v.toFixed(v < 10 ? 1 : 0) : v) + " " + u[i];
  }
  function num(n) {
    if (n === null || n === undefined || Number.isNaN(n)) return "–";
    const v = Number(n);
    if (Math.abs(v) >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (Math.abs(v) >= 1e4) return (v / 1e3).toFixed(1) + "k";
    return Number.isInteger(v) ? String(v) : v.toFixed(v < 10 ? 2 : 1);
  }
  function ago(ms) {
    const d = Math.max(0, (Date.now() - ms) / 1000);
    if (d < 90) return Math.round(d) + " s ago";
    if (d < 5400) return Math.round(d / 60) + " min ago";
    if (d < 172800) return (d / 3600).toFixed(1) + " h ago";
    return Math.round(d / 86400) + " days ago";
  }
  function age(secs) {
    if (secs === null || secs === undefined) return "–";
    if (secs < 90) return Math.round(secs) + " s";
    if (secs < 5400) return Math.round(secs / 60) + " min";
    return (secs / 3600).toFixed(1) + " h";
  }
  function when(iso) {
    const t = Date.parse(iso);
    return Number.isNaN(t) ? String(iso) : new Date(t).toLocaleString() + " (" + ago(t) + ")";
  }

  // --- the admin API ------------------------------------------------------------------------
  class Unauthorized extends Error {}
  async function api(path, opts) {
    const o = Object.assign({ headers: {} }, opts || {});
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) o.headers["Authorization"] = "Bearer " + token;
    if (o.json !== undefined) {
      o.headers["Content-Type"] = "application/json";
      o.body = JSON.stringify(o.json);
      delete o.json;
    }
    o.cache = "no-store";
    const r = await fetch(path, o);
    if (r.status === 401) throw new Unauthorized(await r.text());
    if (!r.ok) throw new Error(path + ": " + r.status + " " + (await r.text()));
    return r.json();
  }

  function needToken(msg) {
    show($("token-panel"), true);
    $("token-error").textContent = sessionStorage.getItem(TOKEN_KEY)
      ? "The token was refused (" + msg + ")."
      : "This admin API needs a token.";
    $("updated").textContent = "waiting for the admin token";
    show($("main"), false);
  }

  // --- refresh ---------------------------------------------------------------------------
  async function refresh() {
    clearTimeout(state.timer);
    try {
      const [status, mode, history, alerts] = await Promise.all([
        api("/v1/status"), api("/v1/mode"), api("/v1/history"), api("/v1/alerts"),
      ]);
      Object.assign(state, { status, mode, history, alerts });
      show($("token-panel"), false);
      show($("main"), true);
      show($("error"), false);
      render();
      if (state.deadDest) await loadDead(state.deadDest);
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
      document.body.dataset.loaded = "1";
    } catch (e) {
      if (e instanceof Unauthorized) { needToken(e.message); return; }
      $("error").textContent = "Refresh failed: " + e.message;
      show($("error"), true);
    }
    state.timer = setTimeout(refresh, REFRESH_MS);
  }

  function render() {
    const st = state.status, md = state.mode;
    const degraded = st.mode !== "NORMAL";
    // Mode.
    $("mode").textContent = st.mode;
    $("mode").className = "big " + (degraded ? "bad" : "good");
    $("mode-badge").textContent = st.mode;
    $("mode-badge").className = "badge " + (degraded ? "bad" : "good");
    $("mode-detail").textContent = "since " + when(md.since) + " — " + md.reason +
      (st.routing ? "; forwarding events" : "; forwarding nothing");
    $("mode-switch").textContent = degraded ? "Switch to normal" : "Switch to degraded";
    $("mode-switch").dataset.target = degraded ? "normal" : "degraded";
    // Readiness.
    $("ready").textContent = st.ready ? "ready" : "not ready";
    $("ready").className = "big " + (st.ready ? "good" : "bad");
    $("ready-badge").textContent = st.ready ? "ready" : "not ready";
    $("ready-badge").className = "badge " + (st.ready ? "good" : "bad");
    $("ready-detail").textContent = st.storage.writable
      ? "accepting and persisting events"
      : "storage failed: " + (st.storage.failure || "unknown");
    // Storage.
    const used = st.storage.bytes_used, quota = st.storage.quota_bytes;
    const pct = quota ? Math.min(100, (100 * used) / quota) : 0;
    $("storage").textContent = pct.toFixed(1) + " %";
    $("storage").className = "big " + (pct >= 90 ? "bad" : pct >= 80 ? "warn" : "good");
    $("storage-bar").style.width = pct.toFixed(1) + "%";
    $("storage-bar").className = pct >= 90 ? "bad" : pct >= 80 ? "warn" : "good";
    $("storage-detail").textContent = bytes(used) + " of " + bytes(quota) + " quota · " +
      st.storage.segments + " segment(s) · " + num(st.storage.events_appended) + " events appended";
    // Crashes.
    const crashes = md.crashes || [];
    $("crashes").textContent = md.crashes_in_window + " / " + md.crash_threshold;
    $("crashes").className = "big " + (md.crashes_in_window ? "warn" : "good");
    const cl = $("crash-list");
    cl.replaceChildren(h("li", {}, "crashes in the last " + Math.round(md.crash_window_s / 60) +
      " min (degraded at " + md.crash_threshold + ")"));
    for (const c of crashes.slice(-5).reverse()) cl.append(h("li", {}, "crash " + when(c)));
    renderAlerts();
    renderDestinations();
    renderCharts();
  }

  function renderAlerts() {
    const ul = $("alerts");
    const open = state.alerts.open || [];
    ul.replaceChildren();
    if (!open.length) ul.append(h("li", { class: "muted" }, "none"));
    for (const a of open) {
      ul.append(h("li", { class: "alert" }, h("strong", {}, a.class), " ", h("code", {}, a.key),
        " — open since " + when(a.since)));
    }
    if (state.alerts.outbox_pending) {
      ul.append(h("li", { class: "muted" }, state.alerts.outbox_pending + " notification(s) waiting in the outbox"));
    }
  }

  // Per-second rate of a counter over the last two samples (or the last minute).
  function rate(i, field) {
    const smp = (state.history && state.history.samples) || [];
    if (smp.length < 2) return null;
    const last = smp[smp.length - 1];
    let j = smp.length - 2;
    while (j > 0 && last.t - smp[j].t < 60000) j--;
    const first = smp[j];
    const dt = (last.t - first.t) / 1000;
    if (!(dt > 0) || !last.d[i] || !first.d[i]) return null;
    return Math.max(0, last.d[i][field] - first.d[i][field]) / dt;
  }

  // p50/p99 (request latency, or delivery lag with prefix "lag_") of the newest sample of
  // the last minute that had deliveries.
  function latency(i, prefix) {
    const smp = (state.history && state.history.samples) || [];
    for (let k = smp.length - 1; k >= 0 && smp[k].t > Date.now() - 60000; k--) {
      const d = smp[k].d[i];
      const p50 = d && d[prefix + "p50"];
      if (p50 !== null && p50 !== undefined) return ms(p50) + " / " + ms(d[prefix + "p99"]);
    }
    return "–";
  }
  function ms(secs) {
    if (secs === null || secs === undefined) return "–";
    return secs < 1 ? (secs * 1000).toFixed(secs < 0.01 ? 1 : 0) + " ms" : secs.toFixed(2) + " s";
  }

  // A warehouse destination's values kept out of their column, in `rudder_discards`
  // (`warehouse_discards` in /v1/status: reason → count).
  function discards(byReason) {
    const reasons = Object.entries(byReason || {}).filter(([, n]) => n > 0);
    if (!reasons.length) return null;
    const total = reasons.reduce((t, [, n]) => t + n, 0);
    const title = "values in rudder_discards, by reason: " + reasons.map(([r, n]) => r + " " + n).join(", ");
    return h("span", { class: "discards muted", title }, " · " + num(total) + " discarded");
  }

  function renderDestinations() {
    const tb = $("destinations").tBodies[0];
    tb.replaceChildren();
    const ids = (state.history && state.history.destinations) || [];
    const dests = state.status.destinations;
    if (!dests.length) tb.append(h("tr", {}, h("td", { colspan: "15", class: "muted" }, "no destination configured")));
    for (const d of dests) {
      const i = ids.indexOf(d.id);
      const r = i >= 0 ? rate(i, "delivered") : null;
      const held = d.partitions_held + " / " + d.partitions;
      const row = h("tr", { "data-destination": d.id, class: d.dead_letters ? "has-dead" : "" },
        h("td", {}, h("span", { class: "swatch", "data-color": String(i) }), d.id),
        h("td", {}, d.kind, discards(d.warehouse_discards)),
        h("td", { class: d.active ? "good" : "muted", title: "partitions whose lease this replica holds" }, (d.active ? "yes " : "no ") + "(" + held + ")"),
        h("td", { class: "num backlog" }, num(d.backlog_bytes)),
        h("td", { class: "num oldest" }, age(d.oldest_age_s)),
        h("td", { class: "num" }, num(d.buffered_events)),
        h("td", { class: "num" }, num(d.in_flight)),
        h("td", { class: "num" }, num(d.delivered)),
        h("td", { class: "num" }, r === null ? "–" : num(r)),
        h("td", { class: "num lag" }, i >= 0 ? latency(i, "lag_") : "–"),
        h("td", { class: "num latency" }, i >= 0 ? latency(i, "") : "–"),
        h("td", { class: "num" }, num(d.retries)),
        h("td", { class: "num" }, num(d.retrying_users)),
        h("td", { class: "num dead " + (d.dead_letters ? "bad" : "") }, num(d.dead_letters)),
        h("td", {}, h("button", { type: "button", class: "small", on: { click: () => openDead(d.id) } }, "Dead letters")));
      tb.append(row);
    }
    for (const sw of tb.querySelectorAll(".swatch")) sw.style.background = COLORS[Number(sw.dataset.color) % COLORS.length] || "#999";
  }

  // --- charts (hand-drawn SVG) ------------------------------------------------------------
  function series(fn) {
    const hist = state.history;
    const smp = hist.samples;
    return hist.destinations.map((name, i) => ({
      name, color: COLORS[i % COLORS.length],
      points: smp.map((p, k) => [p.t, fn(p, i, k, smp)]).filter((x) => x[1] !== null),
    }));
  }
  function perSecond(field) {
    return (p, i, k, smp) => {
      if (k === 0 || !p.d[i] || !smp[k - 1].d[i]) return null;
      const dt = (p.t - smp[k - 1].t) / 1000;
      return dt > 0 ? Math.max(0, p.d[i][field] - smp[k - 1].d[i][field]) / dt : null;
    };
  }

  function chart(title, list, fmt) {
    const W = 420, H = 170, L = 52, R = 10, T = 24, B = 22;
    // The last hour, or less while the server has not been up that long (at least 2 min).
    const now = Date.now();
    const first = state.history.samples.length ? state.history.samples[0].t : now;
    const span = Math.min(3600e3, Math.max(120e3, now - first));
    const from = now - span;
    let max = 0;
    for (const sr of list) for (const [, v] of sr.points) max = Math.max(max, v);
    max = max > 0 ? max * 1.1 : 1;
    const x = (t) => L + ((t - from) / (now - from)) * (W - L - R);
    const y = (v) => T + (1 - v / max) * (H - T - B);
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
    svg.append(s("text", { x: 4, y: 15, class: "chart-title" }, title));
    // Legend, right-aligned on the title line.
    let lx = W - R;
    for (const sr of list.slice().reverse()) {
      const label = sr.name.length > 14 ? sr.name.slice(0, 13) + "…" : sr.name;
      lx -= label.length * 5.6 + 16;
      svg.append(s("rect", { x: lx, y: 7, width: 8, height: 8, fill: sr.color, rx: 1 }));
      svg.append(s("text", { x: lx + 11, y: 15, class: "legend" }, label));
    }
    for (const f of [0, 0.5, 1]) {
      const yy = y(max * f);
      svg.append(s("line", { x1: L, x2: W - R, y1: yy, y2: yy, class: "grid" }));
      svg.append(s("text", { x: L - 4, y: yy + 4, class: "axis", "text-anchor": "end" }, fmt(max * f)));
    }
    for (const f of [1, 0.75, 0.5, 0.25, 0]) {
      const back = span * f;
      const label = !f ? "now" : back >= 120e3 ? "-" + Math.round(back / 60e3) + "m" : "-" + Math.round(back / 1e3) + "s";
      svg.append(s("text", { x: x(now - back), y: H - 6, class: "axis", "text-anchor": "middle" }, label));
    }
    for (const sr of list) {
      const pts = sr.points.filter(([t]) => t >= from);
      if (!pts.length) continue;
      const d = pts.map(([t, v], k) => (k ? "L" : "M") + x(t).toFixed(1) + " " + y(v).toFixed(1)).join(" ");
      const path = s("path", { d, fill: "none", stroke: sr.color, "stroke-width": 1.8, class: "series" });
      path.append(s("title", {}, sr.name));
      svg.append(path);
      const [lt, lv] = pts[pts.length - 1];
      svg.append(s("circle", { cx: x(lt), cy: y(lv), r: 2.5, fill: sr.color }));
    }
    return h("figure", { class: "chart-box" }, svg);
  }

  function renderCharts() {
    const hist = state.history;
    const box = $("charts");
    $("history-detail").textContent = "(" + hist.samples.length + " sample(s) every " + hist.interval_s + " s, kept in memory)";
    const storage = [{
      name: "storage used", color: COLORS[0],
      points: hist.samples.map((p) => [p.t, p.bytes_used]),
    }];
    const peak = Math.max(0, ...hist.samples.map((p) => p.bytes_used));
    if (hist.quota_bytes && peak > hist.quota_bytes / 2) storage.push({ name: "quota", color: "#c92a2a", points: hist.samples.map((p) => [p.t, hist.quota_bytes]) });
    const ingest = [{
      name: "ingested /s", color: COLORS[0],
      points: hist.samples.map((p, k, a) => [p.t, k ? Math.max(0, p.events_appended - a[k - 1].events_appended) / Math.max(0.001, (p.t - a[k - 1].t) / 1000) : null]).filter((x) => x[1] !== null),
    }];
    box.replaceChildren(
      chart("Backlog per destination", series((p, i) => (p.d[i] ? p.d[i].backlog : null)), num),
      chart("Delivered per second", series(perSecond("delivered")), num),
      chart("Retries per second", series(perSecond("retries")), num),
      chart("Delivery lag p99 (accepted → delivered)", series((p, i) => (p.d[i] && p.d[i].lag_p99 !== null ? p.d[i].lag_p99 : null)), ms),
      chart("Delivery request latency p99", series((p, i) => (p.d[i] && p.d[i].p99 !== null ? p.d[i].p99 : null)), ms),
      chart("Dead letters", series((p, i) => (p.d[i] ? p.d[i].dead_letters : null)), num),
      chart("Events ingested per second", ingest, num),
      chart("Storage used", storage, bytes),
    );
  }

  // --- dead letters and replay -------------------------------------------------------------
  async function openDead(id) {
    state.deadDest = id;
    $("dead-dest").textContent = id;
    $("replay-result").textContent = "";
    show($("dead-panel"), true);
    await loadDead(id);
    $("dead-panel").scrollIntoView({ block: "nearest" });
  }

  async function loadDead(id) {
    let list;
    try {
      list = await api("/v1/dead-letters?limit=200&destination=" + encodeURIComponent(id));
    } catch (e) {
      if (e instanceof Unauthorized) return needToken(e.message);
      $("replay-result").textContent = "Reading the dead letters failed: " + e.message;
      return;
    }
    const tb = $("dead-letters").tBodies[0];
    tb.replaceChildren();
    if (!list.length) tb.append(h("tr", {}, h("td", { colspan: "7", class: "muted" }, "no dead letters")));
    for (const d of list) {
      const ev = d.event || {};
      const what = [ev.type, ev.event, ev.messageId].filter(Boolean).join(" · ");
      tb.append(h("tr", { class: "dead-letter" },
        h("td", {}, d.id),
        h("td", {}, new Date(d.dead_at_ms).toLocaleString()),
        h("td", {}, d.kind),
        h("td", { class: "num" }, d.attempts),
        h("td", { class: "num status" }, d.status === null || d.status === undefined ? "–" : d.status),
        h("td", { class: "reason" }, d.reason),
        h("td", { title: JSON.stringify(ev) }, what || "(event)")));
    }
  }

  function replay(since) {
    const id = state.deadDest;
    if (!id) return;
    let q = "destination=" + encodeURIComponent(id);
    let what = "all dead letters of " + id;
    if (since) {
      const t = new Date(since);
      if (Number.isNaN(t.getTime())) { $("replay-result").textContent = "Pick a time first."; return; }
      const iso = t.toISOString().replace(/\.\d{3}Z$/, "Z");
      q += "&since=" + encodeURIComponent(iso);
      what = "the dead letters of " + id + " that died since " + t.toLocaleString();
    }
    ask("Replay " + what + "? They are sent to the destination again.", async () => {
      try {
        const r = await api("/v1/dead-letters/replay?" + q, { method: "POST" });
        $("replay-result").textContent = r.replayed + " dead letter(s) of " + r.destination + " re-enqueued";
      } catch (e) {
        if (e instanceof Unauthorized) return needToken(e.message);
        $("replay-result").textContent = "Replay failed: " + e.message;
      }
      await refresh();
    });
  }

  // --- mode --------------------------------------------------------------------------------
  function switchMode() {
    const to = $("mode-switch").dataset.target;
    const text = to === "degraded"
      ? "Switch to DEGRADED mode? Events are still accepted and stored, but nothing is forwarded until normal mode."
      : "Switch to NORMAL mode? Delivery resumes and the crash history is cleared.";
    ask(text, async () => {
      try {
        await api("/v1/mode", { method: "POST", json: { mode: to } });
      } catch (e) {
        if (e instanceof Unauthorized) return needToken(e.message);
        $("error").textContent = "Switching the mode failed: " + e.message;
        show($("error"), true);
      }
      await refresh();
    });
  }

  // --- confirmation ---------------------------------------------------------------------------
  function ask(text, action) {
    $("confirm-text").textContent = text;
    state.confirm = action;
    show($("confirm"), true);
    $("confirm-no").focus();
  }
  function answer(yes) {
    const action = state.confirm;
    state.confirm = null;
    show($("confirm"), false);
    if (yes && action) action();
  }

  // --- wiring ---------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    $("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const t = $("token-input").value.trim();
      if (t) sessionStorage.setItem(TOKEN_KEY, t);
      $("token-input").value = "";
      refresh();
    });
    $("token-clear").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); refresh(); });
    $("token-button").addEventListener("click", () => show($("token-panel"), $("token-panel").classList.contains("hidden")));
    $("mode-switch").addEventListener("click", switchMode);
    $("replay-all").addEventListener("click", () => replay(null));
    $("replay-since-button").addEventListener("click", () => replay($("replay-since").value || "invalid"));
    $("dead-close").addEventListener("click", () => { state.deadDest = null; show($("dead-panel"), false); });
    $("confirm-yes").addEventListener("click", () => answer(true));
    $("confirm-no").addEventListener("click", () => answer(false));
    document.addEventListener("keydown", (ev) => { if (ev.key === "Escape" && state.confirm) answer(false); });
    refresh();
  });
})();
