// smifdb dashboard: polls the JSON API under /api/v1 and draws model runs, workflows, the
// selected workflow's DAG (SVG, layered by longest path from a root), job detail and runners.
// Every list is read a page at a time (?limit=, and the page's "next" cursor): the sidebar's
// lists show pages, a drawable DAG follows the cursors (at most MAX_NODES jobs), a bigger
// workflow's jobs are a paged table. No framework, no outside resources. Text from the API
// only ever reaches the page through textContent, setAttribute or SVG text nodes: never as HTML.
"use strict";

(() => {
  const API = "/api/v1";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const JOB_STATUSES = [
    "waiting",
    "ready",
    "running",
    "succeeded",
    "failed",
    "upstream_failed",
    "cancelled",
  ];
  const WORKFLOW_STATUSES = ["pending", "running", "succeeded", "failed", "cancelled"];
  const RUNNER_STATES = ["registered", "active", "draining", "stopped", "lost"];
  const KNOWN = new Set([...JOB_STATUSES, ...WORKFLOW_STATUSES, ...RUNNER_STATES]);
  const UNFINISHED_JOB = new Set(["waiting", "ready", "running"]);
  const UNFINISHED_WORKFLOW = new Set(["pending", "running"]);
  // Order of the workflow's progress bar: finished work from the left.
  const BAR_ORDER = ["succeeded", "failed", "upstream_failed", "cancelled", "running", "ready", "waiting"];

  const query = new URLSearchParams(window.location.search);
  const POLL_MS = positiveInt(query.get("poll_ms"), 1000);
  const HIDDEN_POLL_MS = 5000;
  const MAX_NODES = positiveInt(query.get("max_nodes"), 1500); // above this: counts and a table
  // A workflow's job list is fetched again when its counts by status change (or every 5 s, for
  // retries and runners), and at most every 2 s past 500 jobs, every 5 s past MAX_NODES.
  const JOBS_REFRESH_MS = 5000;
  const MAX_LIMIT = 1000; // the API's largest page
  const LIST_ROWS = Math.min(positiveInt(query.get("list_rows"), 50), MAX_LIMIT); // sidebar pages
  const JOBS_PAGE = Math.min(positiveInt(query.get("jobs_page"), MAX_LIMIT), MAX_LIMIT); // DAG
  const TABLE_ROWS = Math.min(positiveInt(query.get("table_rows"), 500), MAX_LIMIT); // big table
  const NODE_W = 168;
  const NODE_H = 40;
  const GAP_X = 56;
  const GAP_Y = 14;
  const PAD = 16;

  const state = {
    workflowId: null,
    jobId: null,
    filter: "",
    paused: false,
    polling: false,
    again: false,
    timer: null,
    pollErrors: [],
    actionError: null,
    actionTimer: null,
    graphKey: null,
    nodes: new Map(), // job id -> SVG group, for the drawn DAG
    edges: [], // {parent, child, path}
    jobs: [],
    jobsFetchedAt: 0,
    jobsFinal: false, // fetched after the workflow finished: nothing can change any more
    jobsSignature: null, // the workflow's counts by status when its jobs were last fetched
    tableStatus: "",
    tableSearch: "",
    tableTotal: 0,
    // One pager per list: the cursors of the pages so far (null: the first) and the next one's.
    pagers: {
      modelRuns: newPager("model-runs"),
      workflows: newPager("workflows"),
      runners: newPager("runners"),
      jobs: newPager("jobs"),
    },
  };

  function newPager(name) {
    return { name, cursors: [null], next: null };
  }

  const $ = (id) => document.getElementById(id);

  function positiveInt(text, fallback) {
    const n = Number.parseInt(text ?? "", 10);
    return Number.isFinite(n) && n > 0 ? n : fallback;
  }

  // -- DOM helpers: elements from data, text always as text -----------------------------------

  function setAttrs(el, attrs) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith("on") && typeof value === "function") {
        el.addEventListener(name.slice(2), value);
      } else {
        el.setAttribute(name, value === true ? "" : String(value));
      }
    }
    return el;
  }

  function addChildren(el, children) {
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function h(tag, attrs, ...children) {
    return addChildren(setAttrs(document.createElement(tag), attrs), children);
  }

  function svg(tag, attrs, ...children) {
    return addChildren(setAttrs(document.createElementNS(SVG_NS, tag), attrs), children);
  }

  function setText(el, text) {
    const value = text === null || text === undefined ? "" : String(text);
    if (el.textContent !== value) el.textContent = value;
  }

  function statusClass(status) {
    return "st-" + (KNOWN.has(status) ? status : "unknown");
  }

  function badge(status, title) {
    return h("span", { class: "badge " + statusClass(status), title: title || null }, status ?? "?");
  }

  function setBadge(el, status, title) {
    el.className = "badge " + statusClass(status);
    setText(el, status ?? "?");
    if (title) el.title = title;
    else el.removeAttribute("title");
  }

  // A bar of segments: [[status, count], ...] out of total.
  function fillBar(bar, segments, total) {
    const want = segments.filter(([, n]) => n > 0);
    while (bar.children.length > want.length) bar.lastChild.remove();
    while (bar.children.length < want.length) bar.append(h("span"));
    want.forEach(([status, n], i) => {
      const seg = bar.children[i];
      seg.className = "seg-" + (KNOWN.has(status) ? status : "waiting");
      seg.style.width = (total > 0 ? (100 * n) / total : 0).toFixed(2) + "%";
      seg.title = `${status}: ${n}`;
    });
    return bar;
  }

  // Keep one element per row (by key), updating it in place: no flicker, no stale clicks.
  function reconcile(container, rows, key, create, update) {
    const existing = new Map();
    for (const el of container.querySelectorAll(":scope > [data-key]")) {
      existing.set(el.dataset.key, el);
    }
    for (const el of container.querySelectorAll(":scope > :not([data-key])")) el.remove();
    const seen = new Set();
    let previous = null;
    for (const row of rows) {
      const k = String(key(row));
      seen.add(k);
      let el = existing.get(k);
      if (!el) {
        el = create(row);
        el.dataset.key = k;
      }
      update(el, row);
      const next = previous ? previous.nextSibling : container.firstChild;
      if (next !== el) container.insertBefore(el, next);
      previous = el;
    }
    for (const [k, el] of existing) if (!seen.has(k)) el.remove();
  }

  // -- formatting ------------------------------------------------------------------------------

  function parseTime(iso) {
    if (!iso) return null;
    const t = Date.parse(iso);
    return Number.isNaN(t) ? null : t;
  }

  function fmtTime(iso) {
    const t = parseTime(iso);
    if (t === null) return "—";
    const d = new Date(t);
    const now = new Date();
    const pad = (n) => String(n).padStart(2, "0");
    const clock = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    if (d.toDateString() === now.toDateString()) return clock;
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${clock}`;
  }

  function fmtSeconds(s) {
    if (s === null || s === undefined || !Number.isFinite(s)) return "—";
    if (s < 0) s = 0;
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 60) return `${Math.round(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  }

  function between(startIso, endIso) {
    const start = parseTime(startIso);
    if (start === null) return null;
    const end = parseTime(endIso) ?? Date.now();
    return (end - start) / 1000;
  }

  function json(value) {
    if (value === null || value === undefined) return "—";
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  // -- the API ---------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  async function api(path, options = {}) {
    return (await apiBody(path, options)).data;
  }

  // One page of a list: its rows and the next page's cursor (null on the last page).
  async function apiPage(path, limit, cursor) {
    const [base, search] = path.split("?");
    const params = new URLSearchParams(search || "");
    params.set("limit", String(limit));
    if (cursor) params.set("cursor", cursor);
    const body = await apiBody(`${base}?${params}`);
    if (!Array.isArray(body.data)) throw new ApiError(`${base} did not answer a list`, 0);
    return { rows: body.data, next: body.next ?? null };
  }

  async function apiBody(path, options = {}) {
    let response;
    try {
      response = await fetch(API + path, {
        cache: "no-store",
        headers: { Accept: "application/json" },
        ...options,
      });
    } catch (err) {
      throw new ApiError(`cannot reach the API at ${window.location.origin} (${err.message})`, 0);
    }
    if (response.status === 401) {
      // Signed out (the session ended or expired): sign in again, then come back here.
      const here = window.location.pathname + window.location.search + window.location.hash;
      window.location.assign("/login?next=" + encodeURIComponent(here));
      throw new ApiError("signed out", 401);
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (!response.ok || body === null || typeof body !== "object") {
      const message = body?.error?.message || `HTTP ${response.status} ${response.statusText}`;
      throw new ApiError(message, response.status);
    }
    return body;
  }

  // -- pages of a list -------------------------------------------------------------------------

  function currentCursor(pager) {
    return pager.cursors[pager.cursors.length - 1];
  }

  // The pager's current page, or null if the page was turned while it was read.
  async function readPage(pager, path, limit) {
    const cursor = currentCursor(pager);
    const page = await apiPage(path, limit, cursor);
    if (cursor !== currentCursor(pager)) return null;
    if (!page.rows.length && pager.cursors.length > 1) {
      pager.cursors.pop(); // the rows of this page have gone (pruned, filtered): back one
      refresh();
      return null;
    }
    pager.next = page.next;
    renderPager(pager);
    return page.rows;
  }

  function renderPager(pager) {
    const box = $(`${pager.name}-pager`);
    if (!box) return;
    const n = pager.cursors.length;
    box.hidden = n === 1 && !pager.next;
    $(`${pager.name}-prev`).disabled = n === 1;
    $(`${pager.name}-next`).disabled = !pager.next;
    setText($(`${pager.name}-page`), `page ${n}`);
  }

  function turnPage(pager, forward) {
    if (forward && pager.next) pager.cursors.push(pager.next);
    else if (!forward && pager.cursors.length > 1) pager.cursors.pop();
    else return;
    pager.next = null;
    renderPager(pager);
    if (pager === state.pagers.jobs) {
      state.jobsFetchedAt = 0; // fetch the new page now, even of a finished workflow
      state.jobsFinal = false;
      state.jobsSignature = null;
    }
    refresh();
  }

  function resetPager(pager) {
    pager.cursors = [null];
    pager.next = null;
    renderPager(pager);
  }

  // -- banner, live indicator, confirmation ---------------------------------------------------

  function renderBanner() {
    const parts = [];
    if (state.actionError) parts.push(state.actionError);
    if (state.pollErrors.length) parts.push(...new Set(state.pollErrors));
    const banner = $("banner");
    setText($("banner-text"), parts.join("\n"));
    banner.hidden = parts.length === 0;
    banner.dataset.kind = state.actionError ? "action" : "poll";
  }

  function showActionError(message) {
    state.actionError = message;
    clearTimeout(state.actionTimer);
    state.actionTimer = setTimeout(() => {
      state.actionError = null;
      renderBanner();
    }, 15000);
    renderBanner();
  }

  function renderLive() {
    const live = $("live");
    if (state.paused) {
      live.dataset.state = "paused";
      setText($("live-text"), "paused");
    } else if (state.pollErrors.length) {
      live.dataset.state = "error";
      setText($("live-text"), "API error, retrying");
    } else {
      live.dataset.state = "ok";
      setText($("live-text"), "live · updated " + fmtTime(new Date().toISOString()));
    }
  }

  // An in-page confirmation (testable, unlike window.confirm); <body data-confirm="off"> skips it.
  function confirmAction(message) {
    if (document.body.dataset.confirm === "off") return Promise.resolve(true);
    const modal = $("confirm");
    setText($("confirm-text"), message);
    modal.hidden = false;
    $("confirm-yes").focus();
    return new Promise((resolve) => {
      const finish = (answer) => {
        modal.hidden = true;
        $("confirm-yes").removeEventListener("click", yes);
        $("confirm-no").removeEventListener("click", no);
        modal.removeEventListener("click", outside);
        document.removeEventListener("keydown", key);
        resolve(answer);
      };
      const yes = () => finish(true);
      const no = () => finish(false);
      const outside = (event) => {
        if (event.target === modal) finish(false);
      };
      const key = (event) => {
        if (event.key === "Escape") finish(false);
      };
      $("confirm-yes").addEventListener("click", yes);
      $("confirm-no").addEventListener("click", no);
      modal.addEventListener("click", outside);
      document.addEventListener("keydown", key);
    });
  }

  async function act(button, message, path) {
    if (!(await confirmAction(message))) return;
    if (button) button.disabled = true;
    try {
      await api(path, { method: "POST" });
      state.actionError = null;
      renderBanner();
    } catch (err) {
      showActionError(`${message.replace(/\?$/, "")} failed: ${err.message}`);
    } finally {
      if (button) button.disabled = false;
      refresh();
    }
  }

  // -- selection (kept in the URL's hash: #workflow=12&job=34) --------------------------------

  function readHash() {
    const params = new URLSearchParams(window.location.hash.slice(1));
    const workflow = positiveInt(params.get("workflow"), null);
    const job = positiveInt(params.get("job"), null);
    if (workflow !== state.workflowId) {
      state.workflowId = workflow;
      resetWorkflow();
    }
    state.jobId = job;
    if (job === null) $("job-panel").hidden = true;
    markSelectedNode();
  }

  function writeHash(workflow, job) {
    const params = new URLSearchParams();
    if (workflow) params.set("workflow", workflow);
    if (job) params.set("job", job);
    const hash = "#" + params.toString();
    if (window.location.hash !== hash) window.location.hash = hash;
  }

  function selectWorkflow(id) {
    writeHash(id, null);
  }

  function selectJob(id) {
    writeHash(state.workflowId, id);
  }

  function resetWorkflow() {
    state.graphKey = null;
    state.nodes = new Map();
    state.edges = [];
    state.jobs = [];
    state.jobsFetchedAt = 0;
    state.jobsFinal = false;
    state.jobsSignature = null;
    resetPager(state.pagers.jobs);
    $("graph").replaceChildren();
    $("workflow-panel").hidden = state.workflowId === null;
    $("workflow-placeholder").hidden = state.workflowId !== null;
    $("workflow-panel").dataset.workflowId = state.workflowId ?? "";
    setText($("workflow-title"), state.workflowId ? `Workflow ${state.workflowId}` : "");
  }

  // -- polling ---------------------------------------------------------------------------------

  function refresh() {
    if (state.polling) {
      state.again = true;
      return;
    }
    poll();
  }

  function schedule() {
    clearTimeout(state.timer);
    if (state.paused) return;
    state.timer = setTimeout(poll, document.hidden ? HIDDEN_POLL_MS : POLL_MS);
  }

  async function poll() {
    clearTimeout(state.timer);
    state.polling = true;
    state.again = false;
    document.body.dataset.polling = "1";
    const filter = state.filter ? "?status=" + encodeURIComponent(state.filter) : "";
    const { modelRuns, workflows, runners } = state.pagers;
    const list = (pager, path, render) =>
      readPage(pager, path, LIST_ROWS).then((rows) => rows && render(rows));
    const tasks = [
      ["model runs", list(modelRuns, "/model_runs/", renderModelRuns)],
      ["workflows", list(workflows, "/workflows/" + filter, renderWorkflows)],
      ["runners", list(runners, "/runners/", renderRunners)],
    ];
    if (state.workflowId !== null) tasks.push(["workflow", pollWorkflow(state.workflowId)]);
    if (state.jobId !== null) tasks.push(["job", pollJob(state.jobId)]);
    const results = await Promise.allSettled(tasks.map(([, p]) => p));
    const failed = results
      .map((result, i) => [tasks[i][0], result])
      .filter(([, result]) => result.status === "rejected")
      .map(([what, result]) => [what, result.reason]);
    const offline = failed.find(([, err]) => err instanceof ApiError && err.status === 0);
    if (offline) {
      state.pollErrors = [`${offline[1].message.replace(/^c/, "C")}; retrying…`];
    } else {
      state.pollErrors = failed.map(([what, err]) => {
        if (!(err instanceof ApiError)) console.error(err);
        const message = err instanceof ApiError ? err.message : `${err?.name}: ${err?.message}`;
        return `Could not load ${what}: ${message}`;
      });
    }
    document.body.dataset.polls = String(positiveInt(document.body.dataset.polls, 0) + 1);
    renderBanner();
    renderLive();
    state.polling = false;
    document.body.dataset.polling = "0";
    if (state.again) poll();
    else schedule();
  }

  // -- model runs ------------------------------------------------------------------------------

  function renderModelRuns(rows) {
    rows.sort((a, b) => b.id - a.id);
    setText($("model-runs-count"), rows.length ? `(${rows.length})` : "");
    const list = $("model-runs");
    if (!rows.length) {
      list.replaceChildren(h("p", { class: "empty" }, "No model runs."));
      return;
    }
    reconcile(list, rows, (r) => "mr-" + r.id, createModelRun, updateModelRun);
  }

  function createModelRun(row) {
    const el = h("div", { class: "item", role: "button", tabindex: "0" });
    const parts = {
      name: h("span", { class: "name" }),
      badge: h("span", { class: "badge" }),
      kill: h("button", { type: "button", class: "danger small", "data-action": "kill-model-run" }, "Kill"),
      bar: h("div", { class: "bar" }),
      info: h("span"),
      elapsed: h("span"),
    };
    addChildren(el, [
      parts.name,
      h("span", { class: "right" }, parts.badge, parts.kill),
      h("div", { class: "sub" }, parts.info, parts.bar, parts.elapsed),
    ]);
    el.parts = parts;
    const open = () => {
      if (el.row?.current_workflow) selectWorkflow(el.row.current_workflow);
    };
    el.addEventListener("click", open);
    el.addEventListener("keydown", (e) => {
      if (e.key === "Enter") open();
    });
    parts.kill.addEventListener("click", (event) => {
      event.stopPropagation();
      const name = el.row.name;
      act(parts.kill, `Kill model run ${name} (id ${el.row.id})?`, `/model_runs/${encodeURIComponent(name)}/kill`);
    });
    return el;
  }

  function updateModelRun(el, row) {
    el.row = row;
    const p = el.parts;
    el.dataset.modelRunId = row.id;
    el.dataset.modelRunName = row.name;
    el.dataset.status = row.status;
    el.classList.toggle("selected", row.current_workflow !== null && row.current_workflow === state.workflowId);
    setText(p.name, row.name);
    p.name.title = `${row.name} (${row.kind}) ${row.project_dir ?? ""}`;
    setBadge(p.badge, row.status, row.smif_status ? `smif: ${row.smif_status}` : null);
    p.kill.hidden = !UNFINISHED_WORKFLOW.has(row.status);
    const bundles = row.bundles === 1 ? "1 bundle" : `${row.bundles} bundles`;
    setText(p.info, `#${row.id} · ${bundles} · ${row.jobs_finished}/${row.jobs} jobs`);
    const done = row.status === "failed" || row.status === "cancelled" ? row.status : "succeeded";
    fillBar(p.bar, [[done, row.jobs_finished]], row.jobs);
    setText(p.elapsed, fmtSeconds(row.elapsed));
    el.title = row.error ? `error: ${row.error}` : "";
  }

  // -- workflows -------------------------------------------------------------------------------

  function renderWorkflows(rows) {
    setText($("workflows-count"), rows.length ? `(${rows.length})` : "");
    const list = $("workflows");
    if (!rows.length) {
      list.replaceChildren(h("p", { class: "empty" }, state.filter ? `No ${state.filter} workflows.` : "No workflows yet."));
      return;
    }
    reconcile(list, rows, (r) => "wf-" + r.id, createWorkflowItem, updateWorkflowItem);
  }

  function createWorkflowItem(row) {
    const el = h("div", { class: "item", role: "button", tabindex: "0" });
    const parts = {
      name: h("span", { class: "name" }),
      badge: h("span", { class: "badge" }),
      cancel: h("button", { type: "button", class: "danger small", "data-action": "cancel-workflow" }, "Cancel"),
      bar: h("div", { class: "bar" }),
      info: h("span"),
      elapsed: h("span"),
    };
    addChildren(el, [
      parts.name,
      h("span", { class: "right" }, parts.badge, parts.cancel),
      h("div", { class: "sub" }, parts.info, parts.bar, parts.elapsed),
    ]);
    el.parts = parts;
    el.addEventListener("click", () => selectWorkflow(el.row.id));
    el.addEventListener("keydown", (e) => {
      if (e.key === "Enter") selectWorkflow(el.row.id);
    });
    parts.cancel.addEventListener("click", (event) => {
      event.stopPropagation();
      cancelWorkflow(el.row, parts.cancel);
    });
    return el;
  }

  function updateWorkflowItem(el, row) {
    el.row = row;
    const p = el.parts;
    el.id = "workflow-item-" + row.id;
    el.dataset.workflowId = row.id;
    el.dataset.status = row.status;
    el.classList.toggle("selected", row.id === state.workflowId);
    setText(p.name, `#${row.id} ${row.name}`);
    p.name.title = row.name;
    setBadge(p.badge, row.status);
    p.cancel.hidden = !UNFINISHED_WORKFLOW.has(row.status);
    const origin = row.model_run_id ? ` · model run ${row.model_run_id}, bundle ${row.bundle}` : "";
    setText(p.info, `${row.jobs_finished}/${row.job_count} jobs${origin}`);
    const done = row.status === "failed" || row.status === "cancelled" ? row.status : "succeeded";
    fillBar(p.bar, [[done, row.jobs_finished]], row.job_count);
    setText(p.elapsed, fmtSeconds(between(row.submitted_at, row.finished_at)));
  }

  function cancelWorkflow(row, button) {
    act(button, `Cancel workflow ${row.id} (${row.name})?`, `/workflows/${row.id}/cancel`);
  }

  // -- the selected workflow -------------------------------------------------------------------

  async function pollWorkflow(id) {
    const workflow = await api(`/workflows/${id}`);
    if (id !== state.workflowId) return;
    renderWorkflowHead(workflow);
    const big = workflow.job_count > MAX_NODES;
    const finished = workflow.finished_at !== null;
    const signature = JSON.stringify([workflow.status, workflow.jobs]);
    const age = Date.now() - state.jobsFetchedAt;
    const every = big ? JOBS_REFRESH_MS : workflow.job_count > 500 ? 2000 : 0;
    const due =
      state.graphKey === null ||
      (!state.jobsFinal && age >= every && (signature !== state.jobsSignature || age >= JOBS_REFRESH_MS));
    if (!due) {
      if (!big) for (const job of state.jobs) updateNode(state.nodes.get(job.id), job); // timings
      return;
    }
    const fetchedAt = Date.now();
    const jobs = big ? await readPage(state.pagers.jobs, `/workflows/${id}/jobs`, TABLE_ROWS) : await allJobs(id);
    if (jobs === null || id !== state.workflowId) return;
    state.jobsFetchedAt = fetchedAt;
    state.jobsFinal = finished;
    state.jobsSignature = signature;
    state.jobs = jobs;
    if (big) renderTable(workflow);
    else renderGraph(workflow, jobs);
  }

  // Every job of a drawable workflow (at most MAX_NODES), page after page, in id order.
  async function allJobs(id) {
    const jobs = [];
    let cursor = null;
    do {
      const page = await apiPage(`/workflows/${id}/jobs`, JOBS_PAGE, cursor);
      if (id !== state.workflowId) return null;
      jobs.push(...page.rows);
      cursor = page.next;
    } while (cursor && jobs.length <= MAX_NODES);
    return jobs.sort((a, b) => a.id - b.id);
  }

  function renderWorkflowHead(wf) {
    const panel = $("workflow-panel");
    panel.dataset.workflowId = wf.id;
    panel.dataset.status = wf.status;
    setText($("workflow-title"), `#${wf.id} ${wf.name}`);
    $("workflow-title").title = wf.name;
    setBadge($("workflow-status"), wf.status);
    const cancel = $("workflow-cancel");
    cancel.hidden = wf.finished_at !== null || !UNFINISHED_WORKFLOW.has(wf.status);
    cancel.onclick = () => cancelWorkflow(wf, cancel);
    const counts = wf.jobs || {};
    const finishedJobs = JOB_STATUSES.filter((s) => !UNFINISHED_JOB.has(s)).reduce((n, s) => n + (counts[s] || 0), 0);
    const meta = [
      `${finishedJobs}/${wf.job_count} jobs finished`,
      `submitted ${fmtTime(wf.submitted_at)}`,
      `started ${fmtTime(wf.started_at)}`,
      wf.finished_at ? `finished ${fmtTime(wf.finished_at)}` : "not finished",
      `elapsed ${fmtSeconds(between(wf.submitted_at, wf.finished_at))}`,
    ];
    if (wf.model_run_id || wf.model_run) meta.push(`model run ${wf.model_run ?? wf.model_run_id}, bundle ${wf.bundle}`);
    const metaEl = $("workflow-meta");
    reconcile(metaEl, meta.map((text, i) => ({ i, text })), (m) => m.i, () => h("span"), (el, m) => setText(el, m.text));
    fillBar($("workflow-bar"), BAR_ORDER.map((s) => [s, counts[s] || 0]), wf.job_count);
    renderLegend(counts);
  }

  function renderLegend(counts) {
    reconcile(
      $("legend"),
      JOB_STATUSES,
      (s) => s,
      (s) => {
        const li = h("li", { "data-status": s }, h("span", { class: "swatch seg-" + s }), s + " ", h("span", { class: "n" }));
        return li;
      },
      (li, s) => setText(li.querySelector(".n"), String(counts[s] || 0)),
    );
  }

  // -- the DAG ---------------------------------------------------------------------------------

  // Layer = longest path from a root; order within layers by a few barycentre sweeps.
  function layout(jobs) {
    const byId = new Map(jobs.map((j) => [j.id, j]));
    const children = new Map(jobs.map((j) => [j.id, []]));
    const parents = new Map();
    const indegree = new Map();
    for (const job of jobs) {
      const ps = (job.parents || []).filter((p) => byId.has(p));
      parents.set(job.id, ps);
      indegree.set(job.id, ps.length);
      for (const p of ps) children.get(p).push(job.id);
    }
    const layer = new Map();
    const queue = jobs.filter((j) => indegree.get(j.id) === 0).map((j) => j.id);
    for (const id of queue) layer.set(id, 0);
    for (let i = 0; i < queue.length; i++) {
      const id = queue[i];
      for (const c of children.get(id)) {
        layer.set(c, Math.max(layer.get(c) ?? 0, layer.get(id) + 1));
        indegree.set(c, indegree.get(c) - 1);
        if (indegree.get(c) === 0) queue.push(c);
      }
    }
    for (const job of jobs) if (!layer.has(job.id)) layer.set(job.id, 0); // a cycle cannot be stored
    const depth = Math.max(0, ...layer.values()) + 1;
    const layers = Array.from({ length: depth }, () => []);
    for (const job of jobs) layers[layer.get(job.id)].push(job.id);

    const rank = new Map();
    const setRanks = () =>
      layers.forEach((ids) => ids.forEach((id, i) => rank.set(id, (i + 0.5) / ids.length)));
    setRanks();
    const sweep = (ids, neighbours) => {
      const key = new Map(
        ids.map((id) => {
          const ns = neighbours.get(id);
          const mean = ns.length ? ns.reduce((s, n) => s + rank.get(n), 0) / ns.length : rank.get(id);
          return [id, mean];
        }),
      );
      ids.sort((a, b) => key.get(a) - key.get(b) || a - b);
    };
    for (let round = 0; round < 4; round++) {
      for (let l = 1; l < depth; l++) {
        sweep(layers[l], parents);
        setRanks();
      }
      for (let l = depth - 2; l >= 0; l--) {
        sweep(layers[l], children);
        setRanks();
      }
    }

    const tallest = Math.max(1, ...layers.map((ids) => ids.length));
    const position = new Map();
    layers.forEach((ids, l) => {
      const offset = ((tallest - ids.length) * (NODE_H + GAP_Y)) / 2;
      ids.forEach((id, i) => {
        position.set(id, { x: PAD + l * (NODE_W + GAP_X), y: PAD + offset + i * (NODE_H + GAP_Y) });
      });
    });
    return {
      position,
      parents,
      width: PAD * 2 + depth * NODE_W + (depth - 1) * GAP_X,
      height: PAD * 2 + tallest * NODE_H + (tallest - 1) * GAP_Y,
    };
  }

  function truncate(text, max) {
    return text.length > max ? text.slice(0, max - 1) + "…" : text;
  }

  function renderGraph(wf, jobs) {
    const key = `${wf.id}:${jobs.length}:graph`;
    if (state.graphKey !== key) buildGraph(jobs, key);
    for (const job of jobs) updateNode(state.nodes.get(job.id), job);
    markSelectedNode();
  }

  function buildGraph(jobs, key) {
    const { position, parents, width, height } = layout(jobs);
    const root = svg("svg", {
      id: "dag",
      xmlns: SVG_NS,
      width: Math.ceil(width),
      height: Math.ceil(height),
      viewBox: `0 0 ${Math.ceil(width)} ${Math.ceil(height)}`,
      role: "img",
      "aria-label": `DAG of ${jobs.length} jobs`,
      "data-jobs": jobs.length,
    });
    root.append(
      svg(
        "defs",
        null,
        svg(
          "marker",
          { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
          svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#8b95a3" }),
        ),
      ),
    );
    const edgeLayer = svg("g", { class: "edges" });
    const nodeLayer = svg("g", { class: "nodes" });
    root.append(edgeLayer, nodeLayer);
    state.edges = [];
    for (const job of jobs) {
      const to = position.get(job.id);
      for (const p of parents.get(job.id)) {
        const from = position.get(p);
        const x1 = from.x + NODE_W;
        const y1 = from.y + NODE_H / 2;
        const x2 = to.x - 2;
        const y2 = to.y + NODE_H / 2;
        const dx = Math.max(24, (x2 - x1) / 2);
        const path = svg("path", {
          class: "edge",
          d: `M ${x1} ${y1} C ${x1 + dx} ${y1}, ${x2 - dx} ${y2}, ${x2} ${y2}`,
          "marker-end": "url(#arrow)",
          "data-parent": p,
          "data-child": job.id,
        });
        edgeLayer.append(path);
        state.edges.push({ parent: p, child: job.id, path });
      }
    }
    state.nodes = new Map();
    for (const job of jobs) {
      const { x, y } = position.get(job.id);
      const title = svg("title");
      const label = svg("text", { x: 10, y: 17 }, truncate(job.key, 22));
      const sub = svg("text", { class: "st", x: 10, y: 31 });
      const g = svg(
        "g",
        {
          class: "node",
          id: `job-node-${job.id}`,
          transform: `translate(${x},${y})`,
          "data-job-id": job.id,
          "data-job-key": job.key,
          tabindex: "0",
          role: "button",
        },
        title,
        svg("rect", { width: NODE_W, height: NODE_H, rx: 6, ry: 6 }),
        label,
        sub,
      );
      g.parts = { title, sub };
      g.addEventListener("click", () => selectJob(job.id));
      g.addEventListener("keydown", (e) => {
        if (e.key === "Enter") selectJob(job.id);
      });
      nodeLayer.append(g);
      state.nodes.set(job.id, g);
    }
    const graph = $("graph");
    graph.dataset.mode = "dag";
    graph.replaceChildren(root);
    state.graphKey = key;
  }

  function jobSummary(job) {
    const tries = job.max_attempts > 1 || job.attempts > 1 ? ` · try ${job.attempts}/${job.max_attempts}` : "";
    let time = "";
    if (job.started_at) time = " · " + fmtSeconds(between(job.started_at, job.finished_at));
    return `${job.status}${tries}${time}`;
  }

  function updateNode(g, job) {
    if (!g) return;
    if (g.getAttribute("data-status") !== job.status) {
      g.setAttribute("data-status", job.status);
      g.setAttribute("class", `node ${statusClass(job.status)}${job.id === state.jobId ? " selected" : ""}`);
    }
    setText(g.parts.sub, truncate(jobSummary(job), 30));
    const lines = [`${job.key}`, `status: ${job.status}`, `attempts: ${job.attempts}/${job.max_attempts}`];
    if (job.runner) lines.push(`runner: ${job.runner}`);
    if (job.error) lines.push(`error: ${truncate(job.error, 200)}`);
    setText(g.parts.title, lines.join("\n"));
  }

  function markSelectedNode() {
    for (const [id, g] of state.nodes) {
      const cls = g.getAttribute("class") || "node";
      const selected = id === state.jobId;
      if (cls.includes(" selected") !== selected) {
        g.setAttribute("class", selected ? cls + " selected" : cls.replace(" selected", ""));
      }
    }
    for (const edge of state.edges) {
      const hot = edge.parent === state.jobId || edge.child === state.jobId;
      edge.path.setAttribute("class", hot ? "edge hot" : "edge");
    }
    for (const row of document.querySelectorAll("#jobs-table tbody tr")) {
      row.classList.toggle("selected", Number(row.dataset.jobId) === state.jobId);
    }
  }

  // -- a big workflow: counts (above) and a table ------------------------------------------------

  function renderTable(wf) {
    const key = `${wf.id}:table`;
    const graph = $("graph");
    if (state.graphKey !== key) {
      state.nodes = new Map();
      state.edges = [];
      const statusSelect = h(
        "select",
        { id: "jobs-table-status", "aria-label": "Show jobs with status" },
        h("option", { value: "" }, "all statuses"),
        JOB_STATUSES.map((s) => h("option", { value: s }, s)),
      );
      statusSelect.value = state.tableStatus;
      statusSelect.addEventListener("change", () => {
        state.tableStatus = statusSelect.value;
        fillTable();
      });
      const search = h("input", { id: "jobs-table-search", type: "search", placeholder: "key on this page contains…", value: state.tableSearch });
      search.addEventListener("input", () => {
        state.tableSearch = search.value;
        fillTable();
      });
      const table = h(
        "table",
        { id: "jobs-table", class: "table" },
        h("thead", null, h("tr", null, ["id", "key", "status", "attempts", "runner", "started", "time", "exit", "error"].map((c) => h("th", null, c)))),
        h("tbody"),
      );
      graph.dataset.mode = "table";
      graph.replaceChildren(
        h(
          "div",
          { class: "table-tools" },
          h("span", { id: "jobs-table-note" }),
          h("span", { class: "spacer" }),
          statusSelect,
          search,
          h(
            "span",
            { id: "jobs-pager", class: "pager", hidden: true },
            h("button", { id: "jobs-prev", type: "button", class: "small", onclick: () => turnPage(state.pagers.jobs, false) }, "‹ Previous"),
            h("span", { id: "jobs-page" }),
            h("button", { id: "jobs-next", type: "button", class: "small", onclick: () => turnPage(state.pagers.jobs, true) }, "Next ›"),
          ),
        ),
        h("div", { class: "big-table" }, table),
      );
      state.graphKey = key;
    }
    state.tableTotal = wf.job_count;
    renderPager(state.pagers.jobs);
    fillTable();
  }

  function fillTable() {
    const tbody = document.querySelector("#jobs-table tbody");
    if (!tbody) return;
    // The page's jobs in the API's (key) order; the filters narrow this page only.
    const needle = state.tableSearch.toLowerCase();
    const shown = state.jobs.filter(
      (j) => (!state.tableStatus || j.status === state.tableStatus) && (!needle || j.key.toLowerCase().includes(needle)),
    );
    const first = (state.pagers.jobs.cursors.length - 1) * TABLE_ROWS + 1;
    const range = state.jobs.length ? `jobs ${first}–${first + state.jobs.length - 1}` : "no jobs";
    const filtered = shown.length < state.jobs.length ? `, ${shown.length} of them shown` : "";
    setText(
      $("jobs-table-note"),
      `${state.tableTotal} jobs: too many to draw (over ${MAX_NODES}); ${range} by key${filtered}`,
    );
    tbody.replaceChildren(
      ...shown.map((j) =>
        h(
          "tr",
          {
            class: "clickable" + (j.id === state.jobId ? " selected" : ""),
            "data-job-id": j.id,
            "data-job-key": j.key,
            "data-status": j.status,
            onclick: () => selectJob(j.id),
          },
          h("td", { class: "num" }, j.id),
          h("td", null, j.key),
          h("td", null, badge(j.status)),
          h("td", { class: "num" }, `${j.attempts}/${j.max_attempts}`),
          h("td", null, j.runner ?? "—"),
          h("td", null, fmtTime(j.started_at)),
          h("td", { class: "num" }, j.started_at ? fmtSeconds(between(j.started_at, j.finished_at)) : "—"),
          h("td", { class: "num" }, j.exit_code ?? "—"),
          h("td", { class: "err", title: j.error ?? "" }, j.error ?? ""),
        ),
      ),
    );
  }

  // -- job detail ------------------------------------------------------------------------------

  async function pollJob(id) {
    const job = await api(`/jobs/${id}`);
    if (id !== state.jobId) return;
    renderJob(job);
  }

  function renderJob(job) {
    const panel = $("job-panel");
    panel.hidden = false;
    panel.dataset.jobId = job.id;
    panel.dataset.jobKey = job.key;
    panel.dataset.status = job.status;
    setText($("job-title"), `${job.key}`);
    $("job-title").title = `job ${job.id} of workflow ${job.workflow_id}`;
    setBadge($("job-status"), job.status);
    const cancel = $("job-cancel");
    cancel.hidden = !UNFINISHED_JOB.has(job.status);
    cancel.onclick = () => act(cancel, `Cancel job ${job.key} (id ${job.id}) and everything after it?`, `/jobs/${job.id}/cancel`);

    const duration = job.started_at ? fmtSeconds(between(job.started_at, job.finished_at)) : "—";
    const fields = [
      ["id", job.id],
      ["workflow", job.workflow_id],
      ["kind", job.kind],
      ["status", job.status],
      ["attempts", `${job.attempts} of ${job.max_attempts}`],
      ["runner", job.runner ?? "—"],
      ["lease-expires", fmtTime(job.lease_expires_at)],
      ["priority", job.priority],
      ["timeout", job.timeout_seconds ? fmtSeconds(job.timeout_seconds) : "—"],
      ["created", fmtTime(job.created_at)],
      ["started", fmtTime(job.started_at)],
      ["finished", fmtTime(job.finished_at)],
      ["duration", duration],
      ["exit-code", job.exit_code ?? "—"],
      ["payload", json(job.payload)],
      ["result", json(job.result)],
    ];
    for (const name of ["model", "operation", "timestep", "decision"]) {
      if (job[name] !== null && job[name] !== undefined) fields.push([name, job[name]]);
    }
    reconcile(
      $("job-fields"),
      fields,
      ([name]) => name,
      ([name]) => {
        const frag = h("div", { class: "field" });
        frag.append(h("dt", null, name.replace("-", " ")), h("dd", { id: `job-field-${name}`, "data-field": name }));
        return frag;
      },
      (el, [, value]) => setText(el.querySelector("dd"), value),
    );

    const error = $("job-error");
    setText(error, job.error || "(none)");
    error.classList.toggle("none", !job.error);
    const log = $("job-log");
    setText(log, job.log_tail || "(no log)");
    log.classList.toggle("none", !job.log_tail);

    const events = job.events || [];
    const tbody = $("job-events").querySelector("tbody");
    const signature = `${job.id}:${events.length}`;
    if (tbody.dataset.signature !== signature) {
      tbody.dataset.signature = signature;
      tbody.replaceChildren(
        ...events.map((e) =>
          h(
            "tr",
            null,
            h("td", null, fmtTime(e.at)),
            h("td", null, e.from_status ?? "—"),
            h("td", null, e.to_status ?? "—"),
            h("td", { class: "num" }, e.attempt ?? ""),
            h("td", null, e.actor ?? ""),
            h("td", null, e.reason ?? ""),
          ),
        ),
      );
    }
  }

  // -- runners ---------------------------------------------------------------------------------

  function renderRunners(rows) {
    setText($("runners-count"), rows.length ? `(${rows.length})` : "");
    const box = $("runners");
    if (!rows.length) {
      box.replaceChildren(h("p", { class: "empty" }, "No runners have registered."));
      return;
    }
    let table = $("runners-table");
    if (!table) {
      table = h(
        "table",
        { id: "runners-table", class: "table" },
        h("thead", null, h("tr", null, ["runner", "state", "busy", "heartbeat", "done", "failed"].map((c) => h("th", null, c)))),
        h("tbody"),
      );
      box.replaceChildren(table);
    }
    reconcile(
      table.querySelector("tbody"),
      rows,
      (r) => "runner-" + r.name,
      () => {
        const tr = h("tr");
        tr.parts = {
          name: h("td"),
          state: h("span", { class: "badge" }),
          busyText: h("span"),
          bar: h("div", { class: "bar" }),
          heartbeat: h("td", { class: "num" }),
          done: h("td", { class: "num" }),
          failed: h("td", { class: "num" }),
        };
        const p = tr.parts;
        tr.append(p.name, h("td", null, p.state), h("td", null, p.busyText, p.bar), p.heartbeat, p.done, p.failed);
        return tr;
      },
      (tr, r) => {
        const p = tr.parts;
        tr.dataset.runner = r.name;
        tr.dataset.state = r.state;
        setText(p.name, r.name);
        p.name.title = `${r.host ?? "?"} pid ${r.pid ?? "?"}`;
        setBadge(p.state, r.state);
        setText(p.busyText, `${r.busy}/${r.slots}`);
        fillBar(p.bar, [["running", r.busy]], r.slots);
        setText(p.heartbeat, r.heartbeat_age === null ? "never" : `${fmtSeconds(r.heartbeat_age)} ago`);
        setText(p.done, r.jobs_succeeded);
        setText(p.failed, r.jobs_failed);
      },
    );
  }

  // -- results view: pick a model run, an output and a timestep; a table and an SVG chart ------
  // Values come from /api/v1/model_runs/{name}/results/… (a page at a time, every page read up
  // to RESULT_ROWS rows); nothing here polls. Numbers are shown as JavaScript prints them
  // (the shortest text that reads back as the same double).

  const RESULT_ROWS = 20000; // most rows read for one output's table and chart
  const TABLE_SHOWN = 1000; // most rows put in the table
  const CHART_W = 720;
  const CHART_H = 300;
  const MARGIN = { top: 16, right: 16, bottom: 64, left: 72 };

  const view = {
    open: false,
    outputs: [], // the run's list: {model, output, dims, unit, timesteps, results: [{timestep, decision}]}
    values: null, // the shown file's values (the API's data)
    cache: new Map(), // values URL -> data
    seq: 0, // bumped by each selection: answers to an older one are dropped
  };

  function valuesPath(run, entry, timestep, decision) {
    const params = new URLSearchParams({ timestep: String(timestep) });
    if (decision !== null && decision !== undefined) params.set("decision", String(decision));
    const name = encodeURIComponent(run);
    return `/model_runs/${name}/results/${encodeURIComponent(entry.model)}/${encodeURIComponent(entry.output)}?${params}`;
  }

  async function readValues(path) {
    if (view.cache.has(path)) return view.cache.get(path);
    let data = null;
    let cursor = null;
    const rows = [];
    do {
      const params = new URLSearchParams({ limit: String(MAX_LIMIT) });
      if (cursor) params.set("cursor", cursor);
      const body = await apiBody(`${path}&${params}`);
      data = body.data;
      rows.push(...data.rows);
      cursor = body.next ?? null;
    } while (cursor && rows.length < RESULT_ROWS);
    const all = { ...data, rows };
    view.cache.set(path, all);
    return all;
  }

  function resultsMessage(text) {
    setText($("results-message"), text);
    $("results-message").hidden = !text;
  }

  function fillSelect(select, options, keep) {
    const before = keep ?? select.value;
    select.replaceChildren(...options.map(([value, label]) => h("option", { value }, label)));
    if (options.some(([value]) => value === before)) select.value = before;
    select.disabled = options.length === 0;
  }

  function currentEntry() {
    return view.outputs[Number.parseInt($("results-output").value, 10)] ?? null;
  }

  async function openResults(show) {
    view.open = show;
    document.body.classList.toggle("results-view", show);
    $("results-panel").hidden = !show;
    $("results-toggle").setAttribute("aria-pressed", String(show));
    if (!show) return;
    const seq = ++view.seq;
    try {
      const page = await apiPage("/model_runs/", MAX_LIMIT);
      if (seq !== view.seq) return;
      const names = [...new Set(page.rows.map((r) => r.name).filter(Boolean))].sort();
      fillSelect($("results-run"), names.map((n) => [n, n]));
      if (!names.length) {
        resultsMessage("No model run has been started here yet.");
        return;
      }
      await selectRun();
    } catch (err) {
      resultsMessage(`Cannot list model runs: ${err.message}`);
    }
  }

  async function selectRun() {
    const run = $("results-run").value;
    const seq = ++view.seq;
    view.outputs = [];
    fillSelect($("results-output"), []);
    clearResults();
    resultsMessage("Loading results…");
    try {
      const body = await apiBody(`/model_runs/${encodeURIComponent(run)}/results/`);
      if (seq !== view.seq) return;
      view.outputs = body.data;
      if (!view.outputs.length) {
        resultsMessage(`Model run ${run} has no results yet.`);
        return;
      }
      fillSelect(
        $("results-output"),
        view.outputs.map((o, i) => [String(i), `${o.model} · ${o.output}`]),
      );
      selectOutput();
    } catch (err) {
      if (seq === view.seq) resultsMessage(`No results for ${run}: ${err.message}`);
    }
  }

  function selectOutput() {
    const entry = currentEntry();
    if (!entry) return;
    fillSelect($("results-timestep"), entry.timesteps.map((t) => [String(t), String(t)]));
    fillSelect($("results-dim"), (entry.dims || []).map((d) => [d, d]));
    setText($("results-unit"), entry.unit ? `${entry.model} · ${entry.output} (${entry.unit})` : "");
    selectTimestep();
  }

  function selectTimestep() {
    const entry = currentEntry();
    if (!entry) return;
    const t = Number($("results-timestep").value);
    const decisions = entry.results.filter((r) => r.timestep === t).map((r) => r.decision);
    const last = String(Math.max(...decisions));
    fillSelect($("results-decision"), decisions.map((d) => [String(d), String(d)]), last);
    showValues();
  }

  async function showValues() {
    const entry = currentEntry();
    if (!entry) return;
    const run = $("results-run").value;
    const path = valuesPath(run, entry, $("results-timestep").value, $("results-decision").value);
    const seq = ++view.seq;
    resultsMessage("Loading values…");
    try {
      const data = await readValues(path);
      if (seq !== view.seq) return;
      view.values = data;
      const csv = $("results-csv");
      csv.href = `${API}${path}&format=csv`;
      csv.hidden = false;
      renderResultsTable(data);
      fillSelect(
        $("results-coord"),
        data.rows.map((row, i) => [String(i), coordLabel(data, row)]),
      );
      resultsMessage(
        data.total > data.rows.length
          ? `Showing the first ${data.rows.length} of ${data.total} rows.`
          : "",
      );
      await renderChart(seq);
    } catch (err) {
      if (seq === view.seq) resultsMessage(`Cannot read the values: ${err.message}`);
    }
  }

  function clearResults() {
    view.values = null;
    $("results-table").querySelector("thead tr").replaceChildren();
    $("results-table").querySelector("tbody").replaceChildren();
    $("results-chart").replaceChildren();
    $("results-csv").hidden = true;
  }

  function valueColumn(data) {
    return data.columns[data.columns.length - 1];
  }

  function coordLabel(data, row) {
    const dims = data.columns.slice(0, -1);
    return dims.length ? dims.map((d) => String(row[d])).join(" · ") : "(all)";
  }

  function renderResultsTable(data) {
    const table = $("results-table");
    table.dataset.model = data.model;
    table.dataset.output = data.output;
    table.dataset.timestep = data.timestep;
    table.dataset.decision = data.decision;
    table.querySelector("thead tr").replaceChildren(...data.columns.map((c) => h("th", null, c)));
    const value = valueColumn(data);
    table.querySelector("tbody").replaceChildren(
      ...data.rows.slice(0, TABLE_SHOWN).map((row) =>
        h(
          "tr",
          null,
          data.columns.map((c) =>
            c === value
              ? h("td", { class: "num", "data-value": String(row[c]) }, fmtValue(row[c]))
              : h("td", null, String(row[c])),
          ),
        ),
      ),
    );
  }

  function fmtValue(v) {
    return v === null || v === undefined ? "" : String(v);
  }

  async function renderChart(seq) {
    const data = view.values;
    if (!data) return;
    const kind = $("results-chart-kind").value;
    $("results-dim-label").hidden = kind !== "bars";
    $("results-coord-label").hidden = kind !== "line";
    const box = $("results-chart");
    if (kind === "bars") {
      box.replaceChildren(barChart(data, $("results-dim").value));
      return;
    }
    const entry = currentEntry();
    const row = data.rows[Number.parseInt($("results-coord").value, 10)] ?? data.rows[0];
    const dims = data.columns.slice(0, -1);
    const run = $("results-run").value;
    const points = [];
    for (const t of entry.timesteps) {
      const at = await readValues(valuesPath(run, entry, t, null)); // each timestep's last decision
      if (seq !== view.seq) return;
      const match = at.rows.find((r) => dims.every((d) => r[d] === row[d]));
      if (match && typeof match[valueColumn(at)] === "number") points.push([t, match[valueColumn(at)]]);
    }
    box.replaceChildren(lineChart(points, `${coordLabel(data, row)} over timesteps`));
  }

  // [min, max] widened to include 0, and about five round ticks across it.
  function scale(values) {
    let lo = Math.min(0, ...values);
    let hi = Math.max(0, ...values);
    if (lo === hi) hi = lo + 1;
    const raw = (hi - lo) / 5;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
    lo = Math.floor(lo / step) * step;
    hi = Math.ceil(hi / step) * step;
    const ticks = [];
    for (let v = lo; v <= hi + step / 2; v += step) ticks.push(Number(v.toPrecision(12)));
    return { lo, hi, ticks };
  }

  function chartFrame(kind, yScale, title) {
    const root = svg("svg", {
      width: CHART_W,
      height: CHART_H,
      viewBox: `0 0 ${CHART_W} ${CHART_H}`,
      role: "img",
      "aria-label": title,
      "data-kind": kind,
    });
    const plotH = CHART_H - MARGIN.top - MARGIN.bottom;
    const y = (v) => MARGIN.top + plotH - ((v - yScale.lo) / (yScale.hi - yScale.lo)) * plotH;
    for (const t of yScale.ticks) {
      root.append(
        svg("line", { class: "grid", x1: MARGIN.left, x2: CHART_W - MARGIN.right, y1: y(t), y2: y(t) }),
        svg("text", { class: "tick", x: MARGIN.left - 6, y: y(t) + 4, "text-anchor": "end" }, String(t)),
      );
    }
    root.append(
      svg("line", { class: "axis", x1: MARGIN.left, x2: MARGIN.left, y1: MARGIN.top, y2: MARGIN.top + plotH }),
      svg("line", { class: "axis", x1: MARGIN.left, x2: CHART_W - MARGIN.right, y1: y(0), y2: y(0) }),
      svg("text", { x: MARGIN.left, y: CHART_H - 6 }, title),
    );
    return { root, y, plotW: CHART_W - MARGIN.left - MARGIN.right, plotH };
  }

  // One bar per coordinate of ``dim``: the value, or the sum over the other dimensions.
  function barChart(data, dim) {
    const value = valueColumn(data);
    const sums = new Map();
    for (const row of data.rows) {
      const key = dim ? String(row[dim]) : "(all)";
      if (typeof row[value] === "number") sums.set(key, (sums.get(key) ?? 0) + row[value]);
    }
    const bars = [...sums.entries()];
    const others = data.columns.length > 2 ? " (summed over the other dimensions)" : "";
    const frame = chartFrame("bars", scale(bars.map(([, v]) => v)), `${value} by ${dim || "value"}${others}`);
    const slot = frame.plotW / Math.max(bars.length, 1);
    bars.forEach(([label, v], i) => {
      const x = MARGIN.left + i * slot + slot * 0.15;
      const top = Math.min(frame.y(v), frame.y(0));
      const rect = svg("rect", {
        class: "result-bar",
        x,
        y: top,
        width: slot * 0.7,
        height: Math.max(Math.abs(frame.y(0) - frame.y(v)), 1),
        "data-label": label,
        "data-value": String(v),
      });
      rect.append(svg("title", null, `${label}: ${v}`));
      const tx = x + slot * 0.35;
      const ty = MARGIN.top + frame.plotH + 14;
      frame.root.append(
        rect,
        svg("text", { class: "tick", x: tx, y: ty, "text-anchor": "middle" }, label.length > 14 ? label.slice(0, 13) + "…" : label),
      );
    });
    return frame.root;
  }

  function lineChart(points, title) {
    const frame = chartFrame("line", scale(points.map(([, v]) => v)), title);
    if (!points.length) return frame.root;
    const ts = points.map(([t]) => t);
    const t0 = Math.min(...ts);
    const span = Math.max(...ts) - t0 || 1;
    const x = (t) => MARGIN.left + 20 + ((t - t0) / span) * (frame.plotW - 40);
    const d = points.map(([t, v], i) => `${i ? "L" : "M"}${x(t)},${frame.y(v)}`).join(" ");
    frame.root.append(svg("path", { class: "line", d }));
    for (const [t, v] of points) {
      const dot = svg("circle", { class: "point", cx: x(t), cy: frame.y(v), r: 4, "data-timestep": t, "data-value": String(v) });
      dot.append(svg("title", null, `${t}: ${v}`));
      frame.root.append(
        dot,
        svg("text", { class: "tick", x: x(t), y: MARGIN.top + frame.plotH + 14, "text-anchor": "middle" }, String(t)),
      );
    }
    return frame.root;
  }

  function startResults() {
    $("results-toggle").addEventListener("click", () => openResults(!view.open));
    $("results-close").addEventListener("click", () => openResults(false));
    $("results-run").addEventListener("change", () => {
      view.cache.clear();
      selectRun();
    });
    $("results-output").addEventListener("change", selectOutput);
    $("results-timestep").addEventListener("change", selectTimestep);
    $("results-decision").addEventListener("change", showValues);
    for (const id of ["results-chart-kind", "results-dim", "results-coord"]) {
      $(id).addEventListener("change", () => renderChart(++view.seq));
    }
  }

  // -- start -----------------------------------------------------------------------------------

  function start() {
    $("banner-close").addEventListener("click", () => {
      state.actionError = null;
      state.pollErrors = [];
      renderBanner();
    });
    $("pause").addEventListener("click", () => {
      state.paused = !state.paused;
      $("pause").setAttribute("aria-pressed", String(state.paused));
      setText($("pause"), state.paused ? "Resume" : "Pause");
      renderLive();
      if (!state.paused) refresh();
      else clearTimeout(state.timer);
    });
    $("workflow-filter").addEventListener("change", (event) => {
      state.filter = event.target.value;
      resetPager(state.pagers.workflows);
      $("workflows").replaceChildren();
      refresh();
    });
    for (const pager of [state.pagers.modelRuns, state.pagers.workflows, state.pagers.runners]) {
      $(`${pager.name}-prev`).addEventListener("click", () => turnPage(pager, false));
      $(`${pager.name}-next`).addEventListener("click", () => turnPage(pager, true));
    }
    $("job-close").addEventListener("click", () => writeHash(state.workflowId, null));
    window.addEventListener("hashchange", () => {
      readHash();
      refresh();
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && !state.paused) refresh();
    });
    window.addEventListener("unhandledrejection", (event) => {
      showActionError(`Unexpected error: ${event.reason?.message ?? event.reason}`);
    });
    $("sign-out").addEventListener("click", async () => {
      await fetch("/logout", { method: "POST", cache: "no-store" });
      window.location.assign("/login");
    });
    fetch("/api/auth/me", { cache: "no-store", headers: { Accept: "application/json" } })
      .then((r) => (r.ok ? r.json() : null))
      .then((body) => {
        if (!body) return;
        setText($("user"), `${body.data.name} (${body.data.role})`);
        document.body.dataset.role = body.data.role;
      })
      .catch(() => {});
    startResults();
    resetWorkflow();
    readHash();
    poll();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
