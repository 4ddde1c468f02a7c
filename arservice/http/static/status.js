// The status page: polls GET /status and draws it. No framework, no build step.
// Every string from the service goes in with textContent: instances choose some of them.
"use strict";

const TOKEN_KEY = "arservice.token";
const POLL_MS = 1000;
let timer = null;

const $ = (id) => document.getElementById(id);

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

// A link may carry the token once, as #token=...: keep it for this tab and take it out of the address bar.
function tokenFromFragment() {
  const match = /^#token=(.+)$/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function askToken(message) {
  clearTimeout(timer);
  $("status").hidden = true;
  $("forget-token").hidden = true;
  $("token-form").hidden = false;
  $("token-error").textContent = message;
  $("token").focus();
}

function problem(message) {
  $("problem").textContent = message;
}

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(refresh, POLL_MS);
}

async function refresh() {
  const headers = token() ? { Authorization: "Bearer " + token() } : {};
  let response;
  try {
    response = await fetch("/status", { headers, cache: "no-store" });
  } catch (err) {
    problem("Cannot reach the service: " + err.message);
    return schedule();
  }
  if (response.status === 401) {
    const refused = Boolean(token());
    sessionStorage.removeItem(TOKEN_KEY);
    return askToken(refused ? "That token was refused." : "");
  }
  let body;
  try {
    body = await response.json();
  } catch (err) {
    problem("The service answered " + response.status + " with something that is not JSON.");
    return schedule();
  }
  if (!response.ok) {
    problem("The service answered " + response.status + ": " + ((body.error || {}).message || ""));
    return schedule();
  }
  problem("");
  $("token-form").hidden = true;
  $("status").hidden = false;
  $("forget-token").hidden = !token();
  render(body);
  schedule();
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  seconds = Math.max(0, seconds);
  if (seconds < 60) return seconds.toFixed(seconds < 10 ? 1 : 0) + " s";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min " + Math.floor(seconds % 60) + " s";
  return Math.floor(seconds / 3600) + " h " + Math.floor((seconds % 3600) / 60) + " min";
}

function ago(then, now) {
  return then ? duration(now - then) + " ago" : "never";
}

function amount(used, capacity) {
  return capacity === null || capacity === undefined ? String(used) : used + " / " + capacity;
}

// cells: strings, or nodes; key: a data- attribute naming the row (tests and people find rows by it).
function fillTable(id, rows, cells, key) {
  const body = $(id).tBodies[0];
  const fresh = document.createElement("tbody");
  for (const row of rows) {
    const tr = fresh.insertRow();
    if (key) tr.dataset[key.name] = key.value(row);
    for (const cell of cells(row)) {
      const td = tr.insertCell();
      if (cell instanceof Node) td.append(cell);
      else if (cell && typeof cell === "object") {
        td.textContent = cell.text;
        td.className = cell.className;
      } else td.textContent = cell === null || cell === undefined ? "" : String(cell);
    }
  }
  if (!rows.length) {
    const td = fresh.insertRow().insertCell();
    td.colSpan = $(id).tHead.rows[0].cells.length;
    td.className = "none";
    td.textContent = "none";
  }
  body.replaceWith(fresh);
}

function load(agent) {
  const meter = document.createElement("meter");
  meter.min = 0;
  meter.max = agent.capacity.instances || 1;
  meter.value = agent.used.instances;
  meter.title = agent.used.instances + " of " + (agent.capacity.instances ?? "unlimited") + " instances";
  return meter;
}

function render(s) {
  const now = s.time;
  const states = s.instances_by_state;
  const parts = [
    s.agents.length + (s.agents.length === 1 ? " agent" : " agents"),
    Object.entries(states).filter(([, n]) => n).map(([state, n]) => n + " " + state).join(", ") || "no instances",
    amount(s.used.instances, s.total.instances) + " instances used",
    s.waiting.starts + " starts waiting",
    "loop lag " + (s.loop_lag_s * 1000).toFixed(1) + " ms",
  ];
  $("summary").textContent = parts.join(" · ");
  $("updated").textContent = "updated " + new Date(now * 1000).toLocaleTimeString();

  fillTable("agents", s.agents, (a) => [
    a.agent_id, a.hostname, a.pid, a.slurm_job_id, a.env_types.join(", "), load(a),
    amount(a.used.instances, a.capacity.instances), amount(a.used.cpus, a.capacity.cpus),
    amount(a.used.memory, a.capacity.memory), duration(a.last_seen_s) + " ago",
    a.draining ? { text: "draining", className: "state-draining" } : "active",
  ], { name: "agentId", value: (a) => a.agent_id });

  const instances = [...s.instances].sort((a, b) => b.created - a.created);
  fillTable("instances", instances, (i) => [
    i.instance_id, i.type, { text: i.state, className: "state-" + i.state }, i.agent_id,
    duration(now - i.created), ago(i.last_command, now), i.commands,
  ], { name: "instanceId", value: (i) => i.instance_id });

  const runner = s.runner || {};
  $("slurm").hidden = runner.runner !== "slurm";
  if (runner.runner === "slurm") {
    $("slurm-summary").textContent = "job name " + runner.job_name + " on " + runner.submit_on + " · " +
      runner.submitted + " submitted, " + runner.lost + " lost, " + runner.released + " released · at most " +
      runner.max_jobs + " jobs, at least " + runner.min_jobs;
    fillTable("jobs", Array.isArray(runner.job_list) ? runner.job_list : [], (j) => [
      j.job_id, { text: j.cancelled ? j.state + " (cancelling)" : j.state, className: "state-" + j.state },
      j.agent_ids.join(", "), j.instances,
    ], { name: "jobId", value: (j) => j.job_id });
  }

  fillTable("errors", s.errors, (e) => [
    new Date(e.time * 1000).toLocaleTimeString(), e.request, e.code, e.instance_id,
    { text: e.message, className: "message" },
  ]);
}

document.addEventListener("DOMContentLoaded", () => {
  tokenFromFragment();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    refresh();
  });
  $("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    askToken("");
  });
  refresh();
});
