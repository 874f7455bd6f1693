// affinity-proxy live dashboard. Plain browser JavaScript, no build step, no other hosts.
// Reads the admin token from the URL fragment (#token=...), keeps it in this tab's sessionStorage,
// removes it from the address bar, and sends it as a bearer header on dashboard/data and
// session-check. Every value from the server is written with textContent, never as HTML.
"use strict";

(function () {
  const REFRESH_MS = 2000;
  const BUCKET_SECONDS = 5;
  const TOKEN_KEY = "affinity-proxy-admin-token";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const SERIES = [
    { key: "requests", label: "requests" },
    { key: "replays", label: "replays" },
    { key: "replay_status", label: "409s" },
    { key: "repins", label: "re-pins" },
  ];
  const REPIN_WORDS = {
    dead: "its instance was down (failing health checks)",
    gone: "its instance is gone (removed or destroyed)",
    draining: "its instance was draining",
    invalid_cookie: "its affinity cookie was invalid, expired or tampered with",
    unavailable: "Fly reported its instance unavailable",
    replay_failed: "Fly could not replay to its instance",
    overload: "its instance was overloaded",
    operator: "an operator moved it",
    loop_guard: "a replay loop was prevented (served here instead)",
  };

  const state = { token: readToken(), hidden: new Set(), replayStatus: 409, lastOk: 0 };

  function readToken() {
    const fragment = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    let token = fragment.get("token");
    try {
      if (token) {
        window.sessionStorage.setItem(TOKEN_KEY, token);
      } else {
        token = window.sessionStorage.getItem(TOKEN_KEY);
      }
    } catch (e) {
      // storage disabled: the token lives in memory for this page load only
    }
    if (fragment.has("token") && window.history && window.history.replaceState) {
      window.history.replaceState(null, "", window.location.pathname + window.location.search);
    }
    return token || null;
  }

  function $(id) {
    return document.getElementById(id);
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    if (attrs) {
      for (const [name, value] of Object.entries(attrs)) {
        if (name === "className") node.className = value;
        else node.setAttribute(name, value);
      }
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  async function getJSON(path) {
    const headers = { Accept: "application/json" };
    if (state.token) headers.Authorization = "Bearer " + state.token;
    const response = await fetch(path, { headers: headers, credentials: "omit", cache: "no-store" });
    if (response.status === 401) {
      const err = new Error(state.token
        ? "The admin token was refused. Open this page as /dashboard#token=YOUR_TOKEN."
        : "The admin listener needs a token: open this page as /dashboard#token=YOUR_TOKEN.");
      err.fatal = true;
      throw err;
    }
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok) {
      throw new Error((body && body.message) || "HTTP " + response.status);
    }
    return body;
  }

  function formatDuration(total) {
    let s = Math.max(0, Math.floor(total));
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + s + "s";
    return s + "s";
  }

  function shortAgo(seconds) {
    return seconds % 60 === 0 ? seconds / 60 + "m" : formatDuration(seconds);
  }

  function formatRate(value) {
    if (value === 0) return "0";
    if (value >= 100) return value.toFixed(0);
    if (value >= 10) return value.toFixed(1);
    return value.toFixed(2);
  }

  function sum(values) {
    let total = 0;
    for (const v of values) total += v;
    return total;
  }

  function setText(id, value, cls) {
    const node = $(id);
    node.textContent = value;
    if (cls !== undefined) node.className = cls;
  }

  function showError(message) {
    const box = $("error");
    if (message) {
      box.textContent = message;
      box.hidden = false;
    } else {
      box.hidden = true;
    }
  }

  function renderHeader(doc) {
    setText("node", doc.node);
    setText("pid", String(doc.pid));
    setText("mode", doc.mode);
    setText("region", doc.region || "–");
    setText("uptime", formatDuration(doc.uptime_seconds));
    setText("store", doc.store.kind + (doc.store.ok ? " · ok" : " · DOWN"), doc.store.ok ? "ok" : "bad");
    setText("status", doc.status, doc.status === "ok" ? "ok" : (doc.status === "degraded" ? "warn" : "bad"));
    setText("updated", new Date().toLocaleTimeString());
  }

  function renderRates(events) {
    for (const s of SERIES) {
      const values = events.series[s.key];
      const complete = values.slice(-11, -1); // the current second is still running
      setText("rate-" + s.key, formatRate(sum(complete) / Math.max(1, complete.length)));
      setText("total-" + s.key, String(sum(values.slice(-60))));
    }
    setText("replay-status-code", String(state.replayStatus));
  }

  function bucketed(values) {
    const out = [];
    for (let i = 0; i < values.length; i += BUCKET_SECONDS) {
      const chunk = values.slice(i, i + BUCKET_SECONDS);
      out.push(sum(chunk) / chunk.length);
    }
    return out;
  }

  function niceCeiling(value) {
    if (value <= 0.25) return 0.25;
    const magnitude = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (value <= step * magnitude) return step * magnitude;
    }
    return 10 * magnitude;
  }

  function renderChart(events) {
    const width = 960, height = 200, left = 40, right = 8, top = 8, bottom = 20;
    const root = svg("svg", { viewBox: "0 0 " + width + " " + height, preserveAspectRatio: "none", role: "img" });
    const lines = {};
    let peak = 0;
    for (const s of SERIES) {
      lines[s.key] = bucketed(events.series[s.key]);
      if (!state.hidden.has(s.key)) peak = Math.max(peak, ...lines[s.key]);
    }
    const yMax = 4 * niceCeiling(peak / 4);
    const plotW = width - left - right, plotH = height - top - bottom;
    for (let i = 0; i <= 4; i++) {
      const y = top + plotH - (plotH * i) / 4;
      root.appendChild(svg("line", { x1: left, x2: width - right, y1: y, y2: y, class: "grid" }));
      root.appendChild(svg("text", { x: left - 6, y: y + 4, "text-anchor": "end", class: "axis-label" },
        formatRate((yMax * i) / 4)));
    }
    const span = events.seconds;
    const marks = span >= 600 ? [600, 300, 0] : [span, Math.round(span / 2), 0];
    for (const ago of marks) {
      const x = left + plotW * (1 - ago / span);
      const anchor = ago === 0 ? "end" : (ago === span ? "start" : "middle");
      root.appendChild(svg("text", { x: x, y: height - 4, "text-anchor": anchor, class: "axis-label" },
        ago === 0 ? "now" : "-" + shortAgo(ago)));
    }
    for (const s of SERIES) {
      if (state.hidden.has(s.key)) continue;
      const values = lines[s.key];
      const n = values.length;
      const points = values.map(function (v, i) {
        const x = left + (n <= 1 ? plotW : (plotW * i) / (n - 1));
        const y = top + plotH - (plotH * v) / yMax;
        return x.toFixed(1) + "," + y.toFixed(1);
      });
      root.appendChild(svg("polyline", {
        points: points.join(" "), class: "s-" + s.key, "vector-effect": "non-scaling-stroke",
      }));
    }
    const chart = $("chart");
    chart.replaceChildren(root);
  }

  function renderLegend() {
    const legend = $("legend");
    if (legend.childElementCount) return;
    for (const s of SERIES) {
      const item = el("li", { className: s.key, title: "show or hide" });
      item.appendChild(el("span", { className: "swatch" }));
      item.appendChild(el("span", null, s.key === "replay_status" ? "answers with the replay status" : s.label));
      item.addEventListener("click", function () {
        if (state.hidden.has(s.key)) state.hidden.delete(s.key);
        else state.hidden.add(s.key);
        item.classList.toggle("off", state.hidden.has(s.key));
      });
      legend.appendChild(item);
    }
  }

  function renderInstances(doc) {
    const body = $("instances").querySelector("tbody");
    const rows = [];
    const most = Math.max(1, doc.pins.max);
    for (const inst of doc.instances) {
      const row = el("tr", { "data-instance": inst.id, className: inst.local && doc.mode === "fly" ? "local" : "" });
      row.appendChild(el("td", { className: "id" }, inst.id));
      const stateCell = el("td");
      stateCell.appendChild(el("span", { className: "state " + inst.state, "data-state": inst.state }, inst.state));
      row.appendChild(stateCell);
      row.appendChild(el("td", { className: "region" }, inst.region || "–"));
      row.appendChild(el("td", { className: "weight" }, inst.weight));
      row.appendChild(el("td", { className: "pins num", "data-pins": inst.pins }, inst.pins));
      row.appendChild(el("td", { className: "sessions num", "data-sessions": inst.sessions }, inst.sessions));
      const barCell = el("td", { className: "barcol" });
      const bar = el("div", { className: "bar", title: inst.pins + " pins" });
      const fill = el("span");
      fill.style.width = ((100 * inst.pins) / most).toFixed(1) + "%";
      bar.appendChild(fill);
      barCell.appendChild(bar);
      row.appendChild(barCell);
      rows.push(row);
    }
    body.replaceChildren(...rows);
    const balance = doc.pins.mean > 0 ? (doc.pins.max / doc.pins.mean).toFixed(2) : "–";
    const live = doc.sessions.balance === null ? "–" : doc.sessions.balance.toFixed(2);
    setText("pin-summary", doc.pins.total + " pins · max/mean " + balance + " · " + doc.sessions.total +
      " live sessions · max/mean " + live + (doc.pins.live ? "" : " · last known (store down)"));
  }

  function renderRepins(events) {
    const list = events.recent_repins;
    $("repins-empty").hidden = list.length > 0;
    $("repins").hidden = list.length === 0;
    const rows = list.map(function (r) {
      const row = el("tr", { "data-reason": r.reason });
      const ago = Math.max(0, events.now - r.at);
      row.appendChild(el("td", { title: formatDuration(ago) + " ago" }, new Date(r.at * 1000).toLocaleTimeString()));
      row.appendChild(el("td", null, r.from || "–"));
      row.appendChild(el("td", null, r.instance));
      const reasonCell = el("td", { title: REPIN_WORDS[r.reason] || "" });
      reasonCell.appendChild(el("span", { className: "reason" }, r.reason));
      row.appendChild(reasonCell);
      return row;
    });
    $("repins").querySelector("tbody").replaceChildren(...rows);
  }

  async function refresh() {
    try {
      const doc = await getJSON("dashboard/data");
      state.replayStatus = doc.replay_status;
      state.lastOk = Date.now();
      renderHeader(doc);
      renderRates(doc.events);
      renderLegend();
      renderChart(doc.events);
      renderInstances(doc);
      renderRepins(doc.events);
      document.body.setAttribute("data-loaded", "true");
      showError(null);
    } catch (err) {
      showError(err.message || String(err));
      if (err.fatal) return; // a token problem does not fix itself: stop polling
    }
    window.setTimeout(refresh, REFRESH_MS);
  }

  function explain(doc) {
    const user = doc.user_key;
    const d = doc.decision || {};
    const pin = doc.pin;
    const where = d.instance;
    let words;
    if (d.action === "refuse") {
      words = "No instance can serve " + (user ? "user " + user : "this request") +
        " right now: the proxy answers 503 with Retry-After.";
    } else if (d.reason === "pin") {
      words = "User " + user + " is pinned to " + where + "; requests go to " + where + ". The pin expires in " +
        formatDuration(pin ? pin.expires_in : 0) + " and every visit extends it.";
    } else if (d.reason === "hash") {
      words = "User " + user + " has no pin yet. The consistent hash picks " + where +
        "; the first request will pin the user there.";
    } else if (d.reason === "repin") {
      const from = pin ? pin.instance : "its old instance";
      words = "User " + user + " was pinned to " + from + ", but " + (REPIN_WORDS[d.repin_reason] || d.repin_reason) +
        ". The next request re-pins the user to " + where + " without an error.";
    } else if (d.reason === "cookie") {
      words = "The affinity cookie names " + where + "; requests go there.";
    } else if (d.reason === "new") {
      words = "An anonymous request: a fresh session would be hashed to " + where + ".";
    } else if (d.reason === "force") {
      words = "The fly-force-instance-id header sends this request to " + where + ".";
    } else {
      words = "Decision: " + (d.action || "?") + " to " + (where || "nothing") + " (" + (d.reason || "?") + ").";
    }
    if (doc.mode === "fly" && where && doc.instance && where !== doc.instance) {
      words += " This node (" + doc.instance + ") would answer with fly-replay to " + where + ".";
    }
    if (doc.store && !doc.store.ok) {
      words += " The pin store is unreachable, so this is the ring's choice and nothing is stored.";
    }
    return words;
  }

  async function runCheck(event) {
    event.preventDefault();
    const user = $("check-user").value.trim();
    if (!user) return;
    const result = $("check-result");
    result.textContent = "Checking " + user + "…";
    try {
      const doc = await getJSON("session-check?userId=" + encodeURIComponent(user));
      result.textContent = explain(doc);
      result.className = "check-result";
      result.setAttribute("data-decision", (doc.decision && doc.decision.instance) || "");
      $("check-json").textContent = JSON.stringify(doc, null, 2);
      $("check-details").hidden = false;
    } catch (err) {
      result.textContent = "Session check failed: " + (err.message || String(err));
      $("check-details").hidden = true;
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    $("check-form").addEventListener("submit", runCheck);
    const preset = new URLSearchParams(window.location.search).get("userId");
    if (preset) {
      $("check-user").value = preset;
      $("check-form").requestSubmit();
    }
    refresh();
  });
})();
