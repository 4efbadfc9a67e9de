// The kandinsky-serve playground: a job form over the public API, no framework, no build step.
// Every API call goes through api(), which sends the tab's API key (if any) as a Bearer token.
"use strict";

const KEY_STORAGE = "kandinsky-serve.api-key";      // sessionStorage: this tab only
const RECENT_STORAGE = "kandinsky-serve.recent-jobs"; // localStorage: ids, parameters, thumbnails; never a key
const MAX_RECENT = 24;
const HEALTH_EVERY_MS = 5000;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const IMAGE_FIELDS = new Set(["image", "mask", "items"]); // base64 payloads: never stored or shown

const $ = (id) => document.getElementById(id);
const state = {job: null, params: null, abort: null, imageB64: null, imageSize: null, models: []};

// ---- API access -------------------------------------------------------------------------

function apiKey() { return sessionStorage.getItem(KEY_STORAGE) || ""; }

/** fetch() a relative API path (resolved against <base>, i.e. the route prefix) with the key. */
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set("Authorization", "Bearer " + key);
  const response = await fetch(path, {...options, headers, cache: "no-store"});
  if (response.status === 401) askForKey(await errorOf(response));
  return response;
}

/** The error envelope {error: {type, message, details}} of a failed response (or a stand-in). */
async function errorOf(response) {
  try {
    const body = await response.clone().json();
    if (body && body.error) return {status: response.status, ...body.error};
  } catch (_) { /* not JSON */ }
  return {status: response.status, type: "http_error", message: `HTTP ${response.status}`, details: []};
}

function askForKey(error) {
  $("key-panel").hidden = false;
  $("key-bar").hidden = true;
  $("key-message").textContent = apiKey() ? `${error.message} (the key was not accepted)` : error.message;
}

function showKeyState() {
  $("key-bar").hidden = !apiKey();
}

// ---- the form ---------------------------------------------------------------------------

function mode() { return document.querySelector("input[name=mode]:checked").value; }

function showModeFields() {
  const current = mode();
  for (const field of document.querySelectorAll("[data-modes]")) {
    field.hidden = !field.dataset.modes.split(" ").includes(current);
  }
  for (const option of $("model").options) {
    const model = state.models.find((m) => m.id === option.value);
    option.disabled = Boolean(model && !model.modes.includes(current));
  }
}

function number(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

/** The params of POST /v1/jobs for the form's mode: only the fields the user set. */
function formParams() {
  const current = mode();
  const prompt = $("prompt").value;
  const params = {};
  const set = (name, value) => { if (value !== undefined && value !== "" && !Number.isNaN(value)) params[name] = value; };
  if (current === "mix") {
    // The texts share what the image's weight leaves.
    const items = [prompt, $("mix_text").value].filter((text) => text.trim()).map((text) => ({text}));
    const imageWeight = state.imageB64 ? (number("mix_weight") ?? 0.5) : 0;
    params.weights = items.map(() => (1 - imageWeight) / Math.max(1, items.length));
    if (state.imageB64) { items.push({image: state.imageB64}); params.weights.push(imageWeight); }
    params.items = items;
  } else {
    set("prompt", prompt);
  }
  if (["img2img", "inpaint", "variations"].includes(current) && state.imageB64) params.image = state.imageB64;
  if (current === "inpaint" && state.imageB64) params.mask = maskB64();
  if (["img2img", "variations"].includes(current)) set("strength", number("strength"));
  set("negative_prompt", $("negative_prompt").value);
  set("model", $("model").value);
  for (const id of ["width", "height", "steps", "prior_steps", "guidance_scale", "seed", "num_images"]) set(id, number(id));
  set("quality", $("quality").value);
  set("scheduler", $("scheduler").value);
  return params;
}

function clearErrors() {
  for (const span of document.querySelectorAll(".field-error")) if (span.id !== "key-message") span.textContent = "";
  for (const field of document.querySelectorAll(".field.invalid")) field.classList.remove("invalid");
}

/** Put each error detail next to the field it names (``params.width`` -> the width field). */
function showError(error) {
  const unplaced = [];
  for (const detail of error.details || []) {
    const name = String(detail.field || "").replace(/^params\./, "").split(".")[0];
    const field = document.querySelector(`.field[data-field="${CSS.escape(name)}"]`);
    if (field && !field.hidden) {
      field.classList.add("invalid");
      field.querySelector(".field-error").textContent = detail.message;
    } else {
      unplaced.push(`${detail.field}: ${detail.message}`);
    }
  }
  const placed = (error.details || []).length - unplaced.length;
  $("form-error").textContent = unplaced.length || !placed ? (unplaced.join("; ") || error.message)
    : `${error.status}: see the field${placed > 1 ? "s" : ""} marked above`;
}

// ---- input image and mask -----------------------------------------------------------------

function readImage(file) {
  const reader = new FileReader();
  delete $("image").dataset.loaded;
  reader.onload = () => {
    const url = String(reader.result);
    state.imageB64 = url.slice(url.indexOf(",") + 1);
    const image = new Image();
    image.onload = () => {
      state.imageSize = [image.naturalWidth, image.naturalHeight];
      for (const canvas of [$("mask-image"), $("mask")]) {
        canvas.width = image.naturalWidth;
        canvas.height = image.naturalHeight;
      }
      $("mask-image").getContext("2d").drawImage(image, 0, 0);
      $("image").dataset.loaded = file.name; // read, and the mask canvas sized to it
    };
    image.src = url;
  };
  reader.readAsDataURL(file);
}

function setUpMaskPainting() {
  const canvas = $("mask");
  const context = canvas.getContext("2d");
  let last = null;
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * canvas.width / box.width, (event.clientY - box.top) * canvas.height / box.height];
  };
  const paint = (event) => {
    const [x, y] = point(event);
    context.strokeStyle = context.fillStyle = "#fff";
    context.lineWidth = Number($("brush").value) * canvas.width / canvas.getBoundingClientRect().width;
    context.lineCap = "round";
    context.beginPath();
    context.moveTo(...(last || [x, y]));
    context.lineTo(x, y);
    context.stroke();
    last = [x, y];
  };
  canvas.addEventListener("pointerdown", (event) => { canvas.setPointerCapture(event.pointerId); last = null; paint(event); });
  canvas.addEventListener("pointermove", (event) => { if (event.buttons) paint(event); });
  canvas.addEventListener("pointerup", () => { last = null; });
  $("mask-clear").addEventListener("click", () => context.clearRect(0, 0, canvas.width, canvas.height));
}

/** The painted mask as a PNG (white = repaint on black = keep), the input image's size. */
function maskB64() {
  const source = $("mask");
  const out = document.createElement("canvas");
  out.width = source.width;
  out.height = source.height;
  const context = out.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, out.width, out.height);
  context.drawImage(source, 0, 0);
  const url = out.toDataURL("image/png");
  return url.slice(url.indexOf(",") + 1);
}

// ---- jobs -------------------------------------------------------------------------------

async function submit(event) {
  event.preventDefault();
  clearErrors();
  const params = formParams();
  const steps = params.steps || 50;
  const body = {mode: mode(), params, preview_every: Math.max(1, Math.round(steps / 10))};
  $("generate").disabled = true;
  $("job-state").textContent = "submitting";  // the last job's state no longer shows as this one's
  delete $("job-state").dataset.state;
  try {
    const response = await api("v1/jobs", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    if (!response.ok) { showError(await errorOf(response)); return; }
    const job = await response.json();
    startJob(job, withoutPayloads(params));
  } catch (error) {
    $("form-error").textContent = `could not reach the service: ${error.message}`;
  } finally {
    $("generate").disabled = false;
  }
}

function withoutPayloads(params) {
  return Object.fromEntries(Object.entries(params).filter(([name]) => !IMAGE_FIELDS.has(name)));
}

function startJob(job, params) {
  if (state.abort) state.abort.abort();
  state.job = job;
  state.params = params;
  state.abort = new AbortController();
  $("job-panel").hidden = false;
  $("job-id").textContent = job.id;
  $("results").replaceChildren();
  $("preview").hidden = true;
  showParams(job, params);
  showJob(job);
  followEvents(job.id, state.abort.signal).catch((error) => {
    if (error.name !== "AbortError") $("job-detail").textContent = `event stream lost: ${error.message}`;
  });
}

/** Read GET /v1/jobs/{id}/events (Server-Sent Events) with fetch, so the key can go in a header. */
async function followEvents(id, signal) {
  let lastId = null;
  for (let attempt = 0; attempt < 5; attempt++) {
    const headers = {Accept: "text/event-stream"};
    if (lastId) headers["Last-Event-ID"] = lastId;
    const response = await api(`v1/jobs/${encodeURIComponent(id)}/events`, {headers, signal});
    if (!response.ok) { $("job-detail").textContent = (await errorOf(response)).message; return; }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (!event) continue;
        if (event.id) lastId = event.id;
        if (onEvent(id, event.event, JSON.parse(event.data))) return;
      }
    }
  }
}

function parseEvent(block) {
  const event = {event: "message", data: "", id: null};
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (name === "data") event.data += (event.data ? "\n" : "") + value;
    else event[name] = value;
  }
  return event.data ? event : null;
}

/** Handle one event of job ``id``; true once the job has ended. */
function onEvent(id, name, data) {
  if (!state.job || state.job.id !== id) return true;
  if (name === "preview") {
    if (data.image) {
      $("preview").src = `data:${data.media_type};base64,${data.image}`;
      $("preview").hidden = false;
      $("preview").title = `step ${data.step} of ${data.steps}`;
    }
    return false;
  }
  state.job = data;
  showJob(data);
  if (TERMINAL.has(data.state)) { finishJob(data); return true; }
  return false;
}

function showJob(job) {
  const percent = Math.round((job.progress || 0) * 100);
  $("progress").value = percent;
  $("progress-label").textContent = `${percent} %`;
  $("job-state").textContent = job.state;
  $("job-state").dataset.state = job.state;
  const detail = [];
  if (job.state === "queued" && job.position !== null && job.position !== undefined) detail.push(`position ${job.position}`);
  if (job.stage) detail.push(job.stage + (job.steps ? ` step ${job.step} of ${job.steps}` : ""));
  if (job.eta_s !== null && job.eta_s !== undefined && !TERMINAL.has(job.state)) detail.push(`about ${Math.ceil(job.eta_s)} s left`);
  if (job.error) detail.push(job.error.message || JSON.stringify(job.error));
  $("job-detail").textContent = detail.join(" · ");
  $("cancel").disabled = TERMINAL.has(job.state);
}

function showParams(job, params) {
  const rows = {mode: job.mode, ...params};
  $("job-params").replaceChildren(...Object.entries(rows).flatMap(([name, value]) => {
    const term = document.createElement("dt");
    term.textContent = name;
    const description = document.createElement("dd");
    description.textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
    return [term, description];
  }));
}

async function finishJob(job) {
  $("preview").hidden = job.state === "succeeded";
  const entry = {id: job.id, mode: job.mode, state: job.state, params: state.params, seeds: job.seeds,
                 created_at: job.created_at, thumb: null};
  if (job.state === "succeeded") {
    const thumbs = await showResults(job, state.params);
    entry.thumb = thumbs[0] || null;
  }
  remember(entry);
}

/** Fetch each result image (with the key) and show it with its seed and a "reuse seed" button. */
async function showResults(job, params) {
  const figures = [];
  const thumbs = [];
  for (let i = 0; i < job.images.length; i++) {
    const response = await api(`v1/jobs/${encodeURIComponent(job.id)}/images/${i}`);
    if (!response.ok) continue;
    const url = URL.createObjectURL(await response.blob());
    const figure = document.createElement("figure");
    const image = document.createElement("img");
    image.src = url;
    image.alt = `image ${i} of job ${job.id}`;
    image.className = "result";
    await image.decode().catch(() => {});
    thumbs.push(thumbnail(image));
    const caption = document.createElement("figcaption");
    const seed = job.seeds[i];
    caption.textContent = `seed ${seed} · ${job.width}×${job.height} `;
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.textContent = "Reuse seed";
    reuse.className = "reuse-seed";
    reuse.addEventListener("click", () => { fillForm({...params, seed, num_images: 1}, job.mode); });
    caption.append(reuse);
    figure.append(image, caption);
    figures.push(figure);
  }
  $("results").replaceChildren(...figures);
  return thumbs;
}

function thumbnail(image) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 64;
  try {
    canvas.getContext("2d").drawImage(image, 0, 0, 64, 64);
    return canvas.toDataURL("image/jpeg", 0.7);
  } catch (_) {
    return null;
  }
}

async function cancelJob() {
  if (!state.job) return;
  $("cancel").disabled = true;
  const response = await api(`v1/jobs/${encodeURIComponent(state.job.id)}`, {method: "DELETE"});
  if (response.ok) {
    const job = await response.json();
    if (job.id === state.job.id && job.state) showJob(job);
  } else {
    $("job-detail").textContent = (await errorOf(response)).message;
  }
}

function fillForm(params, jobMode) {
  const radio = document.querySelector(`input[name=mode][value="${CSS.escape(jobMode)}"]`);
  if (radio) { radio.checked = true; showModeFields(); }
  for (const id of ["prompt", "negative_prompt", "model", "width", "height", "steps", "prior_steps", "guidance_scale",
    "seed", "num_images", "quality", "scheduler", "strength"]) {
    if (id in params) $(id).value = params[id];
  }
}

// ---- recent jobs (localStorage) ----------------------------------------------------------

function recent() {
  try { return JSON.parse(localStorage.getItem(RECENT_STORAGE)) || []; } catch (_) { return []; }
}

function remember(entry) {
  const entries = [entry, ...recent().filter((e) => e.id !== entry.id)].slice(0, MAX_RECENT);
  try { localStorage.setItem(RECENT_STORAGE, JSON.stringify(entries)); } catch (_) { /* storage full: skip */ }
  showGallery();
}

function showGallery() {
  $("gallery").replaceChildren(...recent().map((entry) => {
    const item = document.createElement("button");
    item.type = "button";
    item.className = "recent";
    item.dataset.state = entry.state;
    item.title = `${entry.mode} · ${entry.state} · ${entry.params.prompt || ""}`;
    if (entry.thumb) {
      const image = document.createElement("img");
      image.src = entry.thumb;
      image.alt = entry.params.prompt || entry.mode;
      item.append(image);
    }
    const label = document.createElement("span");
    label.textContent = `${entry.mode} · ${entry.state}`;
    item.append(label);
    item.addEventListener("click", () => openRecent(entry));
    return item;
  }));
}

async function openRecent(entry) {
  fillForm(entry.params, entry.mode);
  const response = await api(`v1/jobs/${encodeURIComponent(entry.id)}`);
  if (!response.ok) {
    $("form-error").textContent = `job ${entry.id}: ${(await errorOf(response)).message} (parameters restored)`;
    return;
  }
  const job = await response.json();
  startJob(job, entry.params);
}

// ---- health and queue --------------------------------------------------------------------

async function checkHealth() {
  try {
    const ready = await api("readyz");
    const body = await ready.json().catch(() => ({}));
    const health = $("health");
    health.dataset.ready = body.draining ? "draining" : String(Boolean(body.ready));
    $("health-label").textContent = body.draining ? "draining" : body.ready ? "ready" : "not ready";
    const status = await api("v1/status");
    if (status.status !== 401) {
      const stages = (await status.json().catch(() => ({}))).stages || {};
      const names = Object.keys(stages);
      const up = names.filter((name) => stages[name] === "ready");
      const parts = [`${up.length}/${names.length} stages ready`];
      const mine = await api("v1/jobs?limit=100");
      if (mine.ok) {
        const jobs = (await mine.json()).jobs || [];
        parts.push(`your jobs: ${jobs.filter((j) => j.state === "queued").length} queued, `
          + `${jobs.filter((j) => j.state === "running").length} running`);
      }
      $("health-stages").textContent = parts.join(" · ");
      health.title = names.map((name) => `${name}: ${stages[name]}`).join("\n");
    }
  } catch (error) {
    $("health").dataset.ready = "false";
    $("health-label").textContent = `unreachable (${error.message})`;
  }
  setTimeout(checkHealth, HEALTH_EVERY_MS);
}

async function loadModels() {
  const response = await api("v1/models");
  if (!response.ok) return;
  state.models = (await response.json()).data || [];
  $("model").replaceChildren(...state.models.map((model) => {
    const option = document.createElement("option");
    option.value = model.id;
    option.textContent = model.id;
    option.title = `Kandinsky ${model.family}`;
    option.selected = model.default;
    return option;
  }));
  const chosen = state.models.find((model) => model.default) || state.models[0];
  if (chosen) {
    $("width").placeholder = chosen.default_size.width;
    $("height").placeholder = chosen.default_size.height;
  }
  showModeFields();
}

// ---- start -------------------------------------------------------------------------------

function start() {
  $("gen-form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancelJob);
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", () => { clearErrors(); showModeFields(); });
  $("image").addEventListener("change", () => { if ($("image").files[0]) readImage($("image").files[0]); });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    $("api-key").value = "";
    $("key-panel").hidden = true;
    $("key-message").textContent = "";
    showKeyState();
    loadModels();
  });
  $("forget-key").addEventListener("click", () => { sessionStorage.removeItem(KEY_STORAGE); showKeyState(); });
  $("gallery-clear").addEventListener("click", () => { localStorage.removeItem(RECENT_STORAGE); showGallery(); });
  setUpMaskPainting();
  showModeFields();
  showKeyState();
  showGallery();
  loadModels();
  checkHealth();
}

start();
