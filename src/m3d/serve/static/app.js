// The m3d search page: plain DOM, no build step. Every string from the store or the user is put on
// the page as text (textContent, attribute values set one by one), never parsed as markup.
"use strict";

const MESH = [".off", ".obj", ".ply", ".stl", ".glb"];
const IMAGE = [".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"];
const K = 24;
const $ = (id) => document.getElementById(id);
const state = { token: null, label: null, last: null, collection: "", blobs: [] };

// control characters (terminal escapes, a bell) in a name are shown as \xNN, never passed on raw
const visible = (text) => String(text).replace(/[\u0000-\u001f\u007f-\u009f]/g,
  (c) => "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"));

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") node.textContent = visible(value);
    else if (key === "class") node.className = value;
    else if (key === "title") node.title = visible(value);
    else node.setAttribute(key, value);  // data-* keep the raw value: the filter sends it back as it came
  }
  for (const child of children) node.append(child);
  return node;
}

function readToken() {
  const match = location.hash.match(/(?:^#|&)token=([^&]*)/);
  if (match) {
    sessionStorage.setItem("m3d-token", decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);  // not left in the address bar
  }
  state.token = sessionStorage.getItem("m3d-token");
}

class NeedToken extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers["authorization"] = "Bearer " + state.token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    $("token-form").hidden = false;
    throw new NeedToken("this server needs its token");
  }
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

async function json(path, options) { return (await api(path, options)).json(); }

function status(text, error = false) {
  const line = $("status");
  line.textContent = visible(text);
  line.classList.toggle("error", error);
}

function fail(err) { status(err.message, !(err instanceof NeedToken)); }

function freeBlobs() { for (const url of state.blobs) URL.revokeObjectURL(url); state.blobs = []; }

async function loadImage(img, path) {
  // fetched with the token (an <img src> cannot send it), then shown from a blob URL
  try {
    const blob = await (await api(path)).blob();
    const url = URL.createObjectURL(blob);
    state.blobs.push(url);
    img.src = url;
  } catch (err) {
    img.alt = "no picture: " + err.message;
    img.title = err.message;
  }
}

function params(extra = {}) {
  const p = new URLSearchParams({ k: String(K) });
  if (state.collection) p.set("collection", state.collection);
  if (state.label !== null) p.set("class", state.label);
  for (const [key, value] of Object.entries(extra)) p.set(key, value);
  return p;
}

async function collections() {
  const data = await json("/api/collections");
  const select = $("collection");
  select.replaceChildren(el("option", { value: "", text: "auto" }));
  for (const c of data.collections) {
    const label = c.name + " (" + c.points + " objects" + (c.text ? ", text" : "") + ")";
    select.append(el("option", { value: c.name, text: label }));
  }
  select.value = state.collection;
  const first = data.collections.find((c) => c.name.endsWith("_mean")) || data.collections[0];
  state.first = first ? first.name : null;
  await chips(state.collection);
}

async function chips(name) {
  name = name || state.first;
  const box = $("chips");
  box.replaceChildren();
  if (!name) return;
  const data = await json("/api/collections/" + encodeURIComponent(name) + "/facets?field=class");
  const all = el("button", { type: "button", class: "chip" + (state.label === null ? " on" : ""), text: "all classes" });
  all.addEventListener("click", () => filter(null));
  box.append(all);
  const counts = Object.entries(data.counts).sort((a, b) => a[0].localeCompare(b[0]));
  for (const [label, count] of counts) {
    const chip = el("button", { type: "button", class: "chip" + (state.label === label ? " on" : ""),
      title: label, "data-class": label }, [document.createTextNode(visible(label)), el("span", { class: "n", text: String(count) })]);
    chip.addEventListener("click", () => filter(label));
    box.append(chip);
  }
  box.dataset.collection = name;
}

function filter(label) {
  state.label = state.label === label ? null : label;
  for (const chip of $("chips").children) {
    const value = chip.dataset.class === undefined ? null : chip.dataset.class;
    chip.classList.toggle("on", value === state.label);
  }
  if (state.last) state.last().catch(fail);
}

function show(answer, title) {
  freeBlobs();
  const grid = $("results");
  grid.replaceChildren();
  const preview = $("query-preview");
  preview.hidden = !answer.preview;
  if (answer.preview) {
    preview.querySelector("img").src = answer.preview;
    preview.querySelector("span").textContent = visible("searched: " + title);
  }
  status(answer.hits.length + " results for " + title + " in " + answer.collection + " (" + answer.engine + ", " +
         answer.ms + " ms)" + (state.label !== null ? ", class " + state.label : ""));
  for (const hit of answer.hits) {
    const img = el("img", { class: "thumb", alt: "" });
    const card = el("button", { type: "button", class: "card", "data-id": hit.id }, [img,
      el("div", { class: "meta" }, [
        el("span", { class: "score", text: hit.score.toFixed(4) }),
        el("span", { class: "cls", text: hit.class === null ? "-" : String(hit.class), title: String(hit.class) }),
        el("span", { class: "path", text: String(hit.path), title: String(hit.path) }),
      ])]);
    card.addEventListener("click", () => open(answer.collection, hit.id).catch(fail));
    grid.append(card);
    loadImage(img, hit.thumbnail);
  }
  if (answer.collection !== $("chips").dataset.collection) chips(answer.collection).catch(fail);
}

async function searchFile(file) {
  const name = file.name;
  const dot = name.lastIndexOf(".");
  const suffix = dot >= 0 ? name.slice(dot).toLowerCase() : "";
  let path;
  if (MESH.includes(suffix)) path = "/api/search/mesh?" + params({ filename: name, preview: "true" });
  else if (IMAGE.includes(suffix) || (file.type || "").startsWith("image/")) path = "/api/search/image?" + params({ preview: "true" });
  else throw new Error(name + ": not a mesh (" + MESH.join(" ") + ") or an image");
  status("searching with " + name + " ...");
  const answer = await json(path, { method: "POST", body: file, headers: { "content-type": "application/octet-stream" } });
  show(answer, name);
}

async function searchText(text) {
  status("searching for " + text + " ...");
  show(await json("/api/search/text?" + params({ q: text })), "\u201c" + text + "\u201d");
}

async function similar(collection, id, title) {
  const p = params();
  p.delete("collection");
  show(await json("/api/collections/" + encodeURIComponent(collection) + "/objects/" + encodeURIComponent(id) +
                  "/similar?" + p), "more like " + title);
}

function run(search) {
  state.last = search;
  search().catch(fail);
}

async function open(collection, id) {
  const data = await json("/api/collections/" + encodeURIComponent(collection) + "/objects/" + encodeURIComponent(id));
  const p = data.payload;
  const title = String(p.path);
  $("detail-title").textContent = visible((p.class === undefined ? "" : String(p.class) + ": ") + title);
  const views = $("views");
  views.replaceChildren();
  if (data.views_problem) views.append(el("p", { class: "status error", text: data.views_problem }));
  data.views.forEach((url, i) => {
    const img = el("img", { alt: "view " + (i + 1) });
    views.append(img);
    loadImage(img, url);
  });
  const body = $("payload").tBodies[0];
  body.replaceChildren();
  for (const [key, value] of Object.entries(p)) {
    const text = typeof value === "object" && value !== null ? JSON.stringify(value) : String(value);
    body.append(el("tr", {}, [el("th", { text: key }), el("td", { text })]));
  }
  $("more").onclick = () => { close(); run(() => similar(collection, id, title)); };
  $("detail").hidden = false;
  $("close").focus();
}

function close() { $("detail").hidden = true; }

async function syncStatus() {
  try {
    const health = await json("/api/health");
    const badge = $("sync");
    const job = health.sync;
    badge.hidden = !job;
    if (job) badge.textContent = "sync " + job.state + ": " + job.done + (job.total ? "/" + job.total : "") + " objects";
    if (state.syncing && !job) collections().catch(fail);  // a sync ended: new counts and classes
    state.syncing = Boolean(job);
  } catch (err) { /* the next poll says it again */ }
}

function init() {
  readToken();
  const drop = $("drop");
  const file = $("file");
  drop.addEventListener("click", () => file.click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); file.click(); } });
  file.addEventListener("change", () => { if (file.files[0]) { const f = file.files[0]; run(() => searchFile(f)); } file.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const f = e.dataTransfer.files[0];
    if (f) run(() => searchFile(f));
  });
  $("text-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("text").value.trim();
    if (text) run(() => searchText(text));
  });
  $("collection").addEventListener("change", (e) => {
    state.collection = e.target.value;
    state.label = null;
    chips(state.collection).then(() => { if (state.last) return state.last(); }).catch(fail);
  });
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token").value;
    sessionStorage.setItem("m3d-token", state.token);
    $("token-form").hidden = true;
    collections().then(() => status("")).catch(fail);
  });
  $("close").addEventListener("click", close);
  $("detail").addEventListener("click", (e) => { if (e.target === $("detail")) close(); });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") close(); });
  collections().catch(fail);
  syncStatus();
  setInterval(syncStatus, 3000);
}

document.addEventListener("DOMContentLoaded", init);
