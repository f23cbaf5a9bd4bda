// The icm review page: upload or browse decisions, confirm or override them.
// Plain JS, no build step. Text from the server is only ever set with textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { policies: [], defaultPolicy: null, current: null, oldest: null, imageUrl: null,
  claimed: null, claimExpires: null, skip: loadJSON("icm-skip", []), thumbs: new Map(), keys: Promise.resolve(), quietHash: null,
  groups: new Map(), keyName: null, permissions: ["moderate", "review", "read_all"],
  progress: loadJSON("icm-progress", { allow: 0, block: 0, undone: 0 }), onlySkippedLeft: false, lastReview: null, undoSeconds: 30, undoTimer: null };

// An error says what the last action did; the next action clears it (a stale 409 is no news).
function clearErrors() {
  if ($("status").className === "error") setStatus("");
  if ($("review-status").className === "error") $("review-status").textContent = "";
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const resp = await fetch(path, opts);
  if (resp.status === 204) return null;
  const type = resp.headers.get("content-type") || "";
  const body = type.includes("application/json") ? await resp.json() : await resp.text();
  if (!resp.ok) {
    const detail = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : resp.statusText;
    const err = new Error(resp.status + ": " + detail);
    err.status = resp.status;
    throw err;
  }
  return body;
}

// ------------------------------------------------------------------ policies

function policyByName(name) {
  return state.policies.find((p) => p.name === name) || null;
}

function fillRules() {
  const p = policyByName($("upload-policy").value);
  const sel = $("upload-rules");
  sel.replaceChildren();
  if (!p) return;
  for (const rs of p.rule_sets) {
    const o = el("option", rs.name + " (" + rs.audience + ")");
    o.value = rs.name;
    if (rs.name === p.default_rules) o.selected = true;
    sel.appendChild(o);
  }
}

async function loadPolicies() {
  const data = await api("/v1/policies");
  state.policies = data.policies;
  state.defaultPolicy = data.default_policy;
  const sel = $("upload-policy");
  sel.replaceChildren();
  for (const p of data.policies) {
    const o = el("option", p.name);
    o.value = p.name;
    if (p.name === data.default_policy) o.selected = true;
    sel.appendChild(o);
  }
  fillRules();
}

// ------------------------------------------------------------------ the review queue

function fillSelect(sel, values) {
  const keep = sel.value;
  sel.replaceChildren();
  const any = el("option", "any");
  any.value = "";
  sel.appendChild(any);
  for (const v of values) {
    const o = el("option", v);
    o.value = v;
    sel.appendChild(o);
  }
  sel.value = values.includes(keep) ? keep : "";
}

// The queue's filters offer only the values present in the queue (the API's facets, issue 21):
// a filter with no value to offer (the product, for detector decisions) is hidden.
function fillQueueFilters(facets) {
  for (const [key, id] of [["policy", "q-policy"], ["rules", "q-rules"], ["verdict", "q-verdict"], ["product", "q-product"]]) {
    const values = (facets && facets[key]) || [];
    fillSelect($(id), values);
    $(id).closest("label").hidden = values.length === 0;
  }
}

function nextDay(date) {
  const d = new Date(date + "T00:00:00Z");
  d.setUTCDate(d.getUTCDate() + 1);
  return d.toISOString().slice(0, 10);
}

function queueFilters() {
  const f = {};
  for (const [key, id] of [["policy", "q-policy"], ["rules", "q-rules"], ["verdict", "q-verdict"], ["product", "q-product"]]) {
    if ($(id).value) f[key] = $(id).value;
  }
  if ($("q-since").value) f.since = $("q-since").value;
  if ($("q-until").value) f.until = nextDay($("q-until").value);  // the day chosen is included
  return f;
}

async function thumbnail(url) {
  if (state.thumbs.has(url)) return state.thumbs.get(url);
  const resp = await fetch(url, { headers: headers() });
  if (!resp.ok) return null;
  const obj = URL.createObjectURL(await resp.blob());
  state.thumbs.set(url, obj);
  return obj;
}

async function loadQueue() {
  if (!state.permissions.includes("review")) return;
  const params = new URLSearchParams(Object.assign({ limit: "100" }, queueFilters()));
  const data = await api("/v1/review-queue?" + params.toString());
  $("queue-count").textContent = "(" + data.total + " waiting)";
  const filtersBefore = JSON.stringify(queueFilters());
  fillQueueFilters(data.facets);
  // a chosen value no longer in the queue is dropped: show the queue as the filters now say
  if (JSON.stringify(queueFilters()) !== filtersBefore) return loadQueue();
  if (typeof data.undo_seconds === "number") state.undoSeconds = data.undo_seconds;
  $("queue-empty").hidden = data.total > 0;
  const ul = $("queue-list");
  ul.replaceChildren();
  state.groups = groupByImage(data.items);
  for (const group of state.groups.values()) {
    const d = group[0];
    const li = document.createElement("li");
    li.dataset.id = String(d.id);
    li.dataset.ids = group.map((g) => g.id).join(",");
    const img = document.createElement("img");
    img.alt = "";
    li.appendChild(img);
    if (d.thumbnail_url) thumbnail(d.thumbnail_url).then((u) => { if (u) img.src = u; }).catch(() => {});
    const text = el("span");
    text.appendChild(el("span", "#" + d.id + " "));
    let rest = " \u00b7 " + d.policy;
    if (group.length === 1) {
      text.appendChild(verdictSpan(d.verdict));
      rest += "/" + d.rules;
    } else {
      for (const g of group) { text.appendChild(el("span", " " + g.rules + " ", "rule-set")); text.appendChild(verdictSpan(g.verdict)); }
    }
    rest += " \u00b7 " + (d.product || "no product") + " \u00b7 " + d.queue + " \u00b7 " + d.created_at.slice(0, 19).replace("T", " ");
    const holder = group.find((g) => g.claimed_by);
    if (holder) rest += " \u00b7 claimed by " + holder.claimed_by;
    text.appendChild(el("span", rest));
    if (group.some((g) => state.skip.includes(g.id))) {
      li.classList.add("skipped");
      text.appendChild(el("span", "skipped", "skip-mark"));
    }
    li.appendChild(text);
    if (group.some((g) => g.id === state.claimed)) li.classList.add("current");
    li.addEventListener("click", () => { clearErrors(); return claimOne(d.id).catch((e) => setStatus(e.message, true)); });
    ul.appendChild(li);
  }
  if (state.current) showRuleSets(state.current);
  loadAgreement().catch(() => {});
}

async function loadAgreement() {
  const a = await api("/v1/review-queue/agreement");
  const parts = [];
  for (const [product, p] of Object.entries(a.reviewer_vs_model.by_product)) {
    if (p.reviewed) parts.push(product + " " + p.agree + "/" + p.reviewed);
  }
  const rr = a.reviewer_vs_reviewer;
  $("agreement").textContent = "Reviewers agree with the model: " + (parts.length ? parts.join(", ") : "no reviews yet")
    + ". Reviewers agree with each other: " + (rr.pairs ? rr.agree + "/" + rr.pairs + " pairs" : "no item reviewed twice") + ".";
}

// With API keys the server records the key's name as the reviewer (another name is refused):
// the page sends none. Without keys, the name typed here is who reviews.
function reviewerName() {
  if (state.keyName) return null;
  return $("reviewer").value.trim() || null;
}

async function whoami() {
  const me = await api("/v1/whoami");
  state.keyName = me.name;
  state.permissions = me.permissions;
  const input = $("reviewer");
  const wasKeyed = input.readOnly;
  input.readOnly = Boolean(me.name);
  if (me.name) input.value = me.name;
  else if (wasKeyed) input.value = localStorage.getItem("icm-reviewer") || "";  // what was typed before a key
  input.title = me.name ? "the API key's name: reviews and claims are recorded under it" : "";
  $("queue-panel").hidden = !me.permissions.includes("review");
  $("upload-form").hidden = !me.permissions.includes("moderate");
  return me;
}

function showClaim(d) {
  state.claimed = d ? d.id : null;
  state.claimExpires = d ? d.claim_expires_at : null;
  const banner = $("claim-banner");
  if (!d) { banner.hidden = true; return; }
  const until = new Date(d.claim_expires_at * 1000).toLocaleTimeString();
  banner.textContent = "Claimed by " + d.claimed_by + " until " + until + ": A allow, B block, S skip.";
  banner.hidden = false;
}

async function claimNext() {
  const body = Object.assign({ reviewer: reviewerName(), skip: state.skip }, queueFilters());
  const d = await api("/v1/review-queue/claim", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  state.onlySkippedLeft = !d && state.skip.length > 0;
  if (!d) {
    showClaim(null);
    setStatus("The queue is empty: nothing more awaits a person" + (state.skip.length ? " (besides the items you skipped)" : "") + ".");
    await loadQueue();
    return;
  }
  showClaim(d);
  await loadQueue();
  await openDecision(d.id);
}

async function claimOne(id) {
  const d = await api("/v1/decisions/" + id + "/claim", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ reviewer: reviewerName() }),
  });
  showClaim({ id: id, claimed_by: d.reviewer, claim_expires_at: d.expires_at });
  await loadQueue();
  await openDecision(id);
}

async function openDecision(id) {
  const target = "decision=" + id;
  if (location.hash !== "#" + target) {
    state.quietHash = "#" + target;  // shown here: the hashchange handler need not show it again
    location.hash = target;
  }
  await showDecision(id);
}

// Keys act one after another, each on the item claimed when its turn comes: a key pressed
// while the next item loads is not lost.
async function decideByKey(verdict) {
  const d = state.current;
  if (!d || state.claimed !== d.id) return;
  if (await submitReview({ verdict: verdict })) await claimSibling(d).catch(() => false) || await claimNext();
}

async function skipByKey() {
  if (!state.claimed) return;
  const id = state.claimed;
  const q = reviewerName() ? "?reviewer=" + encodeURIComponent(reviewerName()) : "";
  await api("/v1/decisions/" + id + "/claim" + q, { method: "DELETE" });
  if (!state.skip.includes(id)) state.skip.push(id);
  saveSkip();
  showProgress();
  await claimNext();
}

function onKey(ev) {
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const t = ev.target;
  if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT")) return;
  const k = ev.key.toLowerCase();
  if (k === "escape") { $("zoom").hidden = true; $("help").hidden = true; return; }
  if (k === "?") { ev.preventDefault(); $("help").hidden = !$("help").hidden; return; }
  if (k === "z") { ev.preventDefault(); toggleZoom(); return; }
  if (k === "r") { ev.preventDefault(); reveal(); return; }
  let action = null;
  if (k === "a") action = () => decideByKey("allow");
  else if (k === "b") action = () => decideByKey("block");
  else if (k === "s") action = skipByKey;
  else if (k === "u") action = undo;
  if (action) {
    ev.preventDefault();
    clearErrors();
    state.keys = state.keys.then(action).catch((e) => setStatus(e.message, true));
  }
}

// ------------------------------------------------------------------ decisions list

function verdictSpan(v) {
  return el("span", v || "error", "verdict verdict-" + (v || "none"));
}

function reviewText(r) {
  if (!r) return "";
  return r.action + " \u2192 " + r.verdict + " (" + r.reviewer + ")";
}

async function loadDecisions(append) {
  const params = new URLSearchParams({ limit: "50" });
  const f = $("filter").value;
  if (f === "unreviewed") params.set("reviewed", "false");
  else if (f) params.set("verdict", f);
  if (append && state.oldest) params.set("before_id", String(state.oldest));
  const data = await api("/v1/decisions?" + params.toString());
  const body = $("decisions").querySelector("tbody");
  if (!append) body.replaceChildren();
  for (const d of data.decisions) {
    const tr = document.createElement("tr");
    tr.dataset.id = String(d.id);
    tr.appendChild(el("td", d.id));
    tr.appendChild(el("td", d.image_name || (d.image_sha256 || "").slice(0, 12)));
    const tv = document.createElement("td");
    tv.appendChild(verdictSpan(d.verdict));
    tr.appendChild(tv);
    tr.appendChild(el("td", fmt(d.p_violation)));
    tr.appendChild(el("td", d.product || "-"));
    tr.appendChild(el("td", reviewText(d.review), "review-cell"));
    if (state.current && state.current.id === d.id) tr.classList.add("selected");
    tr.addEventListener("click", () => { location.hash = "decision=" + d.id; });
    body.appendChild(tr);
    state.oldest = d.id;
  }
  $("more").hidden = data.decisions.length < 50;
}

// ------------------------------------------------------------------ one decision

async function showImage(d) {
  const img = $("image");
  const boxes = $("boxes");
  boxes.replaceChildren();
  $("figure").classList.remove("revealed");
  $("zoom").classList.remove("revealed");
  $("zoom").hidden = true;
  $("zoom-image").removeAttribute("src");
  if (state.imageUrl) { URL.revokeObjectURL(state.imageUrl); state.imageUrl = null; }
  if (!d.image_url) {
    img.removeAttribute("src");
    $("figure").hidden = true;
    $("reveal").hidden = true;
    $("no-image").hidden = false;
    return;
  }
  $("figure").hidden = false;
  $("reveal").hidden = false;
  $("no-image").hidden = true;
  const resp = await fetch(d.image_url, { headers: headers() });
  if (!resp.ok) throw new Error("image: " + resp.status);
  state.imageUrl = URL.createObjectURL(await resp.blob());
  await new Promise((resolve, reject) => {
    img.onload = resolve;
    img.onerror = () => reject(new Error("the browser cannot display this image"));
    img.src = state.imageUrl;
  });
  $("zoom-image").src = state.imageUrl;
  // Boxes are in pixels of the upright (EXIF-corrected) image, as the browser shows it.
  const w = img.naturalWidth, h = img.naturalHeight;
  for (const b of d.record.boxes || []) {
    const [x, y, bw, bh] = b.box;
    const div = el("div", null, "box");
    div.style.left = (100 * x / w) + "%";
    div.style.top = (100 * y / h) + "%";
    div.style.width = (100 * bw / w) + "%";
    div.style.height = (100 * bh / h) + "%";
    div.appendChild(el("span", b.label + " " + fmt(b.score)));
    boxes.appendChild(div);
  }
}

function fillProducts(policyName, selected) {
  const sel = $("override-product");
  sel.replaceChildren();
  const none = el("option", "(not named)");
  none.value = "";
  sel.appendChild(none);
  const p = policyByName(policyName);
  if (!p) return;
  for (const pr of p.products) {
    const o = el("option", pr.id);
    o.value = pr.id;
    o.title = pr.description;
    if (pr.id === selected) o.selected = true;
    sel.appendChild(o);
  }
}

function showReviews(reviews) {
  const ul = $("reviews");
  ul.replaceChildren();
  for (const r of reviews) {
    let text = r.created_at + ": " + r.reviewer + " " + r.action + "s \u2192 " + r.verdict;
    if (r.product) text += ", product " + r.product;
    if (r.note) text += ": " + r.note;
    ul.appendChild(el("li", text));
  }
  if (!reviews.length) ul.appendChild(el("li", "not reviewed yet", "muted"));
}

async function showDecision(id) {
  const d = await api("/v1/decisions/" + encodeURIComponent(id));
  state.current = d;
  showRuleSets(d);
  if (state.claimed !== d.id) $("claim-banner").hidden = true;
  else $("claim-banner").hidden = false;
  const r = d.record;
  $("detail").hidden = false;
  $("decision-id").textContent = "#" + d.id + (d.image_name ? " \u2013 " + d.image_name : "");
  $("decision-time").textContent = d.created_at;
  const v = $("verdict");
  v.textContent = r.verdict || "error";
  v.className = "verdict verdict-" + (r.verdict || "none");
  let pv = fmt(r.p_violation);
  if (r.p_violation_range && r.p_violation_range[0] !== r.p_violation_range[1]) {
    pv += " (between " + fmt(r.p_violation_range[0]) + " and " + fmt(r.p_violation_range[1]) + ")";
  }
  $("p-violation").textContent = pv;
  $("term").textContent = r.term ? r.term.question + " P(Yes) = " + fmt(r.term.p_yes) + (r.term.source ? " [" + r.term.source + "]" : "") : "-";
  $("product").textContent = r.product
    ? r.product + " (p = " + fmt(r.product_probability) + ")" + (r.product_description ? ": " + r.product_description : "")
    : "not identified" + (r.not_judged && r.not_judged.length ? " (not judged: " + r.not_judged.join(", ") + ")" : "");
  $("rule").textContent = r.rule ? r.rule + " \u2192 " + r.label + (r.severity ? " (" + r.severity + ")" : "") : "none (no product identified)";
  $("reason").textContent = r.reason || "-";
  $("explanation").textContent = r.explanation || "(no explanation: start the server with --explain and a text model)";
  const at = $("attributes").querySelector("tbody");
  at.replaceChildren();
  for (const [attr, dist] of Object.entries(r.attributes || {})) {
    const best = Object.entries(dist).sort((a, b) => b[1] - a[1])[0];
    const tr = document.createElement("tr");
    tr.appendChild(el("td", attr));
    tr.appendChild(el("td", best ? best[0] + " (" + fmt(best[1]) + ")" : "-"));
    at.appendChild(tr);
  }
  const bl = $("box-list");
  bl.replaceChildren();
  for (const b of r.boxes || []) bl.appendChild(el("li", b.label + " " + fmt(b.score) + " at [" + b.box.map((n) => Math.round(n)).join(", ") + "]"));
  if (!(r.boxes || []).length) bl.appendChild(el("li", "none", "muted"));
  $("meta").textContent = d.policy + " / " + d.rules + " / " + d.backend + (d.model ? " (" + d.model + ")" : "");
  $("confirm").disabled = !(r.verdict === "allow" || r.verdict === "block");
  $("confirm").title = $("confirm").disabled ? "a 'review' verdict needs a decision: use Override" : "";
  $("override-verdict").value = r.verdict === "block" ? "allow" : "block";
  fillProducts(d.policy, r.product);
  $("note").value = "";
  $("review-status").textContent = "";
  showReviews(d.reviews || []);
  for (const tr of $("decisions").querySelectorAll("tbody tr")) {
    tr.classList.toggle("selected", tr.dataset.id === String(d.id));
  }
  await showImage(d);
}

async function submitReview(body) {
  const d = state.current;
  if (!d) return;
  body.reviewer = reviewerName();
  const status = $("review-status");
  status.className = "muted";
  status.textContent = "saving\u2026";
  try {
    const r = await api("/v1/decisions/" + d.id + "/reviews", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    status.textContent = "Saved: " + r.action + " \u2192 " + r.verdict + " by " + r.reviewer + " at " + r.created_at;
    status.dataset.reviewId = String(r.id);
    countDecision(r.verdict, 1);
    offerUndo(r);
    const fresh = await api("/v1/decisions/" + d.id);
    showReviews(fresh.reviews || []);
    if (state.claimed === d.id) showClaim(null);
    await loadDecisions(false);
    await loadQueue();
    return true;
  } catch (e) {
    status.className = "error";
    status.textContent = "Not saved: " + e.message;
    return false;
  }
}

// ------------------------------------------------------------------ wiring

function route() {
  if (state.quietHash === location.hash) { state.quietHash = null; return; }
  const m = /decision=(\d+)/.exec(location.hash);
  if (m) showDecision(m[1]).catch((e) => setStatus(e.message, true));
}

async function init() {
  $("reviewer").value = localStorage.getItem("icm-reviewer") || "";
  $("api-key").value = sessionStorage.getItem("icm-api-key") || "";
  $("reviewer").addEventListener("change", () => {
    if (!state.keyName) localStorage.setItem("icm-reviewer", $("reviewer").value.trim());
  });
  // the key is kept (for this tab only) once the server has accepted it as a reviewer's: see start()
  $("api-key").addEventListener("change", start);
  $("sign-out").addEventListener("click", () => { sessionStorage.removeItem("icm-api-key"); location.reload(); });
  $("upload-policy").addEventListener("change", fillRules);
  for (const id of ["q-policy", "q-rules", "q-verdict", "q-product", "q-since", "q-until"]) {
    $(id).addEventListener("change", () => { clearErrors(); loadQueue().catch((e) => setStatus(e.message, true)); });
  }
  $("queue-start").addEventListener("click", () => {
    // skipped items stay skipped (after a reload too) until only they are left: then start over with them
    clearErrors();
    if (state.onlySkippedLeft) { state.skip = []; saveSkip(); showProgress(); }
    claimNext().catch((e) => setStatus(e.message, true)); });
  $("queue-refresh").addEventListener("click", () => loadQueue().catch((e) => setStatus(e.message, true)));
  document.addEventListener("keydown", onKey);
  applyBlur(localStorage.getItem("icm-blur") !== "off");
  $("blur-toggle").addEventListener("change", () => applyBlur($("blur-toggle").checked));
  $("reveal").addEventListener("click", reveal);
  $("figure").addEventListener("click", toggleZoom);
  $("zoom").addEventListener("click", () => { $("zoom").hidden = true; });
  $("help-open").addEventListener("click", () => { $("help").hidden = !$("help").hidden; });
  $("help-close").addEventListener("click", () => { $("help").hidden = true; });
  $("undo").addEventListener("click", () => { state.keys = state.keys.then(undo).catch((e) => setStatus(e.message, true)); });
  showProgress();
  $("filter").addEventListener("change", () => loadDecisions(false).catch((e) => setStatus(e.message, true)));
  $("refresh").addEventListener("click", () => loadDecisions(false).catch((e) => setStatus(e.message, true)));
  $("more").addEventListener("click", () => loadDecisions(true).catch((e) => setStatus(e.message, true)));
  $("confirm").addEventListener("click", () => {
    if (state.current) submitReview({ verdict: state.current.record.verdict });
  });
  $("override-submit").addEventListener("click", () => {
    submitReview({
      verdict: $("override-verdict").value,
      product: $("override-product").value || null,
      note: $("note").value.trim() || null,
    });
  });
  $("upload-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const file = $("upload-file").files[0];
    const err = $("upload-error");
    err.textContent = "";
    if (!file) { err.textContent = "choose an image first"; return; }
    const form = new FormData();
    form.append("image", file, file.name);
    form.append("policy", $("upload-policy").value);
    form.append("rules", $("upload-rules").value);
    form.append("source", "page");
    $("upload-submit").disabled = true;
    setStatus("moderating " + file.name + "\u2026");
    try {
      const res = await api("/v1/moderate", { method: "POST", body: form });
      setStatus("decision #" + res.decision_id + ": " + res.record.verdict);
      await loadDecisions(false);
      const target = "decision=" + res.decision_id;
      if (location.hash === "#" + target) await showDecision(res.decision_id);
      else location.hash = target;  // the hashchange handler shows it
    } catch (e) {
      err.textContent = e.message;
      setStatus("");
    } finally {
      $("upload-submit").disabled = false;
    }
  });
  window.addEventListener("hashchange", route);
  await start();
}

async function start() {
  try {
    const h = await (await fetch("/healthz")).json();
    $("server").textContent = h.backend + " \u00b7 " + h.policy + "/" + h.rules + " \u00b7 auth: " + h.auth;
    const me = await whoami();
    if (!signIn(me)) return;
    if (me.name) $("server").textContent += " \u00b7 key " + me.name + " (" + me.role + ")";
    await loadPolicies();
    await loadDecisions(false);
    await loadQueue();
    setStatus("");
    route();
  } catch (e) {
    if (e.status === 401) sessionStorage.removeItem("icm-api-key");  // a wrong key is not kept
    setStatus(e.status === 401 ? "enter the API key" + ($("api-key").value.trim() ? " (this one is not valid)" : "") : e.message, true);
  }
}

init();
