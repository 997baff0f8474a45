/* batchserve's search page: choose a query image, search the index, browse the stored
   items, add and delete them. Plain browser JavaScript with no build step; it talks only to
   this server's API, and keeps the bearer token in the page alone (no storage, no cookies). */
"use strict";

const $ = (id) => document.getElementById(id);

/** An element with a class and, optionally, text (never HTML: ids and labels are user data). */
function el(tag, className = "", text = null) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== null) node.textContent = text;
  return node;
}

// -- API ------------------------------------------------------------------------------

function itemPath(id) {
  return `/v1/items/${encodeURIComponent(id)}`;
}

function withQuery(path, params) {
  const query = params.toString();
  return query ? `${path}?${query}` : path;
}

/** The Response of a successful call, with the bearer token when one is given; throws an
    Error saying "403 forbidden: …" for an API error, or a plain one when offline. */
async function request(method, path, body = null, contentType = null) {
  const headers = contentType ? { "Content-Type": contentType } : {};
  const token = $("token").value.trim();
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(path, { method, headers, body });
  } catch (error) {
    throw new Error("Could not reach the server: check that it is running.");
  }
  if (!response.ok) throw await apiError(response);
  return response;
}

/** The Error for a 4xx/5xx answer, from its {"error": {"code", "message"}} body. */
async function apiError(response) {
  let code = "http_error";
  let message = response.statusText || "request failed";
  try {
    const doc = await response.json();
    if (doc && doc.error) ({ code, message } = doc.error);
  } catch (error) {
    // Not JSON (a proxy's page, say): the status line is all there is to show.
  }
  return new Error(`${response.status} ${code}: ${message}`);
}

async function api(method, path, body = null, contentType = null) {
  return (await request(method, path, body, contentType)).json();
}

async function fetchThumbnail(id) {
  return (await request("GET", `${itemPath(id)}/thumbnail`)).blob();
}

// -- status line ------------------------------------------------------------------------

function showStatus(text) {
  $("status").textContent = text;
  $("status").classList.remove("error");
}

function showError(error) {
  $("status").textContent = error.message;
  $("status").classList.add("error");
}

/** Clears the status line if it shows an error, and leaves other news ("Added x") be. */
function clearError() {
  if ($("status").classList.contains("error")) showStatus("");
}

/** `text` as news, or with the error that followed it, when there was one. */
function report(text, problem) {
  if (problem) showError(new Error(`${text}, but then ${problem.message}`));
  else showStatus(text);
}

// -- thumbnails -------------------------------------------------------------------------

/** The thumbnails of one drawing of an area (the results, the stored items, the preview):
    each fetched once it comes near the view (k may be 1000), all revoked together when the
    area is drawn again. */
class ThumbnailSet {
  constructor() {
    this.urls = [];
    this.closed = false;
    this.observer = new IntersectionObserver((entries) => this.onVisible(entries), {
      rootMargin: "200px",
    });
  }

  /** A box that will show the thumbnail of item `id`, or a placeholder if it has none. */
  box(id) {
    const box = el("span", "thumb");
    box.dataset.thumbOf = id;
    this.observer.observe(box);
    return box;
  }

  onVisible(entries) {
    for (const entry of entries) {
      if (!entry.isIntersecting) continue;
      this.observer.unobserve(entry.target);
      this.fill(entry.target);
    }
  }

  async fill(box) {
    const id = box.dataset.thumbOf;
    try {
      const url = this.urlFor(await fetchThumbnail(id));
      if (!url) return; // redrawn meanwhile
      const img = el("img");
      img.src = url;
      img.alt = `Thumbnail of ${id}`;
      box.replaceChildren(img);
    } catch (error) {
      box.replaceChildren(placeholder(id)); // 404 (no thumbnail) or any other failure
    }
  }

  /** An object URL for `blob`, or null when this set was closed while it was fetched. */
  urlFor(blob) {
    if (this.closed) return null;
    const url = URL.createObjectURL(blob);
    this.urls.push(url);
    return url;
  }

  close() {
    this.closed = true;
    this.observer.disconnect();
    this.urls.forEach((url) => URL.revokeObjectURL(url));
    this.urls = [];
  }
}

function placeholder(id) {
  const box = el("span", "placeholder", Array.from(id)[0] || "?");
  box.setAttribute("role", "img");
  box.setAttribute("aria-label", `No thumbnail for ${id}`);
  return box;
}

// -- items: result cards and stored tiles ---------------------------------------------------

/** The thumbnail as a button that searches for items like `id` (the keyboard's way in;
    a click anywhere on a card does the same). */
function similarButton(id, thumbnails) {
  const button = el("button", "similar");
  button.type = "button";
  button.setAttribute("aria-label", `Find items similar to ${id}`);
  button.append(thumbnails.box(id));
  return button;
}

function deleteButton(id) {
  const button = el("button", "delete", "×");
  button.type = "button";
  button.setAttribute("aria-label", `Delete ${id}`);
  return button;
}

function field(dl, name, value) {
  dl.append(el("dt", "", name), el("dd", "", value));
}

function matchCard(match, thumbnails) {
  const card = el("article", "match");
  card.dataset.id = match.id;
  const facts = el("dl");
  field(facts, "id", match.id);
  field(facts, "label", match.label ?? "—");
  field(facts, "class", match.class ?? "—");
  field(facts, "score", match.score.toFixed(3));
  if ("verified" in match) field(facts, "copy", verdict(match));
  card.append(similarButton(match.id, thumbnails), facts, deleteButton(match.id));
  if (match.verified) {
    card.classList.add("verified");
    card.append(el("span", "badge", "✓ copy"));
  }
  return card;
}

/** What a verified search found of one match: a copy and its evidence, or why not. */
function verdict(match) {
  if (match.verified === null) return "cannot verify (no local features)";
  const mirrored = match.transform === "mirrored similarity" ? ", mirrored" : "";
  return `${match.verified ? "yes" : "no"} (${match.inliers} inliers${mirrored})`;
}

function storedTile(item, thumbnails) {
  const tile = el("div", "stored-item");
  tile.dataset.id = item.id;
  tile.title = item.label ? `${item.id} (${item.label})` : item.id;
  const name = el("span", "name", item.id);
  tile.append(similarButton(item.id, thumbnails), name, deleteButton(item.id));
  return tile;
}

/** A click on a card or tile: delete it with its × button, else search for items like it. */
function onItemClick(event) {
  const holder = event.target.closest(".match, .stored-item");
  if (!holder) return;
  if (event.target.closest(".delete")) deleteItem(holder.dataset.id);
  else setQueryItem(holder.dataset.id);
}

// -- the query and the search ------------------------------------------------------------

let query = null; // { image: Blob } from a file, paste or drop, or { id } of a stored item
let previewThumbnails = new ThumbnailSet();
let resultThumbnails = new ThumbnailSet();
let searchCount = 0; // searches overlap when controls change quickly: only the latest is drawn

/** Resets the preview for a new query; returns the set its object URL belongs to. */
function resetPreview(caption) {
  previewThumbnails.close();
  previewThumbnails = new ThumbnailSet();
  $("query-preview").hidden = true;
  $("query-preview").removeAttribute("src");
  $("drop-help").textContent = caption;
  $("add-button").disabled = !(query && query.image);
  if (!query || query.image !== $("file").files[0]) $("file").value = ""; // names another query
  return previewThumbnails;
}

function showPreview(url, alt) {
  if (!url) return; // the query changed while its thumbnail was fetched
  $("query-preview").src = url;
  $("query-preview").alt = alt;
  $("query-preview").hidden = false;
}

function setQueryImage(blob, name) {
  if (blob.type && !blob.type.startsWith("image/")) {
    showError(new Error(`${name} is not an image (${blob.type}).`));
    return;
  }
  query = { image: blob };
  const thumbnails = resetPreview(`Query: ${name}. Drop, paste or choose another image.`);
  showPreview(thumbnails.urlFor(blob), `Query image ${name}`);
  runSearch();
}

async function setQueryItem(id) {
  query = { id };
  const thumbnails = resetPreview(`Query: stored item ${id}. Drop, paste or choose an image.`);
  runSearch();
  try {
    showPreview(thumbnails.urlFor(await fetchThumbnail(id)), `Query: thumbnail of ${id}`);
  } catch (error) {
    // No thumbnail: the caption names the item.
  }
}

function clearQuery() {
  query = null;
  searchCount += 1; // drops any search still in flight
  resetPreview("Drop an image here, paste one (Ctrl+V), or choose a file.");
  resultThumbnails.close();
  $("results").replaceChildren();
  $("results").removeAttribute("aria-busy");
  $("timings").textContent = "";
}

/** The search options that are set, as query parameters. */
function searchParams() {
  const params = new URLSearchParams();
  const k = $("k").value.trim();
  const label = $("label").value.trim();
  const minScore = $("min-score").value.trim();
  if (k) params.set("k", k);
  if (label) params.set("label", label);
  if ($("same-class").checked) params.set("same_class", "true");
  if (minScore) params.set("min_score", minScore);
  if ($("verify").checked) params.set("verify", "true");
  return params;
}

/** Runs the current query and draws its matches; throws its error unless it was overtaken. */
async function search() {
  if (!query) return;
  const count = ++searchCount;
  $("results").setAttribute("aria-busy", "true");
  try {
    const doc = query.image
      ? await api("POST", withQuery("/v1/search", searchParams()), query.image,
                  query.image.type || "application/octet-stream")
      : await api("GET", withQuery(`${itemPath(query.id)}/similar`, searchParams()));
    if (count === searchCount) drawResults(doc);
  } catch (error) {
    if (count === searchCount) throw error;
  } finally {
    if (count === searchCount) $("results").removeAttribute("aria-busy");
  }
}

function runSearch() {
  search().then(clearError, showError);
}

function drawResults(doc) {
  const matches = (doc.results && doc.results[0] && doc.results[0].matches) || [];
  resultThumbnails.close();
  resultThumbnails = new ThumbnailSet();
  const cards = matches.map((match) => matchCard(match, resultThumbnails));
  if (!cards.length) cards.push(el("p", "empty", "No matches."));
  $("results").replaceChildren(...cards);
  $("timings").textContent = formatTimings(doc.timings_ms);
}

/** "decode 3.1 ms · queue 0.4 ms · …" for the stages the server timed. */
function formatTimings(timings) {
  if (!timings) return "";
  return ["decode", "queue", "model", "search", "verify"]
    .filter((stage) => typeof timings[stage] === "number")
    .filter((stage) => stage !== "verify" || timings.verify > 0) // a verified search's only
    .map((stage) => `${stage} ${timings[stage].toFixed(1)} ms`)
    .join(" · ");
}

// -- header: the model and the index ----------------------------------------------------

/** Fills a header line from an API document, or says it is unavailable (and throws). */
async function loadLine(lineId, name, path, describe) {
  try {
    $(lineId).textContent = `${name}: ${describe(await api("GET", path))}`;
  } catch (error) {
    $(lineId).textContent = `${name}: unavailable`;
    throw error;
  }
}

function loadModel() {
  return loadLine("model-line", "Model", "/v1/model", (model) => {
    const about = model.trained_on ? ` — ${model.trained_on}` : "";
    return `${model.name}, ${model.dim} dims on ${model.device}${about}`;
  });
}

function loadIndex() {
  return loadLine("index-line", "Index", "/v1/index", (index) =>
    `${index.size} item${index.size === 1 ? "" : "s"}, ${index.kind_in_use}`);
}

// -- the stored items -------------------------------------------------------------------

let storedThumbnails = new ThumbnailSet();
let storedCount = 0; // a reload overtakes pages of the listing it replaces
let storedNext = null;

/** Lists the newest stored items again, or appends the page at `cursor`. */
async function loadStored(cursor = null) {
  const count = cursor ? storedCount : ++storedCount;
  const params = new URLSearchParams({ limit: "24" });
  if (cursor) params.set("cursor", cursor);
  const page = await api("GET", withQuery("/v1/items", params));
  if (count !== storedCount) return;
  if (!cursor) {
    storedThumbnails.close();
    storedThumbnails = new ThumbnailSet();
    $("stored").replaceChildren();
  }
  $("stored").append(...page.items.map((item) => storedTile(item, storedThumbnails)));
  if (!$("stored").children.length) $("stored").append(el("p", "empty", "No items stored yet."));
  storedNext = page.next ?? null;
  $("more").hidden = !storedNext;
}

// -- add and delete ---------------------------------------------------------------------

/** Waits for all of `promises`; the first error among them, or null. */
async function firstFailure(promises) {
  const outcomes = await Promise.allSettled(promises);
  const failed = outcomes.find((outcome) => outcome.status === "rejected");
  return failed ? failed.reason : null;
}

/** After an add or delete: the index line, the stored items and the search again. */
function refreshAfterChange() {
  return firstFailure([loadIndex(), loadStored(), search()]);
}

async function addItem(event) {
  event.preventDefault();
  if (!query || !query.image) return;
  const id = $("add-id").value.trim();
  const params = new URLSearchParams({ id });
  const label = $("add-label").value.trim();
  if (label) params.set("label", label);
  const image = query.image;
  $("add-button").disabled = true;
  showStatus(`Adding ${id}…`);
  try {
    const doc = await api("POST", withQuery("/v1/items", params), image,
                          image.type || "application/octet-stream");
    report(`Added ${doc.added[0]}`, await refreshAfterChange());
  } catch (error) {
    showError(error);
  } finally {
    $("add-button").disabled = !(query && query.image);
  }
}

async function deleteItem(id) {
  showStatus(`Deleting ${id}…`);
  try {
    await api("DELETE", itemPath(id));
  } catch (error) {
    showError(error);
    return;
  }
  if (query && query.id === id) clearQuery(); // nothing left to find items like
  report(`Deleted ${id}`, await refreshAfterChange());
}

// -- wiring -----------------------------------------------------------------------------

/** The first image file among dropped or pasted items, or null. */
function firstImage(files) {
  return Array.from(files || []).find((file) => file.type.startsWith("image/")) || null;
}

function wireQueryInputs() {
  const drop = $("drop");
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (file) setQueryImage(file, file.name);
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    const file = firstImage(event.dataTransfer.files);
    if (file) setQueryImage(file, file.name);
    else showError(new Error("Drop an image file."));
  });
  // A file dropped beside the zone would otherwise replace the page.
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => event.preventDefault());
  // Ctrl+V anywhere; a paste without an image goes to its text field as usual.
  document.addEventListener("paste", (event) => {
    const file = firstImage(event.clipboardData && event.clipboardData.files);
    if (!file) return;
    event.preventDefault();
    setQueryImage(file, "pasted image");
  });
}

function wireControls() {
  let timer = null; // typing in k, label or min score searches once the typing pauses
  for (const id of ["k", "label", "min-score"]) {
    $(id).addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(runSearch, 300);
    });
  }
  $("same-class").addEventListener("change", runSearch);
  $("verify").addEventListener("change", runSearch);
  // A new token may allow what the old one did not: load everything again.
  $("token").addEventListener("change", loadAll);
}

async function loadAll() {
  const problem = await firstFailure([loadModel(), loadIndex(), loadStored(), search()]);
  if (problem) showError(problem);
  else clearError();
}

function start() {
  wireQueryInputs();
  wireControls();
  $("results").addEventListener("click", onItemClick);
  $("stored").addEventListener("click", onItemClick);
  $("more").addEventListener("click", () => loadStored(storedNext).catch(showError));
  $("add-form").addEventListener("submit", addItem);
  loadAll();
}

start();
