// The tasknet operator dashboard: polls this node's JSON endpoints about once a second and
// fills index.html. Plain browser JS, no build step, no library; the chart is hand-drawn SVG.
// Every figure gets its formatted text and, in data-value, the raw value from the API (what
// the browser test compares). Nothing is fetched from anywhere but this node.
"use strict";

const POLL_MS = 1000;
const CHART_ROUNDS = 20; // rounds shown in the chart and the rounds table
const SVG_NS = "http://www.w3.org/2000/svg";
const settledRounds = new Map(); // "task/round" -> round view that will not change any more

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store", headers: { accept: "application/json" } });
  if (!response.ok) {
    const error = new Error(`${path}: HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return response.json();
}

function el(id) { return document.getElementById(id); }

function show(id, value, text) {
  const node = el(id);
  const raw = value === null || value === undefined ? "" : String(value);
  node.dataset.value = raw;
  node.textContent = text !== undefined ? text : (raw === "" ? "–" : raw);
}

function cell(row, value, className, text) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.dataset.value = value === null || value === undefined ? "" : String(value);
  td.textContent = text !== undefined ? text : (td.dataset.value || "–");
  row.appendChild(td);
  return td;
}

function short(peer) { return peer.length > 16 ? `${peer.slice(0, 8)}…${peer.slice(-6)}` : peer; }

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  const s = Math.round(seconds);
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function replaceRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

// -- this node and its members ----------------------------------------------------------------
function renderNode(status) {
  show("node-peer-id", status.peer_id);
  show("node-network", status.network);
  show("node-uptime", status.uptime_s, duration(status.uptime_s));
  const proc = status.process || {};
  show("node-cpu", proc.cpu_s, proc.cpu_s === undefined ? "–" : `${proc.cpu_s} s`);
  show("node-rss", proc.rss_mb, proc.rss_mb === undefined ? "–" : `${proc.rss_mb} MB`);
  show("node-connected", status.connected_peers.length);
  show("node-incarnation", status.incarnation);
}

function renderMembers(status) {
  const counts = { alive: 0, suspect: 0, dead: 0 };
  const rows = status.members.map((member) => {
    counts[member.state] = (counts[member.state] || 0) + 1;
    const row = document.createElement("tr");
    row.dataset.peer = member.peer_id;
    row.dataset.state = member.state;
    const me = member.peer_id === status.peer_id;
    cell(row, member.peer_id, "peer", short(member.peer_id) + (me ? " (this node)" : ""));
    const state = cell(row, member.state, "state", member.left ? `${member.state} (left)` : member.state);
    state.dataset.state = member.state;
    cell(row, member.incarnation, "num");
    cell(row, member.last_seen_s_ago, "num", me ? "–" : duration(member.last_seen_s_ago));
    return row;
  });
  replaceRows(el("members-rows"), rows);
  show("members-alive", counts.alive);
  show("members-suspect", counts.suspect);
  show("members-dead", counts.dead);
}

// -- ring and store -----------------------------------------------------------------------------
function renderStore(kv, partitions, states) {
  el("store").hidden = false;
  show("kv-keys", kv.keys);
  show("kv-partitions-owned", kv.partitions_owned, `${kv.partitions_owned} of ${kv.partitions}`);
  show("kv-copies", kv.copies);
  show("kv-backlog", kv.replication_backlog);
  show("kv-read-repairs", kv.metrics.read_repairs);
  const ae = kv.anti_entropy;
  show("kv-ae-oldest", ae.oldest_s_ago, duration(ae.oldest_s_ago));
  show("kv-ae-newest", ae.newest_s_ago, duration(ae.newest_s_ago));
  const handoff = kv.handoff || {}; // {} when nothing is being handed off
  const handingOff = handoff.partitions_left !== undefined;
  show("kv-handoff", handingOff ? handoff.partitions_left : 0, handingOff
    ? `${handoff.partitions_left} partitions left, ${handoff.keys_sent} keys sent` : "none");
  const warning = el("kv-warning");
  warning.hidden = !kv.warning;
  warning.textContent = kv.warning || "";
  // keys in this node's partitions, by the ring member that replicates them
  const keysWith = {};
  for (const row of (partitions ? partitions.partitions : [])) {
    for (const peer of row.replicas) keysWith[peer] = (keysWith[peer] || 0) + row.keys;
  }
  const ring = partitions && partitions.ring ? partitions.ring : {};
  const peers = Object.keys(ring).sort();
  const rows = peers.map((peer) => {
    const row = document.createElement("tr");
    row.dataset.peer = peer;
    row.dataset.state = states[peer] || "";
    cell(row, peer, "peer", short(peer));
    cell(row, ring[peer].partitions, "num");
    cell(row, ring[peer].primary, "num");
    cell(row, keysWith[peer] || 0, "num");
    cell(row, (kv.hints_pending || {})[peer] || 0, "num");
    return row;
  });
  replaceRows(el("ring-rows"), rows);
}

// -- tasks ---------------------------------------------------------------------------------------
async function roundView(taskId, round, current) {
  const key = `${taskId}/${round}`;
  if (settledRounds.has(key)) return settledRounds.get(key);
  const view = await getJson(`/tasks/${encodeURIComponent(taskId)}/rounds/${round}`);
  // a round is final once paid and claimed where it will be; well past its audits it is too
  if ((view.settled && view.paid && view.claimable === 0) || round < current - 8) {
    settledRounds.set(key, view);
  }
  return view;
}

function distributionText(view) {
  if (!view.settled) return "pending";
  const accepted = view.attempts.find((a) => a.status === "accepted");
  if (accepted) return `${accepted.total} by ${short(accepted.distributor)}`;
  return view.attempts.length ? `${view.attempts.length} attempt(s), none accepted` : "none yet";
}

// one figure per task, kept across polls (keyed by task id), dropped when its task is gone
function chartFor(taskId) {
  const charts = el("charts");
  let figure = [...charts.children].find((f) => f.dataset.task === taskId);
  if (!figure) {
    figure = document.createElement("figure");
    figure.dataset.task = taskId;
    const caption = document.createElement("figcaption");
    caption.textContent = taskId;
    const svg = document.createElementNS(SVG_NS, "svg");
    svg.setAttribute("class", "rewards-chart");
    svg.setAttribute("viewBox", "0 0 600 160");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", `this node's reward per round in task ${taskId}`);
    figure.append(caption, svg);
    charts.appendChild(figure);
  }
  return figure.querySelector("svg");
}

function renderCharts(tasks, running) {
  const ids = new Set(tasks.map((task) => task.task_id));
  for (const figure of [...el("charts").children]) {
    if (!ids.has(figure.dataset.task)) figure.remove();
  }
  for (const task of tasks) {
    renderChart(chartFor(task.task_id), (running[task.task_id] || {}).rewards_by_round || {}, task.round);
  }
}

function renderChart(svg, rewards, current) {
  const last = current === null ? 0 : current;
  const first = Math.max(0, last - CHART_ROUNDS + 1);
  const rounds = [];
  for (let r = first; r <= last; r += 1) rounds.push(r);
  const max = Math.max(1, ...rounds.map((r) => rewards[r] || 0));
  const width = 600, height = 160, left = 40, bottom = 20, top = 10;
  const step = (width - left) / CHART_ROUNDS;
  const parts = [];
  const axis = document.createElementNS(SVG_NS, "line");
  for (const [k, v] of Object.entries({ x1: left, y1: height - bottom, x2: width, y2: height - bottom })) {
    axis.setAttribute(k, v);
  }
  axis.setAttribute("class", "axis");
  parts.push(axis);
  const label = document.createElementNS(SVG_NS, "text");
  label.setAttribute("x", 2);
  label.setAttribute("y", top + 8);
  label.textContent = String(max);
  parts.push(label);
  rounds.forEach((r, i) => {
    const value = rewards[r] || 0;
    const h = ((height - bottom - top) * value) / max;
    const bar = document.createElementNS(SVG_NS, "rect");
    bar.setAttribute("class", "bar");
    bar.setAttribute("x", left + i * step + 2);
    bar.setAttribute("y", height - bottom - h);
    bar.setAttribute("width", Math.max(1, step - 4));
    bar.setAttribute("height", h);
    bar.dataset.round = String(r);
    bar.dataset.value = String(value);
    const title = document.createElementNS(SVG_NS, "title");
    title.textContent = `round ${r}: ${value}`;
    bar.appendChild(title);
    parts.push(bar);
    if (i % 5 === 0) {
      const tick = document.createElementNS(SVG_NS, "text");
      tick.setAttribute("x", left + i * step);
      tick.setAttribute("y", height - 6);
      tick.textContent = String(r);
      parts.push(tick);
    }
  });
  svg.replaceChildren(...parts);
}

async function renderRounds(taskId, current, rewards) {
  show("rounds-task", taskId);
  if (current === null) {
    replaceRows(el("round-rows"), []);
    return;
  }
  const wanted = [];
  for (let r = current; r >= Math.max(0, current - CHART_ROUNDS + 1); r -= 1) wanted.push(r);
  const views = await Promise.all(wanted.map((r) => roundView(taskId, r, current).catch(() => null)));
  const rows = [];
  wanted.forEach((r, i) => {
    const view = views[i];
    if (!view) return;
    const row = document.createElement("tr");
    row.dataset.round = String(r);
    cell(row, r, "num");
    cell(row, Object.keys(view.submissions).length, "num");
    cell(row, view.rejected === null ? "" : view.rejected.length, "num",
      view.rejected === null ? "pending" : String(view.rejected.length));
    const slashed = view.slashed ? Object.values(view.slashed).reduce((a, b) => a + b, 0) : 0;
    cell(row, slashed, "num");
    cell(row, view.accepted_attempt, "", distributionText(view));
    const reward = cell(row, rewards[r] || 0, "num reward");
    reward.dataset.round = String(r);
    rows.push(row);
  });
  replaceRows(el("round-rows"), rows);
}

async function renderTasks(tasksStatus) {
  const section = el("tasks");
  section.hidden = false;
  const note = el("tasks-note");
  if (!tasksStatus.chain || !tasksStatus.chain.connected) {
    note.hidden = false;
    note.textContent = `chain not connected${tasksStatus.chain && tasksStatus.chain.error ? `: ${tasksStatus.chain.error}` : ""}`;
    return;
  }
  const [listing, wallet] = await Promise.all([getJson("/tasks"), getJson("/wallet")]);
  const waiting = Object.entries(tasksStatus.waiting || {}).concat(Object.entries(tasksStatus.not_run || {}));
  note.hidden = waiting.length === 0;
  note.textContent = waiting.map(([task, why]) => `${task}: ${why}`).join("; ");
  show("wallet-account", wallet.account);
  show("wallet-balance", wallet.balance);
  show("wallet-staked", Object.values(wallet.stakes).reduce((a, b) => a + b, 0));
  show("wallet-rewards", Object.values(wallet.rewards_claimed).reduce((a, b) => a + b, 0));
  show("wallet-claimable", Object.values(wallet.claimable).reduce((a, b) => a + b, 0));
  const running = tasksStatus.tasks || {};
  const rows = listing.tasks.map((task) => {
    const mine = running[task.task_id] || { metrics: {} };
    const row = document.createElement("tr");
    row.dataset.task = task.task_id;
    cell(row, task.task_id, "", task.name === task.task_id ? task.task_id : `${task.task_id} (${task.name})`);
    cell(row, task.round, "num");
    cell(row, task.window);
    cell(row, task.my_stake, "num");
    cell(row, task.pool, "num");
    cell(row, mine.metrics.submissions, "num");
    const audit = task.last_audit;
    cell(row, audit ? audit.round : "", "", audit
      ? `round ${audit.round}: ${audit.valid} of ${audit.audited} valid` : "–");
    cell(row, mine.metrics.distributions, "num");
    cell(row, task.rewards_claimed, "num reward-total");
    cell(row, task.claimable, "num claimable");
    return row;
  });
  replaceRows(el("task-rows"), rows);
  renderCharts(listing.tasks, running);
  // the rounds table follows the first task this node runs
  const chosen = listing.tasks.find((task) => task.running);
  if (!chosen) return;
  const rewards = (running[chosen.task_id] || {}).rewards_by_round || {};
  await renderRounds(chosen.task_id, chosen.round, rewards);
}

// -- the loop ------------------------------------------------------------------------------------
async function refresh() {
  const status = await getJson("/status");
  renderNode(status);
  renderMembers(status);
  const states = Object.fromEntries(status.members.map((m) => [m.peer_id, m.state]));
  if (status.kv) {
    const partitions = await getJson("/kv-partitions").catch(() => null);
    renderStore(status.kv, partitions, states);
  }
  if (status.tasks) await renderTasks(status.tasks);
}

async function loop() {
  const connection = el("connection");
  try {
    await refresh();
    connection.dataset.state = "live";
    connection.textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    connection.dataset.state = "error";
    connection.textContent = `cannot reach the node: ${error.message}`;
  }
  setTimeout(loop, POLL_MS);
}

document.addEventListener("DOMContentLoaded", loop);
