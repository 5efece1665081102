// himar serve: the page. Reads the models from /api/models, streams one generation from /api/generate
// (server-sent events read through fetch, so a refused request's message can be shown), and draws each step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], model: null, frames: [], current: -1, follow: true, abort: null, playing: null };
const numbers = ["guidance1", "guidance2", "temperature", "steps1", "steps2", "head_steps", "seed"];

async function init() {
  const res = await fetch("/api/models");
  state.models = await res.json();
  for (const m of state.models) $("model").add(new Option(`${m.name} (${m.kind === "text" ? "captions" : "classes"})`, m.name));
  $("model").addEventListener("change", () => pickModel($("model").value));
  for (const id of ["guidance1", "guidance2", "temperature"]) $(id).addEventListener("input", showValues);
  $("dice").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 100000); });
  $("controls").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  $("stop").addEventListener("click", () => state.abort && state.abort.abort());
  $("scrub").addEventListener("input", () => { state.follow = false; show(+$("scrub").value); });
  $("prev").addEventListener("click", () => { state.follow = false; show(Math.max(0, state.current - 1)); });
  $("next").addEventListener("click", () => { show(Math.min(state.frames.length - 1, state.current + 1)); });
  $("play").addEventListener("click", replay);
  pickModel(state.models[0].name);
  drawEmpty();
}

function pickModel(name) {
  const m = state.models.find((x) => x.name === name);
  state.model = m;
  $("model").value = name;
  const text = m.kind === "text";
  $("class-field").hidden = text;
  $("prompt-field").hidden = !text;
  $("vocab").hidden = !text || m.vocabulary.length === 0;
  $("class").replaceChildren(...m.classes.map((c, i) => new Option(`${i} · ${c}`, String(i))));
  $("prompts").replaceChildren(...m.example_prompts.map((p) => new Option(p)));
  $("vocab").textContent = `Words it knows: ${m.vocabulary.join(" ")}`;
  if (text) $("prompt").value = m.defaults.prompt || "";
  const d = m.defaults;
  const values = { guidance1: d.guidance1, guidance2: d.guidance2, temperature: d.temperature, steps1: d.steps1,
    steps2: d.steps2, head_steps: d.head_steps, seed: d.seed };
  for (const k of numbers) $(k).value = values[k];
  $("steps1").max = m.limits.steps1;
  $("steps2").max = m.limits.steps2;
  $("head_steps").max = m.limits.head_steps;
  showValues();
  showArchitecture(m);
}

function showValues() {
  for (const id of ["guidance1", "guidance2", "temperature"]) document.querySelector(`output[for=${id}]`).value = (+$(id).value).toFixed(2);
}

function showArchitecture(m) {
  const fmt = (n) => n.toLocaleString("en-US");
  $("total").textContent = `· ${fmt(m.parameters)} parameters in ${m.name}`;
  $("flow").replaceChildren(...m.parts.map((p) => Object.assign(document.createElement("li"), { textContent: p.title })));
  $("parts").replaceChildren(...m.parts.map((p) => {
    const tr = document.createElement("tr");
    tr.dataset.part = p.key;
    const link = `<a href="/architecture.html${p.doc}">docs</a>`;
    tr.innerHTML = `<td><b></b></td><td class="num"></td><td><span></span> ${link}</td>`;
    tr.querySelector("b").textContent = p.title;
    tr.querySelector(".num").textContent = p.parameters === 0 ? "none" : fmt(p.parameters);
    tr.querySelector("span").textContent = p.summary;
    return tr;
  }));
}

function query() {
  const q = new URLSearchParams({ model: state.model.name });
  if (state.model.kind === "text") q.set("prompt", $("prompt").value);
  else q.set("class", $("class").value);
  for (const k of numbers) q.set(k, $(k).value.trim());
  return q;
}

function setError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

async function generate() {
  if (state.abort) state.abort.abort();
  setError("");
  stopReplay();
  const abort = new AbortController();
  state.abort = abort;
  $("generate").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = "Starting...";
  try {
    const res = await fetch(`/api/generate?${query()}`, { signal: abort.signal });
    if (!res.ok) {
      // A refused request (400: a bad setting, 503: busy) leaves the last generation on show.
      setError((await res.text()).trim() || `the server answered ${res.status}`);
      $("status").textContent = "";
      return;
    }
    reset();
    await readEvents(res, onEvent);
  } catch (e) {
    if (e.name !== "AbortError") setError(`the connection failed: ${e.message}`);
    else $("status").textContent = "Stopped.";
  } finally {
    if (state.abort === abort) state.abort = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

function reset() {
  state.frames = [];
  state.current = -1;
  state.follow = true;
  $("strip1").replaceChildren();
  $("strip2").replaceChildren();
  $("final").removeAttribute("src");
  $("final-caption").textContent = "final image";
  $("caption").textContent = "Waiting for the first step...";
  $("scrub").max = 0;
  $("scrub").disabled = true;
  drawEmpty();
}

// Server-sent events over a fetch stream: blocks of "event: NAME" and "data: JSON" lines, separated by a blank line.
async function readEvents(res, handle) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) handle(name, JSON.parse(data));
    }
  }
}

function onEvent(name, data) {
  if (name === "queued") {
    $("status").textContent = data.ahead > 0 ? `Waiting: ${data.ahead} generation(s) ahead...` : "Generating...";
  } else if (name === "frame") {
    addFrame(data);
  } else if (name === "done") {
    $("final").src = data.image;
    $("final-caption").textContent = `final image · ${data.seconds.toFixed(2)} s`;
    $("status").textContent = `Done: ${state.frames.length} steps in ${data.seconds.toFixed(2)} s. Use the timeline to step back and forth.`;
  } else if (name === "error") {
    setError(data.message);
    $("status").textContent = "";
  }
}

function addFrame(f) {
  const img = new Image();
  f.img = img;
  img.src = f.image;
  const index = state.frames.length;
  state.frames.push(f);
  const thumb = document.createElement("img");
  thumb.src = f.image;
  thumb.className = "frame";
  thumb.dataset.phase = f.phase;
  thumb.dataset.step = f.step;
  thumb.title = `phase ${f.phase}, step ${f.step + 1} of ${f.steps}`;
  thumb.addEventListener("click", () => { state.follow = false; show(index); });
  $(f.phase === 1 ? "strip1" : "strip2").append(thumb);
  $("scrub").max = state.frames.length - 1;
  $("scrub").disabled = false;
  $("status").textContent = `Phase ${f.phase}: step ${f.step + 1} of ${f.steps}...`;
  if (state.follow) img.decode().then(() => { if (state.follow) show(index); }, () => {});
}

function drawEmpty() {
  const ctx = $("view").getContext("2d");
  ctx.fillStyle = "#10131a";
  ctx.fillRect(0, 0, $("view").width, $("view").height);
}

// One step: the decoded grid enlarged, the unknown tokens shaded, the tokens decided at this step outlined.
function show(i) {
  if (i < 0 || i >= state.frames.length) return;
  state.current = i;
  $("scrub").value = i;
  document.querySelectorAll(".frame").forEach((el, k) => el.classList.toggle("current", k === i));
  const f = state.frames[i];
  const canvas = $("view");
  const ctx = canvas.getContext("2d");
  const w = canvas.width;
  ctx.imageSmoothingEnabled = false;
  drawEmpty();
  ctx.drawImage(f.img, 0, 0, w, w);
  const scale = w / f.img.naturalWidth;
  const known = new Set(f.known);
  const rect = (k) => {
    const r = Math.floor(k / f.grid), c = k % f.grid;
    const x0 = Math.max(0, (f.offset + c * f.cell) * scale), y0 = Math.max(0, (f.offset + r * f.cell) * scale);
    const x1 = Math.min(w, (f.offset + (c + 1) * f.cell) * scale), y1 = Math.min(w, (f.offset + (r + 1) * f.cell) * scale);
    return [x0, y0, x1 - x0, y1 - y0];
  };
  ctx.fillStyle = getComputedStyle(document.documentElement).getPropertyValue("--unknown");
  for (let k = 0; k < f.grid * f.grid; k++) if (!known.has(k)) ctx.fillRect(...rect(k));
  ctx.strokeStyle = "rgba(255,255,255,0.18)";
  ctx.lineWidth = 1;
  for (let k = 0; k < f.grid * f.grid; k++) ctx.strokeRect(...rect(k));
  ctx.strokeStyle = getComputedStyle(document.documentElement).getPropertyValue("--decided");
  ctx.lineWidth = 3;
  for (const k of f.decided) { const [x, y, rw, rh] = rect(k); ctx.strokeRect(x + 1.5, y + 1.5, rw - 3, rh - 3); }
  const what = f.phase === 1 ? "pivot" : "dense token";
  const n = f.decided.length;
  $("caption").textContent = `Phase ${f.phase} · step ${f.step + 1} of ${f.steps}: ${n} ${what}${n === 1 ? "" : "s"} decided, ` +
    `${f.known.length} of ${f.grid * f.grid} known`;
}

function stopReplay() {
  if (state.playing) clearInterval(state.playing);
  state.playing = null;
}

function replay() {
  stopReplay();
  if (state.frames.length === 0) return;
  state.follow = false;
  let i = 0;
  show(i);
  state.playing = setInterval(() => { if (++i >= state.frames.length) stopReplay(); else show(i); }, 350);
}

init().catch((e) => setError(`could not load the models: ${e.message}`));
