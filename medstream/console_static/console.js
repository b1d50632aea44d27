// medstream alert console: sign-in, a live alert list over server-sent events, filters,
// acknowledge/resolve, the patient timeline and feed health. Plain browser JavaScript
// (no build step); every value is inserted as text, never as HTML.
"use strict";

const TEXT = {
  en: {
    title: "medstream alert console", signIn: "Sign in", signOut: "Sign out", user: "User",
    password: "Password", organisation: "Organisation", department: "Department", rule: "Rule",
    severity: "Severity", status: "Status", explanation: "Explanation", firstSeen: "First event",
    actions: "Actions", noAlerts: "No alerts match the filters.", timeline: "Patient timeline",
    time: "Time", kind: "Kind", code: "Code", value: "Value", feedHealth: "Feed health",
    lag: "Sink lag (records)", source: "Source", perSecond: "Events/s",
    deadLetters: "Dead letters (last minutes)", silent: "Silent sources", updated: "Updated",
    comment: "Comment", cancel: "Cancel", confirm: "Confirm", acknowledge: "Acknowledge",
    resolve: "Resolve", all: "All", live: "live", offline: "offline", none: "none",
    open: "open", acknowledged: "acknowledged", resolved: "resolved", critical: "critical",
    high: "high", medium: "medium", low: "low", shown: "shown", of: "of",
    noTimeline: "No events of this patient around the alert.",
    noPerson: "This alert is not about a patient.",
    timelineRefused: "Your role does not see patient timelines.",
    signInFailed: "Sign-in failed.", sessionExpired: "Your session ended: sign in again.",
    outcome_applied: "Done", outcome_refused: "Refused", outcome_timed_out: "Not confirmed",
    outcome_not_delivered: "Not sent", outcome_failed: "Failed",
    hint_timed_out: "the stream workers did not answer in time; the action stays queued.",
  },
  zh: {
    title: "medstream 实时告警台", signIn: "登录", signOut: "退出", user: "用户名",
    password: "密码", organisation: "机构", department: "科室", rule: "规则",
    severity: "级别", status: "状态", explanation: "说明", firstSeen: "首次事件",
    actions: "操作", noAlerts: "没有符合筛选条件的告警。", timeline: "患者时间线",
    time: "时间", kind: "类型", code: "编码", value: "数值", feedHealth: "数据源状态",
    lag: "入库积压（条）", source: "来源", perSecond: "事件/秒",
    deadLetters: "死信（最近几分钟）", silent: "静默数据源", updated: "更新于",
    comment: "备注", cancel: "取消", confirm: "确认", acknowledge: "确认接收",
    resolve: "处置完成", all: "全部", live: "实时", offline: "离线", none: "无",
    open: "未处理", acknowledged: "已接收", resolved: "已处置", critical: "危急",
    high: "高", medium: "中", low: "低", shown: "显示", of: "共",
    noTimeline: "告警前后没有该患者的事件。",
    noPerson: "该告警不涉及具体患者。",
    timelineRefused: "您的角色无权查看患者时间线。",
    signInFailed: "登录失败。", sessionExpired: "会话已结束，请重新登录。",
    outcome_applied: "已完成", outcome_refused: "被拒绝", outcome_timed_out: "未获确认",
    outcome_not_delivered: "未发送", outcome_failed: "失败",
    hint_timed_out: "流处理进程未及时答复，操作仍在队列中。",
  },
};
const SEVERITIES = ["critical", "high", "medium", "low"];
const STATUSES = ["open", "acknowledged", "resolved"];

const state = {
  lang: localStorage.getItem("medstream.lang") || "en",
  user: null, csrf: null, alerts: new Map(), fresh: new Set(), selected: null,
  feeds: null, source: null, pending: null,
};

const $ = (id) => document.getElementById(id);
const t = (key) => (TEXT[state.lang][key] ?? key);

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function formatTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleString(state.lang === "zh" ? "zh-CN" : "en-GB", { hour12: false });
}

function applyLanguage() {
  document.documentElement.lang = state.lang === "zh" ? "zh-CN" : "en";
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  $("lang").textContent = state.lang === "zh" ? "English" : "中文";
  $("connection").textContent = t($("connection").dataset.state);
  renderFilters();
  renderAlerts();
  renderFeeds();
}

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json", ...(options.headers || {}) };
  if (state.csrf && options.method && options.method !== "GET") headers["X-CSRF-Token"] = state.csrf;
  const response = await fetch(path, { credentials: "same-origin", ...options, headers });
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (response.status === 401 && state.user) { signedOut(t("sessionExpired")); }
  return { ok: response.ok, status: response.status, body };
}

// ---------------------------------------------------------------- sign-in

function showSignIn(message) {
  $("sign-in-panel").hidden = false;
  $("console").hidden = true;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  $("sign-in-error").textContent = message || "";
}

function signedIn(user, csrf) {
  state.user = user;
  state.csrf = csrf;
  $("sign-in-panel").hidden = true;
  $("console").hidden = false;
  $("sign-out").hidden = false;
  const scope = user.organisations.join(", ");
  $("who").textContent = `${user.name} · ${user.role} · ${scope}`;
  $("who").dataset.user = user.name;
  connect();
}

function signedOut(message) {
  state.user = null;
  state.csrf = null;
  state.alerts.clear();
  if (state.source) { state.source.close(); state.source = null; }
  setConnection("offline");
  showSignIn(message);
}

$("sign-in").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  const result = await api("/api/session", {
    method: "POST", body: JSON.stringify({ name: form.get("name"), password: form.get("password") }),
  });
  if (!result.ok) { showSignIn(result.body?.error || t("signInFailed")); return; }
  event.target.reset();
  signedIn(result.body.user, result.body.csrf);
});

$("sign-out").addEventListener("click", async () => {
  await api("/api/session", { method: "DELETE" });
  signedOut("");
});

$("lang").addEventListener("click", () => {
  state.lang = state.lang === "zh" ? "en" : "zh";
  localStorage.setItem("medstream.lang", state.lang);
  applyLanguage();
});

// ---------------------------------------------------------------- live stream

function setConnection(value) {
  $("connection").dataset.state = value;
  $("connection").textContent = t(value);
}

function connect() {
  if (state.source) state.source.close();
  const source = new EventSource("/api/events");
  state.source = source;
  source.addEventListener("open", () => setConnection("live"));
  source.addEventListener("snapshot", (event) => {
    state.alerts.clear();
    for (const alert of JSON.parse(event.data).alerts) state.alerts.set(alert.alert_id, alert);
    renderFilters();
    renderAlerts();
  });
  source.addEventListener("alert", (event) => {
    const alert = JSON.parse(event.data);
    if (!state.alerts.has(alert.alert_id)) state.fresh.add(alert.alert_id);
    state.alerts.set(alert.alert_id, alert);
    renderFilters();
    renderAlerts();
  });
  source.addEventListener("feeds", (event) => { state.feeds = JSON.parse(event.data); renderFeeds(); });
  source.addEventListener("error", async () => {
    setConnection("offline");
    // EventSource reconnects by itself; find out whether the session is still valid.
    const session = await api("/api/session");
    if (!session.ok) { source.close(); }
  });
}

// ---------------------------------------------------------------- filters and list

function fillSelect(id, values, label = (v) => v) {
  const select = $(id);
  const current = select.value;
  select.textContent = "";
  const all = document.createElement("option");
  all.value = "";
  all.textContent = t("all");
  select.appendChild(all);
  for (const value of values) {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = label(value);
    select.appendChild(option);
  }
  select.value = values.includes(current) ? current : "";
}

function distinct(field) {
  return [...new Set([...state.alerts.values()].map((a) => a[field]).filter((v) => v))].sort();
}

function renderFilters() {
  fillSelect("f-organisation", distinct("organisation_id"));
  fillSelect("f-department", distinct("department"));
  fillSelect("f-rule", distinct("rule_id"));
  fillSelect("f-severity", SEVERITIES, t);
  fillSelect("f-status", STATUSES, t);
}

["f-organisation", "f-department", "f-rule", "f-severity", "f-status"].forEach((id) =>
  $(id).addEventListener("change", renderAlerts));

function matches(alert) {
  const want = {
    organisation_id: $("f-organisation").value, department: $("f-department").value,
    rule_id: $("f-rule").value, severity: $("f-severity").value, status: $("f-status").value,
  };
  return Object.entries(want).every(([field, value]) => !value || alert[field] === value);
}

function ordered() {
  return [...state.alerts.values()].sort((a, b) =>
    SEVERITIES.indexOf(a.severity) - SEVERITIES.indexOf(b.severity)
    || (b.first_event_time || "").localeCompare(a.first_event_time || ""));
}

function renderAlerts() {
  const body = document.querySelector("#alerts tbody");
  body.textContent = "";
  const shown = ordered().filter(matches);
  for (const alert of shown) {
    const row = document.createElement("tr");
    row.className = `alert severity-${alert.severity} status-${alert.status}`;
    if (state.fresh.has(alert.alert_id)) row.classList.add("fresh");
    if (state.selected === alert.alert_id) row.classList.add("selected");
    row.dataset.alertId = alert.alert_id;
    row.dataset.status = alert.status;
    row.dataset.organisation = alert.organisation_id;
    row.dataset.rule = alert.rule_id;
    cell(row, t(alert.severity), "severity");
    cell(row, t(alert.status), "status");
    cell(row, alert.rule_id, "rule");
    cell(row, alert.organisation_id, "organisation");
    cell(row, alert.department || "–", "department");
    const explanation = alert.explanation + (alert.note ? ` — ${alert.actor}: ${alert.note}` : "");
    cell(row, explanation, "explanation");
    cell(row, formatTime(alert.first_event_time), "time");
    const actions = cell(row, "", "actions");
    if (state.user?.act_on_alerts && alert.status !== "resolved") {
      if (alert.status === "open") actions.appendChild(actionButton(alert, "acknowledge"));
      actions.appendChild(actionButton(alert, "resolve"));
    }
    row.addEventListener("click", () => select(alert.alert_id));
    body.appendChild(row);
  }
  state.fresh.clear();
  $("empty").hidden = shown.length > 0;
  $("counts").textContent = `${t("shown")} ${shown.length} ${t("of")} ${state.alerts.size}`;
}

function actionButton(alert, action) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = `act-${action}`;
  button.textContent = t(action);
  button.addEventListener("click", (event) => {
    event.stopPropagation();
    state.pending = { alert, action };
    $("act-title").textContent = `${t(action)}: ${alert.rule_id} (${alert.organisation_id})`;
    $("act-note").value = "";
    $("act-dialog").showModal();
  });
  return button;
}

$("act-dialog").addEventListener("close", async () => {
  const pending = state.pending;
  state.pending = null;
  if (!pending || $("act-dialog").returnValue !== "confirm") return;
  const result = await api(
    `/api/alerts/${encodeURIComponent(pending.alert.alert_id)}/${pending.action}`,
    { method: "POST", body: JSON.stringify({ note: $("act-note").value }) });
  showOutcome(pending, result);
});

// Every action ends visibly: applied, refused with the reason, or not confirmed in time.
function showOutcome(pending, result) {
  const outcome = result.body?.outcome || (result.ok ? "applied" : "failed");
  const box = $("act-result");
  const what = `${t(pending.action)} · ${pending.alert.rule_id} (${pending.alert.organisation_id})`;
  const detail = result.body?.message || result.body?.error || `HTTP ${result.status}`;
  const hint = outcome === "timed_out" ? ` ${t("hint_timed_out")}` : "";
  box.textContent = `${t(`outcome_${outcome}`)}: ${what}: ${detail}${hint}`;
  box.dataset.outcome = outcome;
  box.dataset.httpStatus = String(result.status);
  box.hidden = false;
  if (result.ok && result.body?.status) {
    const alert = state.alerts.get(pending.alert.alert_id);
    if (alert) alert.status = result.body.status;
    renderAlerts();
  }
}

// ---------------------------------------------------------------- timeline

async function select(alertId) {
  state.selected = alertId;
  renderAlerts();
  const alert = state.alerts.get(alertId);
  $("detail").hidden = false;
  $("detail-title").textContent = `${alert.rule_id} · ${alert.organisation_id} · ${alert.explanation}`;
  const body = document.querySelector("#timeline tbody");
  body.textContent = "";
  $("timeline-note").textContent = "";
  if (!alert.person_key) { $("timeline-note").textContent = t("noPerson"); return; }
  const result = await api(`/api/alerts/${encodeURIComponent(alertId)}/timeline`);
  if (result.status === 403) { $("timeline-note").textContent = t("timelineRefused"); return; }
  if (!result.ok) { $("timeline-note").textContent = result.body?.error || ""; return; }
  for (const item of result.body.events) {
    const row = document.createElement("tr");
    cell(row, formatTime(item.event_time));
    cell(row, item.kind);
    cell(row, item.code || item.local_code);
    cell(row, item.value === null ? "" : `${item.value} ${item.unit || ""}`);
    body.appendChild(row);
  }
  if (!result.body.events.length) $("timeline-note").textContent = t("noTimeline");
}

// ---------------------------------------------------------------- feed health

function renderFeeds() {
  const feeds = state.feeds;
  if (!feeds) return;
  $("lag").textContent = feeds.lag === null || feeds.lag === undefined ? "–" : String(feeds.lag);
  const body = document.querySelector("#feed-rates tbody");
  body.textContent = "";
  for (const item of feeds.rows) {
    const row = document.createElement("tr");
    cell(row, item.organisation_id);
    cell(row, item.event_type);
    cell(row, item.per_second.toFixed(2));
    body.appendChild(row);
  }
  const list = (id, items, text) => {
    const ul = $(id);
    ul.textContent = "";
    for (const item of items) {
      const li = document.createElement("li");
      li.textContent = text(item);
      ul.appendChild(li);
    }
    if (!items.length) { const li = document.createElement("li"); li.textContent = t("none"); ul.appendChild(li); }
  };
  list("dead-letters", feeds.dead_letters, (d) => `${d.organisation_id || "?"}: ${(d.per_second * 120).toFixed(0)}`);
  list("silent", feeds.silent, (s) => `${s.organisation_id} · ${s.rule_id} · ${s.subject}`);
  $("feeds-updated").textContent = formatTime(feeds.updated);
}

// ---------------------------------------------------------------- start

(async function start() {
  applyLanguage();
  const session = await api("/api/session");
  if (session.ok) signedIn(session.body.user, session.body.csrf);
  else showSignIn("");
})();
