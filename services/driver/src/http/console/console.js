// The console: plain script over the driver's HTTP API. Everything the agents wrote is put in
// the page as text (textContent), never as markup.
"use strict";

const KEY_STORE = "claudecluster.key";
const state = {
  key: localStorage.getItem(KEY_STORE) || "",
  selected: null,
  tailToken: "",
  progress: null,
  stats: null,
  session: null,
};
const $ = (selector) => document.querySelector(selector);

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (className) td.className = className;
  td.title = td.textContent;
  row.appendChild(td);
  return td;
}

function setConnection(text, isError) {
  const el = $("#connection");
  el.textContent = text;
  el.className = isError ? "error" : "muted";
}

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  const answer = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await answer.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!answer.ok) {
    throw new Error((data && data.message) || answer.status + " " + answer.statusText);
  }
  return data;
}

// Browsers cannot set headers on a WebSocket: the key goes in the query.
function socketUrl(path, params) {
  const url = new URL(path, location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  if (state.key) url.searchParams.set("key", state.key);
  for (const [name, value] of Object.entries(params || {})) url.searchParams.set(name, value);
  return url.toString();
}

// Ids the driver makes are long; the start tells them apart, the tooltip has it whole.
function short(id) {
  return id.length > 12 ? id.slice(0, 8) : id;
}

function money(usd) {
  return usd ? "$" + Number(usd).toFixed(4) : "";
}

// --- cluster: workers and queue, live over /ws/stats ---

function renderStats(stats) {
  const body = $("#workers tbody");
  body.replaceChildren();
  for (const worker of stats.workers) {
    const row = document.createElement("tr");
    row.dataset.worker = worker.id;
    cell(row, worker.id);
    cell(row, worker.capabilities.modes.join(", "));
    cell(row, worker.health.status + (worker.health.reason ? ": " + worker.health.reason : ""),
      worker.health.healthy ? "" : "s-unhealthy");
    cell(row, worker.load + " / " + worker.capacity);
    cell(row, worker.drained ? "drained" : worker.draining ? "draining" : "no");
    body.appendChild(row);
  }
  const queue = $("#queue");
  queue.replaceChildren();
  for (const priority of ["critical", "high", "normal", "low"]) {
    const item = document.createElement("li");
    item.textContent = priority + ": " + (stats.queuedByPriority[priority] || 0);
    queue.appendChild(item);
  }
  $("#counts").textContent =
    stats.totalTasks + " tasks: " + stats.pendingTasks + " pending, " + stats.runningTasks +
    " running, " + stats.completedTasks + " completed, " + stats.failedTasks + " failed, " +
    stats.cancelledTasks + " cancelled; " + stats.queuedTasks + " queued";
}

function watchStats() {
  if (state.stats) state.stats.close();
  const socket = new WebSocket(socketUrl("ws/stats"));
  state.stats = socket;
  socket.onopen = () => setConnection("connected", false);
  socket.onmessage = (message) => {
    const frame = JSON.parse(message.data);
    if (frame.type === "stats") renderStats(frame.data);
    if (frame.type === "error") setConnection(frame.data.message, true);
  };
  socket.onclose = () => {
    if (state.stats !== socket) return;
    setConnection("disconnected; retrying…", true);
    setTimeout(watchStats, 2000);
  };
}

// --- tasks ---

// Tasks come oldest first: the newest are on the last pages. The page before the last is
// remembered, so that a refresh reads two pages, not the whole history.
async function newestTasks() {
  let token = state.tailToken || "";
  let previous = token;
  let earlier = [];
  let latest = [];
  for (let pages = 0; pages < 100; pages++) {
    const page = await api("GET", "tasks?limit=500" + (token ? "&pageToken=" + encodeURIComponent(token) : ""));
    earlier = latest;
    latest = page.tasks;
    if (!page.nextPageToken) break;
    previous = token;
    token = page.nextPageToken;
  }
  state.tailToken = previous;
  return earlier.concat(latest).slice(-200);
}

async function refreshTasks() {
  let tasks;
  try {
    tasks = await newestTasks();
  } catch (error) {
    state.tailToken = "";
    setConnection(error.message, true);
    return;
  }
  const body = $("#tasks tbody");
  body.replaceChildren();
  for (const task of tasks.reverse()) {
    const row = document.createElement("tr");
    row.dataset.task = task.clusterTaskId;
    if (task.clusterTaskId === state.selected) row.className = "selected";
    cell(row, short(task.id)).title = task.id;
    cell(row, task.title);
    cell(row, task.status, "status s-" + task.status);
    cell(row, money(task.costUsd));
    cell(row, task.assignedWorkerId || "");
    const actions = cell(row, "");
    if (task.status === "pending" || task.status === "running") {
      const cancel = document.createElement("button");
      cancel.textContent = "Cancel";
      cancel.className = "cancel";
      cancel.onclick = async (event) => {
        event.stopPropagation();
        cancel.disabled = true;
        try { await api("POST", "tasks/" + encodeURIComponent(task.clusterTaskId) + "/cancel", {}); }
        catch (error) { setConnection(error.message, true); }
        refreshTasks();
      };
      actions.appendChild(cancel);
    }
    row.onclick = () => select(task.clusterTaskId, task.title, task.status);
    body.appendChild(row);
  }
}

function describe(event) {
  switch (event.kind) {
    case "text": return (event.thinking ? "(thinking) " : "") + event.text;
    case "toolUse": return "→ " + event.tool + " " + (event.input || "");
    case "toolResult": return (event.isError ? "← error: " : "← ") + (event.text || "");
    case "status":
    case "sessionState": return "[" + event.status + "]" + (event.reason ? " " + event.reason : "");
    case "init": return "started (" + (event.model || "model") + ")";
    case "result": return "= " + (event.subtype || "done") + (event.costUsd ? ", " + money(event.costUsd) : "");
    case "permissionDenied": return "denied: " + event.tool + " " + (event.text || "");
    case "output": return event.subtype + ": " + event.text;
    default: return event.kind + (event.subtype ? " " + event.subtype : "") + (event.text ? ": " + event.text : "");
  }
}

function appendEvent(container, event) {
  const line = document.createElement("div");
  line.className = "ev ev-" + event.kind;
  line.dataset.sequence = event.sequence;
  line.textContent = describe(event);
  container.appendChild(line);
  container.scrollTop = container.scrollHeight;
}

function setLiveStatus(status) {
  const el = $("#live-status");
  el.textContent = status;
  el.className = "status s-" + status;
}

function select(taskId, title, status) {
  if (state.progress) state.progress.close();
  state.selected = taskId;
  for (const row of document.querySelectorAll("#tasks tbody tr")) {
    row.className = row.dataset.task === taskId ? "selected" : "";
  }
  $("#live-task").textContent = title ? taskId + " — " + title : taskId;
  setLiveStatus(status || "");
  const events = $("#events");
  events.replaceChildren();
  let last = 0;
  const open = () => {
    const socket = new WebSocket(socketUrl("ws/tasks/" + encodeURIComponent(taskId) + "/progress", { after: last }));
    state.progress = socket;
    let ended = false;
    socket.onmessage = (message) => {
      const frame = JSON.parse(message.data);
      if (frame.type === "progress") {
        last = frame.data.sequence;
        appendEvent(events, frame.data);
        if (frame.data.kind === "status" && frame.data.status !== "assigned") setLiveStatus(frame.data.status);
      } else if (frame.type === "completed") {
        ended = true;
        setLiveStatus("completed");
      } else if (frame.type === "failed") {
        ended = true;
        setLiveStatus(frame.data.status);
      }
    };
    // The stream resumes after the last event seen when the driver went away.
    socket.onclose = () => {
      if (!ended && state.progress === socket) setTimeout(open, 1000);
    };
  };
  open();
}

async function submit(event) {
  event.preventDefault();
  $("#submit-error").textContent = "";
  const tools = $("#tools").value.split(",").map((tool) => tool.trim()).filter(Boolean);
  try {
    const answer = await api("POST", "tasks", {
      task: $("#prompt").value,
      priority: $("#priority").value,
      allowedTools: tools,
    });
    $("#prompt").value = "";
    select(answer.task.clusterTaskId, answer.task.title, answer.status);
    refreshTasks();
  } catch (error) {
    $("#submit-error").textContent = error.message;
  }
}

// --- sessions ---

async function refreshSessions() {
  let list;
  try {
    list = await api("GET", "sessions?limit=100");
  } catch (error) {
    // A key without the `sessions` scope sees no sessions; the rest works.
    $("#sessions tbody").replaceChildren();
    return;
  }
  const body = $("#sessions tbody");
  body.replaceChildren();
  for (const session of list.sessions) {
    const row = document.createElement("tr");
    row.dataset.session = session.id;
    cell(row, short(session.id)).title = session.id;
    cell(row, session.state);
    cell(row, session.turns);
    cell(row, money(session.costUsd));
    cell(row, session.workerId);
    row.onclick = () => showSession(session.id);
    body.appendChild(row);
  }
  if (state.session) showSession(state.session);
}

async function showSession(sessionId) {
  state.session = sessionId;
  const container = $("#conversation");
  let detail;
  try {
    detail = await api("GET", "sessions/" + encodeURIComponent(sessionId));
  } catch (error) {
    container.textContent = error.message;
    return;
  }
  container.replaceChildren();
  let turn = -1;
  for (const event of detail.events) {
    if ((event.turn || 0) !== turn) {
      turn = event.turn || 0;
      const header = document.createElement("div");
      header.className = "turn";
      header.textContent = turn ? "message " + turn : "session";
      container.appendChild(header);
    }
    appendEvent(container, event);
  }
}

// --- start ---

$("#key").value = state.key;
$("#key-form").onsubmit = (event) => {
  event.preventDefault();
  state.key = $("#key").value.trim();
  localStorage.setItem(KEY_STORE, state.key);
  state.tailToken = "";
  watchStats();
  refreshTasks();
  refreshSessions();
};
$("#submit-form").onsubmit = submit;
watchStats();
refreshTasks();
refreshSessions();
setInterval(refreshTasks, 2000);
setInterval(refreshSessions, 5000);
