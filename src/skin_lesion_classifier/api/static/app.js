// Upload page: POST the picked file (and the optional patient fields) to /predict and
// /explain and show the answers.
"use strict";

const form = document.getElementById("upload-form");
const input = document.getElementById("file-input");
const statusEl = document.getElementById("status");
const result = document.getElementById("result");
let classNames = {};

function setStatus(text, isError) {
  statusEl.textContent = text;
  statusEl.className = isError ? "error" : "";
}

async function errorText(response) {
  try {
    const body = await response.json();
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    return `${response.status} ${body.error}: ${detail}`;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModelInfo() {
  const el = document.getElementById("model-info");
  try {
    const r = await fetch("/model");
    if (!r.ok) { el.textContent = await errorText(r); return; }
    const m = await r.json();
    classNames = m.class_names || {};
    const members = m.ensemble ? m.ensemble.members.filter((x) => x.kept) : [];
    const what = members.length
      ? `Ensemble of ${members.map((x) => `${x.name} (${x.arch}, w=${x.weight.toFixed(2)})`).join(", ")}`
      : `Model ${m.arch || "?"}`;
    el.textContent = `${what} (${m.backend}, version ${m.version}), input ${m.input_size.join("x")}`;
    const hint = document.getElementById("metadata-hint");
    hint.textContent = m.uses_metadata
      ? "This model uses age, sex and site; leave a field empty when it is unknown."
      : "This model is image-only: these fields are not used.";
    const list = document.getElementById("site-list");
    list.replaceChildren(...(m.metadata_sites || []).map((s) => {
      const o = document.createElement("option");
      o.value = s;
      return o;
    }));
  } catch (e) {
    el.textContent = `Model information unavailable: ${e}`;
  }
}

function renderProbabilities(pred) {
  const tbody = document.querySelector("#probabilities tbody");
  tbody.replaceChildren();
  const rows = Object.entries(pred.probabilities).sort((a, b) => b[1] - a[1]);
  for (const [cls, p] of rows) {
    const tr = document.createElement("tr");
    tr.dataset.class = cls;
    if (cls === pred.top_class) tr.className = "top";
    const name = document.createElement("td");
    name.textContent = `${cls} — ${classNames[cls] || ""}`;
    const value = document.createElement("td");
    value.className = "p";
    value.textContent = (100 * p).toFixed(1) + " %";
    const barCell = document.createElement("td");
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.style.width = (100 * p).toFixed(1) + "%";
    bar.appendChild(fill);
    barCell.appendChild(bar);
    tr.append(name, value, barCell);
    tbody.appendChild(tr);
  }
  document.getElementById("top-class").textContent =
    `${pred.top_class} (${pred.top_class_name}), ${(100 * pred.top_probability).toFixed(1)} %`;
  const mel = document.getElementById("melanoma");
  const t = pred.decision.melanoma_threshold;
  mel.textContent = pred.melanoma_flag
    ? `Melanoma flag: RAISED (p(mel) = ${pred.melanoma_probability.toFixed(3)}${t === null ? "" : " ≥ " + t.toFixed(3)})`
    : `Melanoma flag: not raised (p(mel) = ${pred.melanoma_probability.toFixed(3)}${t === null ? "" : " < " + t.toFixed(3)})`;
  mel.className = pred.melanoma_flag ? "melanoma flagged" : "melanoma";
  document.getElementById("decision-note").textContent =
    `Decision rule: ${pred.decision.rule}. ${pred.decision.note || ""} Model version ${pred.model_version}.`;
  const md = pred.metadata;
  document.getElementById("metadata-note").textContent = md.used
    ? `Patient metadata: age ${md.age === null ? "unknown" : md.age}, sex ${md.sex}, ` +
      `site ${md.localization_bucket || "unknown"} (${md.note}).`
    : `Patient metadata: ${md.note}.`;
}

function formWithPatient(file) {
  const body = new FormData();
  body.append("file", file);
  for (const [field, id] of [["age", "age-input"], ["sex", "sex-input"], ["localization", "localization-input"]]) {
    const value = document.getElementById(id).value.trim();
    if (value) body.append(field, value);
  }
  return body;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = input.files[0];
  if (!file) { setStatus("Pick an image first.", true); return; }
  setStatus("Classifying…", false);
  result.hidden = true;
  document.getElementById("preview").src = URL.createObjectURL(file);
  const body = formWithPatient(file);
  try {
    const r = await fetch("/predict", { method: "POST", body });
    if (!r.ok) { setStatus(await errorText(r), true); return; }
    renderProbabilities(await r.json());
    result.hidden = false;
    setStatus("Computing Grad-CAM…", false);
    const overlay = document.getElementById("overlay");
    const caption = document.getElementById("overlay-caption");
    const body2 = formWithPatient(file);
    const e = await fetch("/explain", { method: "POST", body: body2 });
    if (!e.ok) {
      overlay.removeAttribute("src");
      caption.textContent = `Grad-CAM unavailable: ${await errorText(e)}`;
      setStatus("Done (no heat map).", false);
      return;
    }
    const blob = await e.blob();
    await new Promise((resolve) => {
      overlay.onload = resolve;
      overlay.onerror = resolve;
      overlay.src = URL.createObjectURL(blob);
    });
    caption.textContent = `Grad-CAM for ${e.headers.get("X-Explained-Class")} (layer ${e.headers.get("X-Target-Layer")})`;
    setStatus("Done.", false);
  } catch (err) {
    setStatus(`Request failed: ${err}`, true);
  }
});

loadModelInfo();
