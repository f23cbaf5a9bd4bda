// The review page's tools for a day's work (issue 21): what the tab remembers, the session's
// progress, blur, zoom and undo. Loaded before review.js, whose globals ($, state, api) these
// functions use when called.
"use strict";

// What this tab remembers (sessionStorage): the items skipped and the decisions made.
function loadJSON(key, fallback) {
  try {
    const v = JSON.parse(sessionStorage.getItem(key) || "null");
    return v === null ? fallback : v;
  } catch (e) {
    return fallback;
  }
}

function saveSkip() {
  sessionStorage.setItem("icm-skip", JSON.stringify(state.skip));
}

function showProgress() {
  const p = state.progress;
  const n = p.allow + p.block;
  $("progress").textContent = "This session: " + n + " decided (" + p.allow + " allow, " + p.block + " block)"
    + (p.undone ? ", " + p.undone + " undone" : "") + (state.skip.length ? ", " + state.skip.length + " skipped" : "");
}

function countDecision(verdict, delta) {
  if (verdict !== "allow" && verdict !== "block") return;
  state.progress[verdict] = Math.max(0, state.progress[verdict] + delta);
  if (delta < 0) state.progress.undone += 1;
  sessionStorage.setItem("icm-progress", JSON.stringify(state.progress));
  showProgress();
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function fmt(p) {
  return p === null || p === undefined ? "-" : Number(p).toFixed(3);
}

function setStatus(text, isError) {
  const s = $("status");
  s.textContent = text || "";
  s.className = isError ? "error" : "muted";
}

// ------------------------------------------------------------------ blur, zoom, undo

function applyBlur(on) {
  document.body.classList.toggle("blur", on);
  $("blur-toggle").checked = on;
  localStorage.setItem("icm-blur", on ? "on" : "off");
}

function reveal() {
  $("figure").classList.toggle("revealed");
  $("zoom").classList.toggle("revealed", $("figure").classList.contains("revealed"));
}

function toggleZoom() {
  if (!$("zoom").hidden) { $("zoom").hidden = true; return; }
  if ($("zoom-image").getAttribute("src")) $("zoom").hidden = false;
}

// The last review this tab saved can be withdrawn for state.undoSeconds (the server checks it).
function offerUndo(r) {
  clearInterval(state.undoTimer);
  if (!(state.undoSeconds > 0)) return;
  state.lastReview = { decisionId: r.decision_id, reviewId: r.id, verdict: r.verdict, until: Date.now() + 1000 * state.undoSeconds };
  const tick = () => {
    const left = state.lastReview ? Math.round((state.lastReview.until - Date.now()) / 1000) : 0;
    if (left <= 0) { hideUndo(); return; }
    $("undo-text").textContent = "#" + state.lastReview.decisionId + " → " + state.lastReview.verdict + " saved; undo for " + left + " s.";
  };
  $("undo-bar").hidden = false;
  tick();
  state.undoTimer = setInterval(tick, 1000);
}

function hideUndo() {
  clearInterval(state.undoTimer);
  state.lastReview = null;
  $("undo-bar").hidden = true;
}

async function undo() {
  const last = state.lastReview;
  if (!last || Date.now() > last.until) return;
  hideUndo();
  const q = reviewerName() ? "?reviewer=" + encodeURIComponent(reviewerName()) : "";
  // give back what was claimed meanwhile: the undone item is reviewed again first
  if (state.claimed && state.claimed !== last.decisionId) {
    const held = state.claimed;
    showClaim(null);
    await api("/v1/decisions/" + held + "/claim" + q, { method: "DELETE" }).catch(() => {});
  }
  await api("/v1/decisions/" + last.decisionId + "/reviews/" + last.reviewId + q, { method: "DELETE" });
  countDecision(last.verdict, -1);
  setStatus("Undone: decision #" + last.decisionId + " is waiting for your review again.");
  await loadDecisions(false);
  await claimOne(last.decisionId);
}


// ------------------------------------------------------------------ signing in

// Sign in once per tab with a reviewer key (issue 21): the key is kept in sessionStorage only
// after /v1/whoami accepted it. An admin key (or a key without a role, which is an admin) is
// refused and never kept: a reviewer's page holds no key that can do everything.
function signIn(me) {
  const input = $("api-key");
  const key = input.value.trim();
  if (me.keys && me.role === "admin") {
    sessionStorage.removeItem("icm-api-key");
    input.value = "";
    $("queue-panel").hidden = true;
    $("upload-form").hidden = true;
    setStatus("This is an admin key" + (me.name ? " (" + me.name + ")" : "") + ": the review page does not take one. "
      + "Create a reviewer key (a line NAME:KEY:reviewer in the key file) and enter it here.", true);
    return false;
  }
  if (me.keys && key) {
    sessionStorage.setItem("icm-api-key", key);
    input.closest("label").hidden = true;
    $("sign-out").hidden = false;
  }
  return true;
}

// ------------------------------------------------------------------ one image, several rule sets

// Queue items of one image (same sha256) under several rule sets are one entry (issue 21),
// oldest first. Each rule set's decision is still reviewed on its own: a verdict for adults
// need not be one for children. The detail shows them side by side (showRuleSets), and after
// a decision by key the same image's next rule set is claimed before the rest of the queue.
function groupByImage(items) {
  const groups = new Map();
  for (const d of items) {
    const k = d.image_sha256 || "decision " + d.id;
    if (!groups.has(k)) groups.set(k, []);
    groups.get(k).push(d);
  }
  return groups;
}

function showRuleSets(d) {
  const group = (d.image_sha256 && state.groups.get(d.image_sha256)) || [];
  const rows = group.some((g) => g.id === d.id) || !group.length ? group : [d].concat(group);
  const table = $("rule-sets");
  const body = table.querySelector("tbody");
  body.replaceChildren();
  table.hidden = rows.length < 2;
  for (const g of rows) {
    const tr = document.createElement("tr");
    tr.dataset.id = String(g.id);
    tr.appendChild(el("td", "#" + g.id + " " + g.policy + "/" + g.rules));
    const tv = document.createElement("td");
    tv.appendChild(verdictSpan(g.verdict));
    tr.appendChild(tv);
    tr.appendChild(el("td", fmt(g.p_violation)));
    tr.appendChild(el("td", g.product || "-"));
    const act = document.createElement("td");
    if (g.id === d.id) act.appendChild(el("span", "shown", "muted"));
    else {
      const b = el("button", "Review", "small");
      b.type = "button";
      b.addEventListener("click", () => { clearErrors(); claimOne(g.id).catch((e) => setStatus(e.message, true)); });
      act.appendChild(b);
    }
    tr.appendChild(act);
    body.appendChild(tr);
  }
}

async function claimSibling(d) {
  const next = (state.groups.get(d.image_sha256) || []).find((g) => g.id !== d.id && !g.claimed_by && !state.skip.includes(g.id));
  if (!next) return false;
  await claimOne(next.id);
  return true;
}
