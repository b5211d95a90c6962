// loracast serve's page logic (issue #19): uploads a subject (POST /api/subjects), submits
// jobs and κ sweeps (POST /api/jobs), follows them on the one SSE stream (/api/events), shows
// results and readable errors ({error, field, hint}). No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { subject: null, token: "sks", lastSeed: null, genericTouched: false, jobs: new Map() };

// ---- helpers ---------------------------------------------------------------------------

async function api(method, url, body) {
  const opts = { method, headers: {} };
  if (body instanceof FormData) {
    opts.body = body;
  } else if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch(url, opts);
  let data = null;
  try { data = await resp.json(); } catch (_) { data = null; }
  if (!resp.ok) {
    const err = new Error((data && data.error) || `${resp.status} ${resp.statusText}`);
    err.field = data && data.field;
    err.hint = data && data.hint;
    err.status = resp.status;
    err.retryAfter = resp.headers.get("Retry-After");
    throw err;
  }
  return data;
}

const FIELD_INPUTS = {
  prompt: "prompt", generic_prompt: "generic", kappa: "kappa", negative_prompt: "negative",
  steps: "steps", guidance_scale: "guidance", seed: "seed", width: "width", height: "height",
  count: "count", scheduler: "scheduler", kappas: "sweep-kappas", images: "files",
};

function showError(err) {
  const box = $("error");
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  let text = err.message;
  if (err.hint) text += ` — ${err.hint}`;
  if (err.retryAfter) text += ` (try again in ${err.retryAfter} s)`;
  box.textContent = text;
  box.hidden = false;
  const input = err.field && FIELD_INPUTS[err.field.replace(/\[.*$/, "")];
  if (input && $(input)) {
    if (input === "steps" || input === "negative" || input === "seed" || input === "width" ||
        input === "height" || input === "count" || input === "scheduler" || input === "sweep-kappas" ||
        input === "guidance") {
      $("advanced").open = true;
    }
    $(input).focus();
  }
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

// ---- κ slider: left = subject (κ 2), right = prompt (κ 0) --------------------------------

function kappa() { return Math.round((2 - Number($("kappa").value)) * 10) / 10; }
function showKappa() {
  const k = kappa().toFixed(1);
  $("kappa-out").textContent = k;
  $("kappa").setAttribute("aria-valuetext", `κ ${k}`);
}

// ---- generic prompt: the prompt without the subject token -------------------------------

function genericFrom(prompt) {
  const tok = state.token.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  return prompt.replace(new RegExp(`\\b${tok}\\b\\s*`, "gi"), "").replace(/\s+/g, " ").trim();
}
function fillGeneric() {
  if (!state.genericTouched) $("generic").value = genericFrom($("prompt").value);
}

// ---- subject upload ---------------------------------------------------------------------

async function upload(files) {
  files = Array.from(files).filter((f) => f.size > 0);
  if (files.length === 0) return;
  showError(null);
  const thumbs = $("thumbs");
  thumbs.replaceChildren();
  for (const f of files) {
    const url = URL.createObjectURL(f);
    const img = el("img", { src: url, alt: f.name });
    img.addEventListener("load", () => URL.revokeObjectURL(url), { once: true });
    thumbs.append(el("li", {}, img));
  }
  const form = new FormData();
  for (const f of files) form.append("images", f, f.name);
  $("subject-text").textContent = `computing the LoRA of ${files.length} image(s)…`;
  $("subject-info").hidden = false;
  try {
    const s = await api("POST", "/api/subjects", form);
    setSubject(s);
  } catch (err) {
    state.subject = null;
    $("subject-info").hidden = true;
    showError(err);
  }
}

function setSubject(s) {
  state.subject = s;
  if (!s) {
    $("subject-info").hidden = true;
    $("thumbs").replaceChildren();
    $("files").value = "";
    return;
  }
  const how = s.cached ? "cached (no hypernetwork call)" : `LoRA in ${s.lora_ms} ms`;
  $("subject-text").textContent = `subject ${s.subject_id.slice(0, 12)} · ${s.images} image(s) · ${how}`;
  $("lora-peft").href = s.lora_url;
  $("lora-kohya").href = s.lora_url_kohya;
  $("subject-info").hidden = false;
}

// ---- jobs -------------------------------------------------------------------------------

function request(sweep) {
  const body = { prompt: $("prompt").value };
  const num = (id) => Number($(id).value);
  body.steps = num("steps");
  body.guidance_scale = num("guidance");
  body.seed = num("seed");
  body.width = num("width");
  body.height = num("height");
  if ($("negative").value.trim()) body.negative_prompt = $("negative").value;
  if ($("scheduler").value) body.scheduler = $("scheduler").value;
  if (state.subject) {
    body.subject_id = state.subject.subject_id;
    if ($("generic").value.trim()) {
      body.generic_prompt = $("generic").value;
      if (sweep) {
        body.kappas = $("sweep-kappas").value.split(/[,\s]+/).filter(Boolean).map(Number);
      } else {
        body.kappa = kappa();
      }
    }
  }
  if (!sweep) body.count = num("count");
  return body;
}

async function submit(sweep) {
  showError(null);
  if (sweep && !state.subject) {
    showError({ message: "a κ sweep needs a subject", hint: "upload images of the subject first", field: "images" });
    return;
  }
  try {
    const r = await api("POST", "/api/jobs", request(sweep));
    const job = await api("GET", `/api/jobs/${r.job_id}`);
    render(job);
  } catch (err) {
    showError(err);
  }
}

function card(id) {
  let li = document.getElementById(`job-${id}`);
  if (li) return li;
  li = el("li", { class: "job", id: `job-${id}` });
  const head = el("header", {}, el("span", { class: "prompt" }), el("span", { class: "state", role: "status" }));
  const prog = el("progress", { max: "1", value: "0", "aria-label": "progress" });
  const meta = el("p", { class: "meta" });
  const cancel = el("button", { type: "button", class: "secondary cancel", text: "Cancel" });
  cancel.addEventListener("click", async () => {
    try { await api("DELETE", `/api/jobs/${id}`); } catch (err) { showError(err); }
  });
  const reuse = el("button", { type: "button", class: "secondary reuse", text: "Reuse seed" });
  reuse.addEventListener("click", () => {
    const j = state.jobs.get(id);
    if (j) { $("seed").value = j.params.seed; $("advanced").open = true; $("seed").focus(); }
  });
  const controls = el("div", { class: "controls" }, cancel, reuse);
  li.append(head, prog, meta, controls, el("div", { class: "gallery" }));
  $("jobs").prepend(li);
  $("no-jobs").hidden = true;
  return li;
}

function render(job) {
  state.jobs.set(job.job_id, job);
  const li = card(job.job_id);
  const p = job.params;
  const sweep = job.kind === "sweep";
  li.dataset.state = job.state;
  li.querySelector(".prompt").textContent = p.prompt;
  let label = job.state;
  if (job.state === "queued" && job.position) label = `queued (#${job.position})`;
  if (job.state === "running") label = `step ${job.step}/${job.total}`;
  if (job.state === "error" && job.error) label = `error: ${job.error}`;
  const st = li.querySelector(".state");
  st.textContent = label;
  st.className = `state ${job.state}`;
  const prog = li.querySelector("progress");
  prog.max = Math.max(job.total, 1);
  prog.value = job.state === "done" ? job.total : job.step;
  prog.hidden = job.state === "done";
  const how = p.kappas ? `κ sweep ${p.kappas.join(", ")}` : p.kappa != null ? `HM-CFG κ ${p.kappa}` : p.subject_id ? "CFG + LoRA" : "base model";
  li.querySelector(".meta").textContent =
    `${how} · seed ${p.seed} · ${p.steps} steps · g ${p.guidance_scale} · ${p.width}×${p.height} · ${p.scheduler}`;
  li.querySelector(".cancel").hidden = job.state !== "queued" && job.state !== "running";
  const gallery = li.querySelector(".gallery");
  if (job.state === "done" && gallery.childElementCount !== job.images.length) {
    gallery.replaceChildren();
    job.images.forEach((url, n) => {
      const cap = sweep ? `κ ${p.kappas[n]}` : `#${n + 1}`;
      const img = el("img", { src: url, alt: `${p.prompt} (${cap}, seed ${p.seed})`, width: "128", height: "128" });
      const a = el("a", { href: url, download: `loracast-${job.job_id.slice(0, 8)}-${n}.png` }, img);
      gallery.append(el("figure", {}, a, el("figcaption", { text: cap })));
    });
    state.lastSeed = p.seed;
    $("reuse-seed").disabled = false;
  }
}

async function refresh(id) {
  try { render(await api("GET", `/api/jobs/${id}`)); } catch (_) { /* forgotten job */ }
}

function listen() {
  const es = new EventSource("/api/events");
  const onEvent = (e) => {
    let d;
    try { d = JSON.parse(e.data); } catch (_) { return; }
    const job = state.jobs.get(d.job_id);
    if (!job) { if (d.type !== "progress") refresh(d.job_id); return; }
    if (d.type === "progress") {
      job.state = "running"; job.step = d.step; job.total = d.total;
      render(job);
    } else {
      refresh(d.job_id);
    }
  };
  for (const t of ["queued", "started", "progress", "done", "error", "canceled"]) es.addEventListener(t, onEvent);
  es.addEventListener("ready", () => { $("models").classList.remove("offline"); });
  es.onerror = () => { $("models").classList.add("offline"); };
}

// ---- start ------------------------------------------------------------------------------

async function start() {
  try {
    const sys = await api("GET", "/api/system");
    const m = sys.models;
    const d = sys.defaults;
    state.token = d.subject_token || "sks";
    $("models").textContent = `base ${m.base} · hypernetwork ${m.hypernet} · ${m.device} · queue ${sys.queue.length}/${sys.queue.capacity}`;
    const sizes = new Set([d.width, d.width * 2, 64, 128, 256, 512, 768, 1024].filter((s) => s >= 8 && s <= sys.limits.job.max_side));
    for (const id of ["width", "height"]) {
      for (const s of [...sizes].sort((a, b) => a - b)) $(id).append(el("option", { value: String(s), text: `${s}` }));
      $(id).value = String(id === "width" ? d.width : d.height);
    }
    $("guidance").value = d.guidance_scale;
  } catch (err) {
    showError(err);
  }
  fillGeneric();
  showKappa();
  try {
    const list = await api("GET", "/api/jobs");
    for (const j of list.jobs.slice().reverse()) render(j);
  } catch (_) { /* none */ }
  listen();
}

$("prompt").addEventListener("input", fillGeneric);
$("generic").addEventListener("input", () => { state.genericTouched = $("generic").value.trim() !== ""; if (!state.genericTouched) fillGeneric(); });
$("kappa").addEventListener("input", showKappa);
$("gen-form").addEventListener("submit", (e) => { e.preventDefault(); submit(false); });
$("sweep").addEventListener("click", () => submit(true));
$("reuse-seed").addEventListener("click", () => { if (state.lastSeed != null) $("seed").value = state.lastSeed; });
$("clear-subject").addEventListener("click", () => setSubject(null));
$("files").addEventListener("change", (e) => upload(e.target.files));
const drop = $("drop");
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("files").click(); } });
drop.addEventListener("click", (e) => { if (e.target === drop || e.target.tagName === "P") $("files").click(); });
for (const t of ["dragenter", "dragover"]) drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const t of ["dragleave", "drop"]) drop.addEventListener(t, () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); upload(e.dataTransfer.files); });
start();
