// The imagegen page: submit a job, follow it live (Server-Sent Events, else polling), show the images.
// Every URL is relative to the page, so it also works behind a proxy that serves the API under a
// path (https://example.com/imagegen/).
"use strict";

const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const EVENT_TYPES = ["queued", "started", "progress", "succeeded", "failed", "canceled"];
const POLL_MS = 400;
// Polls are long-polls: the server answers when the job ends or after this many seconds, so a
// followed job costs 12 requests a minute of its key's rate limit, not 150 (progress every 5 s).
const LONG_POLL_S = 5;
const MAX_WAIT_MS = 30_000; // longest pause between polls while the server refuses or is unreachable
const RECHECK_MS = 5_000; // how often the "not ready" line is checked again
const KEY_STORE = "imagegen.apiKey"; // localStorage: the API key, when the server requires one

const $ = (id) => document.getElementById(id);
const form = $("form");
const ui = {
  generate: $("generate"),
  cancel: $("cancel"),
  job: $("job"),
  status: $("status"),
  steps: $("steps"),
  link: $("job-link"),
  bar: $("bar-fill"),
  error: $("error"),
  gallery: $("gallery"),
  server: $("server"),
};

let active = null; // {id, prompt, source, timer, done}
let submitting = false; // a POST /generate is out: a second submit (double click, Enter) waits for it

form.api_key.value = localStorage.getItem(KEY_STORE) || "";
form.api_key.addEventListener("change", () => {
  const key = form.api_key.value.trim();
  if (key) localStorage.setItem(KEY_STORE, key);
  else localStorage.removeItem(KEY_STORE);
});

// With a key, every request carries `Authorization: Bearer <key>`.
function authorized(headers) {
  const key = form.api_key.value.trim();
  return key ? { ...headers, authorization: `Bearer ${key}` } : headers;
}

async function api(method, path, body) {
  const init = { method, headers: authorized({ accept: "application/json" }) };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  let data = null;
  try {
    data = await res.json();
  } catch (_) {
    // not JSON (e.g. a proxy's error page): the status says enough
  }
  if (!res.ok) {
    let message = (data && data.error && data.error.message) || `HTTP ${res.status}`;
    if (res.status === 401) message = `${message}: this server requires an API key (enter it above)`;
    const err = new Error(message);
    err.status = res.status;
    // 429 (rate limit, full queue) and 503 say when to come back.
    const retryAfter = Number.parseFloat(res.headers.get("retry-after") || "");
    if (Number.isFinite(retryAfter) && retryAfter >= 0) err.retryAfter = retryAfter;
    throw err;
  }
  return { status: res.status, data };
}

function readParams() {
  const params = { prompt: form.prompt.value.trim() };
  const negative = form.negative_prompt.value.trim();
  if (negative) params.negative_prompt = negative;
  for (const name of ["num_images", "num_inference_steps", "seed", "width", "height"]) {
    const value = form[name].value.trim();
    if (value !== "") params[name] = Number.parseInt(value, 10);
  }
  const guidance = form.guidance_scale.value.trim();
  if (guidance !== "") params.guidance_scale = Number.parseFloat(guidance);
  return params;
}

// #status is the page's live region (role="status"): its text changes only when the job's state
// does (or `text` says more about it), so a screen reader announces "running" once, not every
// step; the step count (#steps) and the bar follow each progress event without being announced.
function showStatus(status, progress, text) {
  ui.job.hidden = false;
  if (ui.status.dataset.status !== status) {
    ui.status.dataset.status = status;
    text = text || status;
  }
  if (text && ui.status.textContent !== text) ui.status.textContent = text;
  const total = progress ? progress.total : 0;
  const step = progress ? progress.step : 0;
  const steps = status === "running" && total ? ` — step ${step} of ${total}` : "";
  if (ui.steps.textContent !== steps) ui.steps.textContent = steps;
  const pct = status === "succeeded" ? 100 : total ? Math.round((100 * step) / total) : 0;
  ui.bar.style.width = `${pct}%`;
  ui.bar.parentElement.setAttribute("aria-valuenow", String(pct));
}

function showError(message) {
  ui.job.hidden = false;
  ui.error.hidden = !message;
  ui.error.textContent = message || "";
}

function setBusy(busy) {
  ui.generate.disabled = busy;
  ui.cancel.disabled = !busy;
}

function stopFollowing(job) {
  if (job.source) job.source.close();
  if (job.timer) clearTimeout(job.timer);
  job.source = null;
  job.timer = null;
}

// Live updates over SSE; if the server has no event stream (or it fails before saying anything),
// fall back to polling GET /jobs/{id}.
function follow(job) {
  // EventSource cannot send an Authorization header: with a key, poll.
  if (!window.EventSource || form.api_key.value.trim()) return poll(job);
  const source = new EventSource(`jobs/${encodeURIComponent(job.id)}/events`);
  job.source = source;
  let heard = false;
  const onEvent = (message) => {
    heard = true;
    let event;
    try {
      event = JSON.parse(message.data);
    } catch (_) {
      return;
    }
    // An ended job is shown once it has been read (render), with its time or its reason.
    if (TERMINAL.has(event.status)) finish(job);
    else showStatus(event.status, event.progress);
  };
  for (const type of EVENT_TYPES) source.addEventListener(type, onEvent);
  source.onmessage = onEvent;
  source.onerror = () => {
    if (job.done) return;
    // CLOSED: refused (404, wrong type); CONNECTING before any event: likely no SSE route at all.
    // After events, a drop reconnects by itself and resumes with Last-Event-ID.
    if (source.readyState === EventSource.CLOSED || !heard) {
      source.close();
      job.source = null;
      poll(job);
    }
  };
}

async function poll(job) {
  if (job.done) return;
  const asked = Date.now();
  try {
    const { data } = await api("GET", `jobs/${encodeURIComponent(job.id)}?wait=${LONG_POLL_S}`);
    if (job.done) return; // settled while the request was out (a cancel answered first)
    if (job.failures) {
      job.failures = 0;
      showError("");
    }
    if (TERMINAL.has(data.status)) return render(job, data);
    showStatus(data.status, data.progress);
  } catch (err) {
    return pollLater(job, err);
  }
  // At once after a wait; a server that answered early (shutting down) is asked again in a moment.
  job.timer = setTimeout(() => poll(job), Math.max(0, POLL_MS - (Date.now() - asked)));
}

// A poll that failed: the job is gone (404, 410) or the key is refused (401, 403): stop following
// it. Otherwise (rate limited, the server or its Redis unavailable, the network down) keep
// following, after the server's Retry-After or a growing pause, and say why.
function pollLater(job, err) {
  if (job.done) return;
  if (err.status === 404 || err.status === 410) return end(job, err.message);
  if (err.status === 401 || err.status === 403) {
    return end(job, `${err.message} (job ${job.id} goes on without this page)`);
  }
  job.failures = (job.failures || 0) + 1;
  const backoff = POLL_MS * 2 ** job.failures;
  const wait = Math.min(Math.max(err.retryAfter !== undefined ? err.retryAfter * 1000 : backoff, POLL_MS), MAX_WAIT_MS);
  showError(`${err.message} — checking the job again in ${Math.ceil(wait / 1000)} s`);
  job.timer = setTimeout(() => poll(job), wait);
}

async function finish(job) {
  stopFollowing(job);
  try {
    const { data } = await api("GET", `jobs/${encodeURIComponent(job.id)}`);
    if (!job.done) render(job, data);
  } catch (err) {
    pollLater(job, err);
  }
}

function end(job, message) {
  job.done = true;
  stopFollowing(job);
  if (active === job) active = null;
  setBusy(false);
  showError(message);
}

function render(job, view) {
  if (view.status !== "succeeded") {
    showStatus(view.status, view.progress);
    const reason = view.error ? view.error.message : view.status;
    return end(job, reason);
  }
  const seconds = view.started_at && view.finished_at
    ? (Date.parse(view.finished_at) - Date.parse(view.started_at)) / 1000
    : null;
  showStatus(view.status, view.progress, seconds === null ? "succeeded" : `succeeded in ${seconds.toFixed(1)} s`);
  for (const image of [...view.images].sort((a, b) => b.index - a.index)) {
    ui.gallery.prepend(card(job, image));
  }
  end(job, view.warnings && view.warnings.length ? view.warnings.join("; ") : "");
}

// The server's image links are absolute (under IMAGEGEN_PUBLIC_URL, which may name another host
// than the one this page was opened at, and the page's CSP allows only its own origin): the page
// asks for the same image relative to itself, keeping the link's query. With API keys on, that
// query signs the link (`?exp=&sig=`), so an <img> loads it without the key.
function imagePath(jobId, image) {
  let query = "";
  try {
    query = new URL(image.url, document.baseURI).search;
  } catch (_) {
    // not a URL: the image without a query
  }
  return `jobs/${encodeURIComponent(jobId)}/images/${encodeURIComponent(image.index)}${query}`;
}

function card(job, image) {
  const prompt = job.prompt;
  const figure = document.createElement("figure");
  figure.className = "card";
  const img = document.createElement("img");
  img.alt = prompt;
  img.width = image.width;
  img.height = image.height;
  const caption = document.createElement("figcaption");
  const text = document.createElement("span");
  text.className = "prompt";
  text.title = prompt;
  text.textContent = prompt;
  const meta = document.createElement("span");
  meta.className = "meta";
  const seed = document.createElement("span");
  seed.className = "seed";
  seed.textContent = `seed ${image.seed}`;
  const size = document.createElement("span");
  size.textContent = `${image.width}×${image.height}`;
  const save = document.createElement("a");
  save.download = `imagegen-${image.seed}.png`;
  img.src = save.href = imagePath(job.id, image);
  save.textContent = "download";
  meta.append(seed, size, save);
  caption.append(text, meta);
  figure.append(img, caption);
  return figure;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  if (active || submitting) return;
  submitting = true;
  const params = readParams();
  showError("");
  setBusy(true);
  try {
    const { data } = await api("POST", "generate", params);
    const job = { id: data.id, prompt: params.prompt, source: null, timer: null, done: false };
    active = job;
    ui.link.textContent = data.id.slice(0, 8);
    // A link opens without the page's key: with one in use it would only answer 401, so the id
    // is shown as text, not as a link.
    if (form.api_key.value.trim()) {
      ui.link.removeAttribute("href");
      ui.link.title = `job ${data.id}`;
    } else {
      ui.link.href = `jobs/${encodeURIComponent(data.id)}`;
      ui.link.removeAttribute("title");
    }
    showStatus(data.status, data.progress);
    follow(job);
  } catch (err) {
    setBusy(false);
    showStatus("failed", null, "not queued");
    const retry = err.retryAfter !== undefined ? ` (try again in ${Math.ceil(err.retryAfter)} s)` : "";
    showError(err.message + retry);
  } finally {
    submitting = false;
  }
});

ui.cancel.addEventListener("click", async () => {
  const job = active;
  if (!job) return;
  ui.cancel.disabled = true;
  try {
    const { status, data } = await api("DELETE", `jobs/${encodeURIComponent(job.id)}`);
    if (status === 202) {
      ui.status.textContent = "cancel requested — stopping at the next step";
    } else if (data && TERMINAL.has(data.status)) {
      render(job, data);
    }
  } catch (err) {
    ui.cancel.disabled = job.done;
    showError(err.status === 409 ? "the job had already finished" : `cancel failed: ${err.message}`);
  }
});

// Enter submits; Shift+Enter adds a line. An Enter that confirms an input method's composition
// (Japanese, Chinese, Korean…) only ends the composition (keyCode 229: browsers that report it so).
form.prompt.addEventListener("keydown", (event) => {
  if (event.isComposing || event.keyCode === 229) return;
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    form.requestSubmit();
  }
});

// The line under the title; while the server is not ready it is checked again every few seconds
// (one check at a time: /readyz needs no key, so nothing else starts one).
async function checkServer() {
  try {
    const { data } = await api("GET", "readyz");
    ui.server.textContent = `ready · ${data.workers} worker${data.workers === 1 ? "" : "s"}`;
  } catch (err) {
    ui.server.textContent = `not ready: ${err.message}`;
    setTimeout(checkServer, RECHECK_MS);
  }
}

checkServer();
