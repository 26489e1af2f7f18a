// The esf dashboard: plain JavaScript against the admin API (/api/...).
// The token is asked once and kept in this tab's sessionStorage; every
// request sends it as "Authorization: Bearer ...".  A server started
// without a token only reads: the page asks for none, and its Kick buttons
// are disabled.  Text from the server (user IDs, addresses) is only ever
// set as textContent.
"use strict";

const KINDS = ["dotnet", "silverlight", "windows_phone", "websocket", "ios", "android",
               "xamarin", "websocket_ssl", "others"];
const INFO_EVERY_MS = 2000;
const SESSIONS_EVERY_MS = 5000;
const CHART_POINTS = 600;
const PAGE = 50;

const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem("esf-token"), offset: 0, history: [],
                timers: [], kicking: null, readOnly: false };
const READ_ONLY = "read-only: the server was started without --admin-token-file";

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({ "Accept": "application/json" }, options.headers || {});
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  if (response.status === 401) throw new Unauthorized();
  if (!(response.headers.get("Content-Type") || "").startsWith("application/json")) {
    throw new Error(`${path}: HTTP ${response.status} ${response.statusText}`);
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.message || response.statusText);
  return body;
}

function status(text, isError) {
  const element = $("status");
  element.textContent = text;
  element.className = isError ? "error" : "";
}

function askToken(message) {
  // Both refreshes may be refused at once: the first one to ask says why.
  if (!$("login").hidden) return;
  state.timers.forEach(clearInterval);
  state.timers = [];
  $("server").textContent = "signed out: the admin API asks for its token";
  sessionStorage.removeItem("esf-token");
  state.token = null;
  $("main").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").focus();
}

function failed(error) {
  if (error instanceof Unauthorized) askToken(state.token ? "That token was refused." : "");
  else status(String(error.message || error), true);
}

function when(seconds, now) {
  if (seconds === null || seconds === undefined) return "";
  const ago = Math.max(0, Math.round(now - seconds));
  const clock = new Date(seconds * 1000).toLocaleTimeString();
  return ago < 120 ? `${clock} (${ago} s ago)` : `${clock} (${Math.round(ago / 60)} min ago)`;
}

// -- online count over time ---------------------------------------------------

async function refreshInfo() {
  try {
    const info = await api("/api/info");
    state.now = info.now;
    $("server").textContent =
      `esf ${info.version} · node ${info.node} · up ${Math.round(info.uptime_seconds)} s`;
    $("users-online").textContent = info.users_online;
    $("devices-online").textContent = info.devices_online;
    $("connections").textContent = info.connections;
    if (info.read_only !== state.readOnly) {
      state.readOnly = info.read_only;
      $("read-only").hidden = !state.readOnly;
      document.querySelectorAll("button.kick").forEach(readOnlyButton);
    }
    state.history.push({ t: info.now, users: info.users_online, devices: info.devices_online });
    if (state.history.length > CHART_POINTS) state.history.shift();
    drawChart();
    if (info.stopping) status("the server is shutting down", true);
  } catch (error) { failed(error); }
}

// The top of the chart's scale: an even number (so that its middle is a
// whole count too) of the form 2, 4, 6, 8 times a power of ten, with room
// above the peak so that its line is not cut by the edge.
function scaleTop(peak) {
  const want = Math.max(2, peak * 1.1);
  for (let power = 1; ; power *= 10) {
    for (const step of [2, 4, 6, 8, 10]) {
      if (step * power >= want) return step * power;
    }
  }
}

function axisLabel(text, property, fraction) {
  const label = document.createElement("span");
  label.textContent = text;
  label.style[property] = `${(fraction * 100).toFixed(2)}%`;
  return label;
}

function drawChart() {
  const points = state.history;
  if (!points.length) return;
  const peak = Math.max(...points.map((p) => Math.max(p.users, p.devices)));
  const top = scaleTop(peak);
  const t0 = points[0].t;
  const t1 = points[points.length - 1].t;
  const span = Math.max(1, t1 - t0);
  const x = (p) => ((p.t - t0) / span * 600).toFixed(1);
  // (4 units of room at the bottom and top: a line at 0 or at the top is
  // not cut in half by the edge.)
  const y = (value) => (4 + (1 - value / top) * 142).toFixed(1);
  // Steps: a count holds until the next sample.
  const line = (key) => points
    .map((p, i) => (i ? `${x(p)},${y(points[i - 1][key])} ` : "") + `${x(p)},${y(p[key])}`)
    .join(" ");
  $("chart-users").setAttribute("points", line("users"));
  $("chart-devices").setAttribute("points", line("devices"));
  // Axes: counts at the bottom, middle and top, times at both ends and
  // the middle, with the grid lines of the counts.
  const counts = [0, top / 2, top];
  $("y-axis").replaceChildren(...counts.map((v) => axisLabel(String(v), "top", y(v) / 150)));
  const time = (t) => new Date(t * 1000).toLocaleTimeString();
  $("x-axis").replaceChildren(
    ...[0, 0.5, 1].map((f) => axisLabel(time(t0 + f * (t1 - t0)), "left", f)));
  $("grid").replaceChildren(...counts.slice(1, 2).map((v) => {
    const grid = document.createElementNS("http://www.w3.org/2000/svg", "line");
    grid.setAttribute("x1", "0");
    grid.setAttribute("x2", "600");
    grid.setAttribute("y1", y(v));
    grid.setAttribute("y2", y(v));
    return grid;
  }));
  $("chart-span").textContent = Math.round(t1 - t0);
  $("chart-peak").textContent = peak;
}

// -- sessions ------------------------------------------------------------------------

async function refreshSessions() {
  const query = new URLSearchParams({ offset: state.offset, limit: PAGE });
  if ($("search").value) query.set("user_prefix", $("search").value);
  if ($("address").value) query.set("address", $("address").value);
  if ($("kind").value) query.set("kind", $("kind").value);
  try {
    const page = await api("/api/sessions?" + query);
    const now = state.now || Date.now() / 1000;
    const rows = page.sessions.map((s) => {
      const row = document.createElement("tr");
      row.dataset.user = s.user_id;
      row.dataset.kind = s.client_type;
      const cells = [[s.user_id, "user"], [s.kind, "kind"], [s.address, "address"],
                     [when(s.logon_time, now), "logon"], [when(s.last_active, now), "active"]];
      for (const [text, name] of cells) {
        const cell = document.createElement("td");
        cell.className = name;
        cell.textContent = text;
        row.append(cell);
      }
      const button = document.createElement("button");
      button.type = "button";
      button.className = "kick";
      button.textContent = "Kick";
      readOnlyButton(button);
      button.addEventListener("click", () => openKick(s));
      const cell = document.createElement("td");
      cell.append(button);
      row.append(cell);
      return row;
    });
    document.querySelector("#sessions tbody").replaceChildren(...rows);
    const last = Math.min(page.offset + page.sessions.length, page.total);
    $("total").textContent = page.total
      ? `${page.offset + 1}–${last} of ${page.total}` : "none match";
    $("prev").disabled = page.offset === 0;
    $("next").disabled = last >= page.total;
  } catch (error) { failed(error); }
}

function readOnlyButton(button) {
  button.disabled = state.readOnly;
  button.title = state.readOnly ? READ_ONLY : "";
}

function openKick(session) {
  state.kicking = session;
  $("kick-target").textContent = `${session.user_id} (${session.kind})`;
  $("kick-reason").value = "";
  $("kick-dialog").showModal();
  $("kick-reason").focus();
}

async function kick() {
  const s = state.kicking;
  state.kicking = null;
  if (!s) return;
  const path = `/api/users/${encodeURIComponent(s.user_id)}/devices/${s.client_type}/kick`;
  try {
    const result = await api(path, { method: "POST",
                                     body: JSON.stringify({ reason: $("kick-reason").value }) });
    status(`kicked ${result.user_id}: ${result.kicked} device(s)`);
  } catch (error) { failed(error); }
  refreshSessions();
  refreshInfo();
}

// -- start -----------------------------------------------------------------------------

async function loadHistory() {
  try {
    const history = await api("/api/history");
    state.history = history.samples.map(([t, users, devices]) => ({ t, users, devices }));
  } catch (error) { failed(error); }
  refreshInfo();
}

function start() {
  $("login").hidden = true;
  $("main").hidden = false;
  state.history = [];
  loadHistory();
  refreshSessions();
  state.timers = [setInterval(refreshInfo, INFO_EVERY_MS),
                  setInterval(refreshSessions, SESSIONS_EVERY_MS)];
}

document.addEventListener("DOMContentLoaded", () => {
  for (const [value, name] of KINDS.entries()) {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = name;
    $("kind").append(option);
  }
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem("esf-token", state.token);
    $("token").value = "";
    start();
  });
  let typing = null;
  for (const id of ["search", "address", "kind"]) {
    $(id).addEventListener("input", () => {
      clearTimeout(typing);
      state.offset = 0;
      typing = setTimeout(refreshSessions, 250);
    });
  }
  $("filters").addEventListener("submit", (event) => event.preventDefault());
  $("prev").addEventListener("click", () => {
    state.offset = Math.max(0, state.offset - PAGE);
    refreshSessions();
  });
  $("next").addEventListener("click", () => { state.offset += PAGE; refreshSessions(); });
  $("kick-cancel").addEventListener("click", () => {
    state.kicking = null;
    $("kick-dialog").close();
  });
  $("kick-form").addEventListener("submit", () => { kick(); });
  start();
});
