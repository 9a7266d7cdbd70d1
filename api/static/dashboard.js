/* jobrunner operations dashboard.
 *
 * Polls the admin API every 2.5 s (stats, throughput, failed and dead jobs) and draws
 * everything with plain DOM and SVG. The admin token (ADMIN_TOKEN) is asked for once and
 * kept in sessionStorage; every data call sends it as a Bearer header. A 401 stops the
 * polling, wipes what was shown and says so; a 404 means the admin API is off.
 */
"use strict";

(() => {
  const TOKEN_KEY = "jobrunner.adminToken";
  const API_TOKEN_KEY = "jobrunner.apiToken";
  const POLL_MS = 2500;
  const LIST_LIMIT = 100;
  const WINDOW_S = 900;
  const BUCKET_S = 10;
  const MAX_REPORT_BARS = 30;
  const SVG_NS = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  const fmt = new Intl.NumberFormat("en-US");

  let timer = null;
  let inFlight = false;
  let authorised = false;
  let lastThroughput = null;
  let lastReport = null;
  let reportRunning = false;
  let polls = 0;

  class HttpError extends Error {
    constructor(status, body) {
      super((body && body.description) || `HTTP ${status}`);
      this.status = status;
      this.body = body;
    }
  }

  // --- HTTP ---------------------------------------------------------------------------

  async function call(path, { method = "GET", token = sessionStorage.getItem(TOKEN_KEY) } = {}) {
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    const resp = await fetch(path, { method, headers, cache: "no-store" });
    let body = null;
    try { body = await resp.json(); } catch (_) { body = null; }
    if (!resp.ok) throw new HttpError(resp.status, body);
    return { status: resp.status, body };
  }

  // The report API needs API_TOKEN when the server sets one; without a stored one the
  // admin token is sent (harmless when the report API is open).
  const reportToken = () => sessionStorage.getItem(API_TOKEN_KEY) || sessionStorage.getItem(TOKEN_KEY);

  // --- DOM and formatting utilities -----------------------------------------------------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }

  function svg(tag, attrs = {}, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
    const s = Math.max(0, seconds);
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 60) return `${Math.round(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} m ${Math.round(s % 60)} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} m`;
    return `${Math.floor(s / 86400)} d ${Math.round((s % 86400) / 3600)} h`;
  }

  function relative(iso) {
    if (!iso) return "–";
    const delta = (Date.parse(iso) - Date.now()) / 1000;
    if (Math.abs(delta) < 1) return "now";
    return delta > 0 ? `in ${duration(delta)}` : `${duration(-delta)} ago`;
  }

  function clockTime(iso) {
    return new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  let toastTimer = null;
  function toast(text, kind = "info") {
    const node = $("toast");
    node.textContent = text;
    node.dataset.kind = kind;
    node.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { node.hidden = true; }, 3500);
  }

  function setLive(state, text) {
    $("live").dataset.state = state;
    $("live-text").textContent = text;
    $("live").title = text;
  }

  function notice(title, text, kind = "error") {
    const node = $("notice");
    if (!title) { node.hidden = true; return; }
    $("notice-title").textContent = title;
    $("notice-text").textContent = text || "";
    node.dataset.kind = kind;
    node.hidden = false;
  }

  // --- access ---------------------------------------------------------------------------

  function wipe() {
    // Nothing of what an authorised session saw stays on the page.
    for (const id of ["kpi-queued", "kpi-running", "kpi-failed", "kpi-dead", "kpi-succeeded", "kpi-age", "rate"]) {
      $(id).textContent = "–";
    }
    $("queues").tBodies[0].replaceChildren();
    $("problems").tBodies[0].replaceChildren();
    $("problems-summary").textContent = "";
    $("throughput").replaceChildren();
    $("report-chart").replaceChildren();
    $("report-meta").textContent = "";
    $("report-status").hidden = true;
    lastThroughput = null;
    lastReport = null;
    $("content").hidden = true;
  }

  function stopPolling() {
    clearTimeout(timer);
    timer = null;
  }

  function askForToken(reason, title = "401 Unauthorized", kind = "error") {
    stopPolling();
    authorised = false;
    wipe();
    $("signout").hidden = !sessionStorage.getItem(TOKEN_KEY);
    $("login").hidden = false;
    notice(title, reason, kind);
    setLive("error", "not signed in");
    $("token").focus();
  }

  function handleFailure(error) {
    if (error instanceof HttpError && error.status === 401) {
      const sent = Boolean(sessionStorage.getItem(TOKEN_KEY));
      askForToken(sent
        ? "The admin token was rejected. No data is shown; enter the right token."
        : "The admin API needs a token. No data is shown until you enter the server's ADMIN_TOKEN.");
      return false;
    }
    if (error instanceof HttpError && error.status === 404) {
      stopPolling();
      wipe();
      $("login").hidden = true;
      notice("Admin API disabled",
        "The server runs without ADMIN_TOKEN, so the admin API (and this dashboard's data) is off. Start it with ADMIN_TOKEN set.",
        "warn");
      setLive("error", "admin API off");
      return false;
    }
    const what = error instanceof HttpError ? `${error.status}: ${error.message}` : "the server cannot be reached";
    setLive("warn", `retrying (${what})`);
    return true;   // transient: keep polling, keep the last figures on screen
  }

  // --- rendering: KPIs and queues ---------------------------------------------------------

  function renderStats(rows) {
    const totals = { queued: 0, running: 0, failed: 0, dead: 0, succeeded: 0, cancelled: 0 };
    const queues = new Map();
    let oldestQueued = null;
    for (const r of rows) {
      totals[r.state] = (totals[r.state] || 0) + r.count;
      if (!queues.has(r.queue)) queues.set(r.queue, {});
      queues.get(r.queue)[r.state] = r.count;
      if (r.state === "queued" && (oldestQueued === null || r.oldest_age_seconds > oldestQueued)) {
        oldestQueued = r.oldest_age_seconds;
      }
    }
    for (const state of ["queued", "running", "failed", "dead", "succeeded"]) {
      $(`kpi-${state}`).textContent = fmt.format(totals[state]);
    }
    $("kpi-dead").parentElement.classList.toggle("alert", totals.dead > 0);
    $("kpi-age").textContent = oldestQueued === null ? "none" : duration(oldestQueued);

    const body = $("queues").tBodies[0];
    const trs = [];
    for (const [name, counts] of [...queues.entries()].sort((a, b) => a[0].localeCompare(b[0]))) {
      const cell = (state, extra = "") => {
        const n = counts[state] || 0;
        const hot = n > 0 && (state === "dead" || state === "failed") ? ` hot-${state}` : "";
        return el("td", { class: `num${n === 0 ? " zero" : hot}${extra}`, text: fmt.format(n) });
      };
      trs.push(el("tr", { "data-queue": name },
        el("td", { class: "job-kind", text: name }),
        cell("queued"), cell("running"), cell("failed"), cell("dead"), cell("succeeded")));
    }
    if (!trs.length) trs.push(el("tr", {}, el("td", { colspan: 6, class: "muted", text: "No jobs yet." })));
    body.replaceChildren(...trs);
    return totals;
  }

  // --- rendering: throughput ----------------------------------------------------------------

  function renderThroughput(data) {
    lastThroughput = data;
    const box = $("throughput");
    const buckets = data.buckets;
    const width = Math.max(280, box.clientWidth || 600);
    const height = width < 420 ? 150 : 190;
    const pad = { left: 36, right: 6, top: 10, bottom: 22 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const totals = buckets.map((b) => b.succeeded + b.dead + b.cancelled);
    const peak = Math.max(1, ...totals);
    const step = niceStep(peak / 3);
    const top = Math.ceil(peak / step) * step;
    const y = (v) => pad.top + plotH - (v / top) * plotH;
    const slot = plotW / Math.max(1, buckets.length);
    const barW = Math.max(1, slot * 0.72);

    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img",
      "aria-label": "Jobs finished per 10 seconds over the last 15 minutes" });
    for (let v = 0; v <= top; v += step) {
      root.append(svg("line", { class: "grid-line", x1: pad.left, x2: width - pad.right, y1: y(v), y2: y(v) }));
      root.append(svg("text", { class: "axis", x: pad.left - 6, y: y(v) + 4, "text-anchor": "end" }, fmt.format(v)));
    }
    buckets.forEach((b, i) => {
      const x = pad.left + i * slot + (slot - barW) / 2;
      let base = 0;
      const g = svg("g");
      for (const state of ["succeeded", "dead", "cancelled"]) {
        const n = b[state];
        if (!n) continue;
        const y0 = y(base), y1 = y(base + n);
        g.append(svg("rect", { class: `bar-${state}`, x: x.toFixed(2), y: y1.toFixed(2), width: barW.toFixed(2),
          height: Math.max(0.5, y0 - y1).toFixed(2), rx: Math.min(2, barW / 3) }));
        base += n;
      }
      if (base) {
        g.append(svg("title", {}, `${clockTime(b.at)}: ${b.succeeded} succeeded, ${b.dead} dead, ${b.cancelled} cancelled`));
      }
      root.append(g);
    });
    // x axis: minutes before now
    const perMinute = 60 / data.bucket_seconds;
    for (let m = 0; m * perMinute <= buckets.length; m += 5) {
      const i = buckets.length - m * perMinute;
      const x = pad.left + Math.min(buckets.length, i) * slot - (m === 0 ? 0 : slot / 2);
      root.append(svg("text", { class: "axis", x: x.toFixed(1), y: height - 5,
        "text-anchor": m === 0 ? "end" : "middle" }, m === 0 ? "now" : `−${m} min`));
    }
    box.replaceChildren(root);

    const recent = buckets.slice(-Math.round(300 / data.bucket_seconds));
    const finished = recent.reduce((sum, b) => sum + b.succeeded + b.dead + b.cancelled, 0);
    $("rate").textContent = fmt.format(Math.round(finished / 5));
  }

  function niceStep(raw) {
    if (raw <= 1) return 1;
    const mag = 10 ** Math.floor(Math.log10(raw));
    for (const m of [1, 2, 2.5, 5, 10]) if (raw <= m * mag) return Math.max(1, Math.round(m * mag));
    return Math.round(10 * mag);
  }

  // --- rendering: failed and dead jobs --------------------------------------------------------

  function renderProblems(dead, failed, totals) {
    // Dead jobs first (they need someone), then the ones still retrying; newest first.
    const byNewest = (a, b) => b.id - a.id;
    const jobs = [...[...dead].sort(byNewest), ...[...failed].sort(byNewest)];
    const body = $("problems").tBodies[0];
    body.replaceChildren(...jobs.map(problemRow));
    $("problems-empty").hidden = jobs.length > 0;
    const parts = [];
    if (totals.dead) parts.push(`${fmt.format(totals.dead)} dead`);
    if (totals.failed) parts.push(`${fmt.format(totals.failed)} retrying`);
    let summary = parts.join(" · ");
    if (totals.dead > dead.length || totals.failed > failed.length) {
      summary += ` — showing the first ${LIST_LIMIT} of each`;
    }
    $("problems-summary").textContent = summary;
  }

  function errorCell(job) {
    // "KeyError: 'shipping_address'": the error type of the latest attempt, then its message.
    const last = Array.isArray(job.errors) && job.errors.length ? job.errors[job.errors.length - 1] : null;
    const type = last && last.error_type ? last.error_type : "";
    const message = job.last_error || "";
    const node = el("div", { class: "error", title: type && message ? `${type}: ${message}` : message || type });
    if (type && !message.startsWith(type)) node.append(el("span", { class: "etype", text: type }), ": ");
    node.append(message || (type ? "" : "–"));
    return node;
  }

  function problemRow(job) {
    const next = job.state === "failed"
      ? el("span", { class: "when", title: job.run_at, text: `retry ${relative(job.run_at)}` })
      : el("span", { class: "when muted", title: job.finished_at || "", text: job.finished_at ? `died ${relative(job.finished_at)}` : "–" });
    const actions = el("div", { class: "actions" },
      el("button", { type: "button", class: "small retry", "data-action": "retry", "data-job-id": job.id,
        "aria-label": `Retry job ${job.id}`, text: "Retry" }),
      job.state === "failed"
        ? el("button", { type: "button", class: "small cancel", "data-action": "cancel", "data-job-id": job.id,
          "aria-label": `Cancel job ${job.id}`, text: "Cancel" })
        : null);
    return el("tr", { "data-job-id": job.id, "data-state": job.state },
      el("td", {},
        el("div", {}, el("span", { class: "job-id", text: `#${job.id}` }), " ",
          el("span", { class: "job-kind", text: job.kind })),
        el("div", { class: "job-queue", text: `queue ${job.queue}` })),
      el("td", {}, el("span", { class: "pill", "data-state": job.state, text: job.state === "failed" ? "retrying" : job.state })),
      el("td", { class: "num", text: `${job.attempts} / ${job.max_attempts}` }),
      el("td", {}, errorCell(job)),
      el("td", {}, next),
      el("td", {}, actions));
  }

  async function onProblemClick(event) {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const id = button.dataset.jobId;
    const action = button.dataset.action;
    const row = button.closest("tr");
    row.classList.add("leaving");
    row.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    try {
      const { body } = await call(`/api/admin/jobs/${encodeURIComponent(id)}/${action}`, { method: "POST" });
      toast(`Job #${id} is ${body.data.state} now`);
    } catch (error) {
      row.classList.remove("leaving");
      row.querySelectorAll("button").forEach((b) => { b.disabled = false; });
      if (error instanceof HttpError && (error.status === 401 || error.status === 404)) {
        handleFailure(error);
        return;
      }
      toast(`${action} of job #${id} failed: ${error.message}`, "error");
    }
    refresh();
  }

  // --- rendering: payments report ------------------------------------------------------------

  function renderReport(report) {
    lastReport = report;
    const chart = $("report-chart");
    if (!report) {
      chart.replaceChildren();
      $("report-empty").hidden = false;
      $("report-meta").textContent = "";
      return;
    }
    $("report-empty").hidden = true;
    const rows = report.result.data;
    const total = rows.reduce((sum, r) => sum + r.total_payment, 0);
    $("report-meta").textContent =
      `job #${report.job_id} · ${rows.length} users · total ${fmt.format(total)} · finished ${clockTime(report.finished_at)}`;
    chart.dataset.total = String(total);
    chart.dataset.users = String(rows.length);

    let shown = rows;
    if (rows.length > MAX_REPORT_BARS) {
      shown = [...rows].sort((a, b) => b.total_payment - a.total_payment).slice(0, MAX_REPORT_BARS)
        .sort((a, b) => a.user_id - b.user_id);
    }
    const width = Math.max(280, chart.clientWidth || 600);
    const height = 230;
    const pad = { left: 8, right: 8, top: 22, bottom: 26 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const peak = Math.max(1, ...shown.map((r) => r.total_payment));
    const slot = plotW / Math.max(1, shown.length);
    const barW = Math.min(64, slot * 0.66);
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img",
      "aria-label": "Total payment per user" });
    const defs = svg("defs");
    const grad = svg("linearGradient", { id: "report-gradient", x1: 0, y1: 0, x2: 0, y2: 1 });
    grad.append(svg("stop", { offset: "0%", class: "stop-a" }), svg("stop", { offset: "100%", class: "stop-b" }));
    defs.append(grad);
    root.append(defs);
    root.append(svg("line", { class: "grid-line", x1: pad.left, x2: width - pad.right,
      y1: pad.top + plotH, y2: pad.top + plotH }));
    const compact = new Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 1 });
    shown.forEach((r, i) => {
      const h = Math.max(1, (r.total_payment / peak) * plotH);
      const x = pad.left + i * slot + (slot - barW) / 2;
      const y0 = pad.top + plotH - h;
      const g = svg("g", { "data-user-id": r.user_id, "data-total": r.total_payment });
      g.append(svg("rect", { class: "bar-report", x: x.toFixed(2), y: y0.toFixed(2), width: barW.toFixed(2),
        height: h.toFixed(2), rx: Math.min(6, barW / 4) }));
      const label = slot > 58 ? fmt.format(r.total_payment) : compact.format(r.total_payment);
      if (slot > 26) {
        g.append(svg("text", { class: "bar-label", x: (x + barW / 2).toFixed(2), y: (y0 - 6).toFixed(2),
          "text-anchor": "middle" }, label));
      }
      g.append(svg("text", { class: "user-label", x: (x + barW / 2).toFixed(2), y: height - 8,
        "text-anchor": "middle" }, slot > 34 ? `user ${r.user_id}` : String(r.user_id)));
      g.append(svg("title", {}, `user ${r.user_id}: ${fmt.format(r.total_payment)}`));
      root.append(g);
    });
    chart.replaceChildren(root);
    if (shown.length < rows.length) {
      $("report-meta").textContent += ` · top ${shown.length} shown`;
    }
  }

  async function loadLatestReport() {
    const { body } = await call("/api/admin/reports/latest");
    if (!reportRunning) renderReport(body.data);
  }

  function reportStatus(state, text, spinning) {
    const node = $("report-status");
    node.hidden = false;
    node.dataset.state = state;
    const parts = [
      el("span", { class: "pill", "data-state": state === "error" ? "dead" : state, text: state }),
      el("span", { text }),
    ];
    if (spinning) parts.unshift(el("span", { class: "spinner", "aria-hidden": "true" }));
    node.replaceChildren(...parts);
  }

  async function runReport() {
    if (reportRunning) return;
    reportRunning = true;
    const button = $("run-report");
    button.disabled = true;
    const started = performance.now();
    try {
      reportStatus("queued", "submitting…", true);
      const submitted = await call("/api/2.0/report/payments", { method: "POST", token: reportToken() });
      const id = submitted.body.data.job_id;
      let data = submitted.body.data;
      reportStatus(data.status, `job #${id} submitted; waiting for it to finish…`, true);
      for (;;) {
        const polled = await call(`/api/2.0/report/payments/${id}?wait=30`, { token: reportToken() });
        data = polled.body.data;
        if (polled.status === 200) break;   // final
        reportStatus(data.status, `job #${id} ${data.status}; still waiting…`, true);
      }
      const took = ((performance.now() - started) / 1000).toFixed(1);
      if (data.status === "succeeded") {
        reportStatus("succeeded", `job #${id} finished in ${took} s (attempt ${data.attempts} of ${data.max_attempts})`, false);
        renderReport({ job_id: id, finished_at: data.finished_at, attempts: data.attempts, result: data.result });
      } else {
        reportStatus(data.status, `job #${id} ended ${data.status}${data.last_error ? `: ${data.last_error}` : ""}`, false);
      }
    } catch (error) {
      if (error instanceof HttpError && error.status === 401) {
        reportStatus("error", "401 Unauthorized: the report API needs its own token (API_TOKEN).", false);
        const token = window.prompt("API_TOKEN of the report API");
        if (token) sessionStorage.setItem(API_TOKEN_KEY, token);
      } else {
        reportStatus("error", `the report could not be run: ${error.message}`, false);
      }
    } finally {
      reportRunning = false;
      button.disabled = false;
    }
    refresh();
  }

  // --- the loop ------------------------------------------------------------------------------

  async function refresh() {
    if (inFlight) return;
    inFlight = true;
    clearTimeout(timer);
    let again = true;
    try {
      const q = `limit=${LIST_LIMIT}`;
      const [stats, throughput, dead, failed] = await Promise.all([
        call("/api/admin/stats"),
        call(`/api/admin/throughput?window=${WINDOW_S}&bucket=${BUCKET_S}`),
        call(`/api/admin/jobs?state=dead&${q}`),
        call(`/api/admin/jobs?state=failed&${q}`),
      ]);
      if (!authorised) {
        authorised = true;
        $("login").hidden = true;
        $("signout").hidden = false;
        notice(null);
        $("content").hidden = false;
      }
      const totals = renderStats(stats.body.data);
      renderThroughput(throughput.body.data);
      renderProblems(dead.body.data, failed.body.data, totals);
      if (polls % 12 === 0 && !reportRunning) await loadLatestReport();
      polls += 1;
      setLive("ok", `live · updated ${new Date().toLocaleTimeString()}`);
    } catch (error) {
      again = handleFailure(error);
    } finally {
      inFlight = false;
    }
    if (again) timer = setTimeout(tick, POLL_MS);
  }

  function tick() {
    if (document.hidden) { timer = setTimeout(tick, POLL_MS); return; }
    refresh();
  }

  function start() {
    polls = 0;
    authorised = false;
    setLive("idle", "connecting…");
    refresh();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token").value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      $("token").value = "";
      notice(null);
      start();
    });
    $("signout").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      sessionStorage.removeItem(API_TOKEN_KEY);
      askForToken("Enter the admin token to see the dashboard again.", "Signed out", "info");
    });
    $("problems").addEventListener("click", onProblemClick);
    $("run-report").addEventListener("click", runReport);
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => {
        if (lastThroughput) renderThroughput(lastThroughput);
        if (lastReport) renderReport(lastReport);
      }, 150);
    });
    start();
  });
})();
