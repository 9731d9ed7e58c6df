// The live page of sessiond: a snapshot from GET /v1/overview, refreshed whenever the event
// stream (GET /v1/events, read with fetch so that the key goes in a header) says something
// changed, and every 10 s for what no event announces (liveness, nodes, GPU memory).
// Everything shown is set as text, never parsed as HTML.
"use strict";

(() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const KEY_ITEM = "sessiond-key";
  const REASON_COLORS = {
    requested: "#5b9dff", websocket_disconnected: "#b07cff", room_empty: "#3fb27f",
    nobody_joined: "#7fd1c7", expired: "#e3a93b", orphaned: "#e5534b", node_lost: "#ff7b72",
    avatar_exited: "#d2a8ff", start_failed: "#f0883e", shutdown: "#8b9aab",
  };
  const $ = (id) => document.getElementById(id);

  let key = null;
  let snapshot = null;
  let lastEventId = 0;
  let skew = 0; // server clock minus this browser's
  let stream = null; // AbortController of the event stream
  let streamOpen = false;
  let timer = null;
  let refreshing = false;
  let again = false;
  let lastRefresh = 0;
  // Sessions already shown: a row appearing later is marked fresh for a moment.
  let seen = null;
  // Refreshes at most this often, however many events come.
  const REFRESH_GAP = 750;

  // --- the key: from the URL fragment (never sent to a server) or this tab's storage ---

  // A key goes in a request header: printable ASCII only.
  const KEY_SHAPE = /^[\x20-\x7e]+$/;
  const BAD_KEY = "A key is printable ASCII.";

  // The key from the fragment (then removed from the address) or this tab's storage, or
  // why there is none usable.
  function takeKey() {
    const found = /(?:^#|&)key=([^&]+)/.exec(location.hash);
    if (found) {
      history.replaceState(null, "", location.pathname + location.search);
      let given = null;
      try {
        given = decodeURIComponent(found[1]);
      } catch (e) {
        // a malformed escape: refused below
      }
      if (!given || !KEY_SHAPE.test(given)) return { problem: BAD_KEY };
      try {
        sessionStorage.setItem(KEY_ITEM, given);
      } catch (e) {
        return { key: given };
      }
    }
    const kept = sessionStorage.getItem(KEY_ITEM);
    return kept && KEY_SHAPE.test(kept) ? { key: kept } : { problem: "" };
  }

  function showLogin(message) {
    $("main").hidden = true;
    $("forget").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    document.body.dataset.state = "login";
  }

  function forget(message) {
    sessionStorage.removeItem(KEY_ITEM);
    key = null;
    snapshot = null;
    seen = null;
    if (stream) stream.abort();
    stream = null;
    setLive(false);
    showLogin(message);
  }

  function open(withKey) {
    key = withKey;
    $("login").hidden = true;
    $("forget").hidden = false;
    document.body.dataset.state = "connecting";
    refresh();
  }

  // --- reading ---

  function call(path, extra) {
    return fetch(path, Object.assign({ headers: { "x-api-key": key }, cache: "no-store" }, extra));
  }

  function schedule(delay) {
    if (timer !== null) return;
    const wait = Math.max(delay, lastRefresh + REFRESH_GAP - Date.now());
    timer = setTimeout(() => { timer = null; refresh(); }, wait);
  }

  async function refresh() {
    if (!key) return;
    if (refreshing) { again = true; return; }
    refreshing = true;
    lastRefresh = Date.now();
    const asked = key;
    try {
      const resp = await call("v1/overview");
      if (key !== asked) return; // forgotten or changed meanwhile
      if (resp.status === 401) { forget("That key is not valid here."); return; }
      if (!resp.ok) throw new Error("overview answered HTTP " + resp.status);
      const data = await resp.json();
      if (key !== asked) return;
      skew = Date.parse(data.generated_at) - Date.now();
      render(data);
      snapshot = data;
      if (!stream) follow(data.last_event_id);
    } catch (e) {
      if (key === asked) $("updated").textContent = "update failed: " + e.message;
    } finally {
      refreshing = false;
      if (again) { again = false; schedule(0); }
    }
  }

  // Server-Sent Events over fetch: EventSource cannot send the key in a header.
  async function follow(after) {
    if (!key) return;
    const controller = new AbortController();
    stream = controller;
    lastEventId = after;
    while (!controller.signal.aborted) {
      try {
        const resp = await call("v1/events?after=" + lastEventId, {
          signal: controller.signal,
          headers: { "x-api-key": key, accept: "text/event-stream" },
        });
        if (resp.status === 401) { forget("That key is not valid here."); return; }
        if (!resp.ok || !resp.body) throw new Error("events answered HTTP " + resp.status);
        setLive(true);
        // Anything that happened while the stream was down is in a fresh snapshot.
        schedule(0);
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          // Line ends as CR LF or CR become LF; a CR at the end may pair with the next
          // chunk's LF, so it waits.
          buffer += value;
          const held = buffer.endsWith("\r") ? "\r" : "";
          buffer = buffer.slice(0, buffer.length - held.length).replace(/\r\n?/g, "\n") + held;
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const message = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            let changed = false;
            for (const line of message.split("\n")) {
              if (line.startsWith("id:") && /^\d+$/.test(line.slice(3).trim())) {
                lastEventId = Number(line.slice(3).trim());
              } else if (line.startsWith("data:")) {
                changed = true;
              }
            }
            if (changed) schedule(50);
          }
        }
      } catch (e) {
        if (controller.signal.aborted) return;
      }
      setLive(false);
      await new Promise((r) => setTimeout(r, 1000));
    }
  }

  function setLive(on) {
    streamOpen = on;
    const badge = $("live");
    badge.dataset.state = on ? "live" : "off";
    badge.textContent = on ? "live" : key ? "reconnecting" : "offline";
    if (key) document.body.dataset.state = on && snapshot ? "live" : "connecting";
  }

  // --- showing ---

  function now() { return Date.now() + skew; }

  function span(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    if (h > 0) return h + "h " + String(m).padStart(2, "0") + "m";
    if (m > 0) return m + "m " + String(r).padStart(2, "0") + "s";
    return r + "s";
  }

  function bytes(n) {
    const gib = n / 1073741824;
    return gib >= 1 ? gib.toFixed(1) + " GiB" : (n / 1048576).toFixed(0) + " MiB";
  }

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function pill(text, cls, title) {
    const p = el("span", text, "pill " + cls);
    if (title) p.title = title;
    return p;
  }

  // A cell whose text follows the clock: time since or until `at`.
  function clockCell(at, way) {
    const td = el("td");
    td.dataset.at = at;
    td.dataset.way = way;
    tickCell(td);
    return td;
  }

  function tickCell(td) {
    const at = Date.parse(td.dataset.at);
    td.textContent = td.dataset.way === "until" ? span(at - now()) : span(now() - at) + " ago";
  }

  function fill(tableId, rows) {
    const body = $(tableId).querySelector("tbody");
    body.replaceChildren(...rows);
    const empty = $(tableId + "-empty");
    if (empty) empty.hidden = rows.length > 0;
  }

  function row(id, cells) {
    const tr = el("tr");
    tr.dataset.session = id;
    if (seen && !seen.has(id)) tr.className = "fresh";
    tr.append(...cells);
    return tr;
  }

  function resourcePills(resources) {
    const td = el("td");
    for (const r of resources || []) {
      const state = r.release === "pending" && r.release_error ? "failing" : r.release;
      td.append(pill(r.kind + " " + state, state, r.release_error || r.note || ""));
    }
    return td;
  }

  function render(data) {
    $("main").hidden = false;
    $("scope").textContent = data.tenant === null ? "operator · every tenant" : "tenant " + data.tenant;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();

    $("n-sessions").textContent = data.sessions.length + (data.sessions_truncated ? "+" : "");
    // The chart counts every end of the hour (the list stops at its limit).
    $("n-ends").textContent = data.ends_by_reason
      .reduce((n, b) => n + b.ends.reduce((m, c) => m + c.count, 0), 0);
    $("n-releases").textContent = data.releases.length;
    $("sessions-more").hidden = !data.sessions_truncated;

    fill("sessions", data.sessions.map((p) => {
      const s = p.session;
      return row(s.session_id, [
        el("td", s.session_id, "id"), el("td", p.tenant), el("td", p.node),
        clockCell(s.started_at, "since"), clockCell(s.expires_at, "until"),
        clockCell(s.last_seen_at, "since"), resourcePills(s.resources),
      ]);
    }));

    fill("ends", data.recent_ends.slice(0, 50).map((p) => {
      const s = p.session;
      const owed = (s.resources || []).filter((r) => r.release !== "released").length;
      const reason = el("td");
      reason.append(pill(s.end_reason, "reason"));
      reason.firstChild.dataset.reason = s.end_reason;
      return row(s.session_id, [
        el("td", s.session_id, "id"), el("td", p.tenant), clockCell(s.ended_at, "since"),
        reason, el("td", owed === 0 ? "all back" : owed + " owed"),
      ]);
    }));

    fill("releases", data.releases.map((o) => {
      const r = o.resource;
      return row(o.session_id, [
        el("td", o.session_id, "id"), el("td", o.tenant), el("td", o.node),
        el("td", r.kind + " " + r.handle),
        (() => { const td = el("td"); td.append(pill(o.failing ? "failing" : "pending", o.failing ? "failing" : "pending")); return td; })(),
        el("td", r.release_attempts), r.retry_at ? clockCell(r.retry_at, "until") : el("td", "—"),
        el("td", r.release_error || ""),
      ]);
    }));

    chart(data.ends_by_reason);
    // Sessions per node from the list itself (live); a node's own count (written with its
    // heartbeat) when the list is cut short.
    const perNode = data.sessions_truncated ? null : data.sessions.reduce((m, p) => {
      m.set(p.node, (m.get(p.node) || 0) + 1);
      return m;
    }, new Map());
    nodes(data.nodes, perNode);

    seen = new Set([...data.sessions, ...data.recent_ends].map((p) => p.session.session_id));
    if (streamOpen) document.body.dataset.state = "live";
  }

  function svg(tag, attrs) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    return e;
  }

  function chart(buckets) {
    const box = $("chart");
    const width = 480, height = 180, left = 28, bottom = 20, top = 8;
    const totals = buckets.map((b) => b.ends.reduce((n, c) => n + c.count, 0));
    const most = Math.max(1, ...totals);
    const slot = (width - left) / buckets.length;
    const scale = (height - bottom - top) / most;
    const parts = [];
    parts.push(svg("line", { x1: left, x2: width, y1: height - bottom, y2: height - bottom, stroke: "#26313d" }));
    const label = svg("text", { x: 2, y: top + 8 });
    label.textContent = String(most);
    parts.push(label);
    const used = new Set();
    buckets.forEach((b, i) => {
      let y = height - bottom;
      for (const c of b.ends) {
        const h = c.count * scale;
        y -= h;
        const bar = svg("rect", {
          x: left + i * slot + 3, y, width: slot - 6, height: h,
          fill: REASON_COLORS[c.reason] || "#8b9aab",
        });
        const tip = svg("title", {});
        tip.textContent = c.count + " " + c.reason;
        bar.append(tip);
        parts.push(bar);
        used.add(c.reason);
      }
      if (i % 3 === 0 || i === buckets.length - 1) {
        const last = i === buckets.length - 1;
        const t = svg("text", {
          x: last ? width : left + i * slot + 2, y: height - 5, "text-anchor": last ? "end" : "start",
        });
        t.textContent = new Date(Date.parse(b.start))
          .toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false });
        parts.push(t);
      }
    });
    box.replaceChildren(...parts);
    const legend = $("legend");
    legend.replaceChildren(...[...used].sort().map((reason) => {
      const li = el("li");
      const dot = svg("svg", { viewBox: "0 0 10 10" });
      dot.append(svg("rect", { width: 10, height: 10, rx: 2, fill: REASON_COLORS[reason] || "#8b9aab" }));
      li.append(dot, document.createTextNode(reason));
      return li;
    }));
  }

  function gpuBar(g) {
    const wrap = el("div", null, "gpu");
    wrap.append(el("span", "#" + g.index + " " + g.name + " · " + bytes(g.total_bytes)));
    const bar = svg("svg", { viewBox: "0 0 100 10", preserveAspectRatio: "none" });
    const total = Math.max(1, g.total_bytes);
    const other = Math.max(0, g.total_bytes - g.free_bytes - g.used_by_sessions_bytes - g.not_returned_bytes);
    const waiting = Math.max(0, g.promised_bytes - g.used_by_sessions_bytes);
    let x = 0;
    for (const [n, color] of [
      [g.used_by_sessions_bytes, "#5b9dff"], [g.not_returned_bytes, "#e5534b"],
      [other, "#8b9aab"], [Math.min(waiting, g.free_bytes), "#e3a93b"],
    ]) {
      const w = (100 * n) / total;
      bar.append(svg("rect", { x, y: 0, width: w, height: 10, fill: color }));
      x += w;
    }
    bar.append(svg("rect", { x, y: 0, width: Math.max(0, 100 - x), height: 10, fill: "#26313d" }));
    const tip = svg("title", {});
    tip.textContent = "used by sessions " + bytes(g.used_by_sessions_bytes) + ", promised " + bytes(g.promised_bytes) +
      ", free " + bytes(g.free_bytes) + (g.not_returned_bytes ? ", not returned " + bytes(g.not_returned_bytes) : "");
    bar.append(tip);
    wrap.append(bar);
    return wrap;
  }

  function nodes(list, perNode) {
    const section = $("nodes-section");
    $("card-nodes").hidden = list === null;
    section.hidden = list === null;
    if (list === null) return;
    $("n-nodes").textContent = list.filter((n) => n.alive).length;
    $("nodes").querySelector("tbody").replaceChildren(...list.map((n) => {
      const tr = el("tr");
      tr.dataset.node = n.node;
      const state = el("td");
      if (n.alive) state.append(pill("alive", "alive"));
      else if (n.stopped) state.append(pill("stopped", "draining"));
      else state.append(pill("heartbeat missing", "dead"));
      if (n.draining) state.append(pill("draining", "draining"));
      if (n.full) state.append(pill("full", "full", n.full));
      const gpus = el("td");
      if (n.gpus.length === 0) gpus.append(el("span", "no GPUs reported", "muted"));
      for (const g of n.gpus) gpus.append(gpuBar(g));
      const running = perNode ? perNode.get(n.node) || 0 : n.sessions;
      // "3 / 5": its sessions and its slots (--max-node-sessions), when it has a limit.
      const count = el("td", n.slots === null || n.slots === undefined ? String(running) : running + " / " + n.slots);
      tr.append(el("td", n.node), state, count, gpus);
      return tr;
    }));
  }

  // --- start ---

  document.addEventListener("DOMContentLoaded", () => {
    $("login").addEventListener("submit", (e) => {
      e.preventDefault();
      const typed = $("key").value.trim();
      if (!typed) return;
      if (!KEY_SHAPE.test(typed)) { showLogin(BAD_KEY); return; }
      sessionStorage.setItem(KEY_ITEM, typed);
      $("key").value = "";
      open(typed);
    });
    $("forget").addEventListener("click", () => forget(""));
    setInterval(() => {
      for (const td of document.querySelectorAll("td[data-at]")) tickCell(td);
    }, 1000);
    setInterval(() => schedule(0), 10000);
    const taken = takeKey();
    if (taken.key) open(taken.key); else showLogin(taken.problem);
  });
})();
