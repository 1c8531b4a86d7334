// The UI's only script: no framework, no build step. The new-job page builds the form from the parser's options
// (embedded by the server) and asks the server to check it; the job page polls /api/jobs/<id> every second.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const el = (tag, attributes = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value; else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
};

// Every request carries the token in a header: the server takes no change on the strength of a cookie, which the
// pages of every other port of this host send too.
const TOKEN = () => $('meta[name="ui-token"]').content;

async function api(method, url, body) {
  const options = { method, headers: { "X-Token": TOKEN() } };
  if (body instanceof FormData) options.body = body;
  else if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(url, options);
  const data = await response.json().catch(() => ({}));
  if (response.status === 403) refused(data.error);
  return { ok: response.ok, data };
}

// A UI restarted with another token (--token, or its token file deleted) refuses this page: say so, once, rather
// than freeze.
function refused(reason) {
  const banner = $("#refused");
  banner.textContent = `The UI refused this page (${reason}). It was probably restarted with another token: open ` +
    "the URL it printed in its terminal (…/?token=…), then this page again.";
  banner.hidden = false;
}

function showErrors(errors) {
  document.querySelectorAll(".error").forEach((node) => { node.textContent = ""; });
  const shown = Object.entries(errors || {}).map(([field, message]) => {
    const node = $(`.error[data-for="${field}"]`) || $('.error[data-for="form"]');
    node.textContent = message;
    return node;
  });
  // an error in the folded Advanced section is opened, and the first error brought into view
  if (shown.some((node) => node.closest("#advanced"))) $("#advanced").open = true;
  if (shown.length) shown[0].scrollIntoView({ block: "center" });
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "?";
  const s = Math.round(seconds);
  return s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

// ---- the new-job page ----

function newJobPage() {
  const setup = JSON.parse($("#setup").textContent);
  const form = $("#train-form");
  const values = setup.values || {};
  for (const name of ["photos_folder", "trigger", "class_word", "pretrained_model_name_or_path"]) {
    if (values[name]) form.elements[name].value = values[name];
  }
  buildAdvanced(setup.options, values.advanced || {});
  buildPresets(setup.presets, []);
  if (values.photos_folder) loadFolder();
  $("#load-folder").addEventListener("click", loadFolder);
  $("#upload").addEventListener("change", showUploads);
  $("#check").addEventListener("click", () => check(true));
  $("#copy").addEventListener("click", copyCommand);
  $("#plan").addEventListener("click", plan);
  form.addEventListener("submit", start);
  refreshJobs();
  setInterval(refreshJobs, 2000);
}

function buildAdvanced(options, values) {
  const root = $("#advanced-fields");
  let group = null;
  for (const option of options) {
    if (!group || group.dataset.title !== option.group) {
      group = el("fieldset", { "data-title": option.group }, el("legend", { text: option.group }));
      root.append(group);
    }
    const id = `adv-${option.name}`;
    let input;
    if (option.kind === "flag") {
      input = el("input", { type: "checkbox", id, name: id });
      input.checked = values[option.name] === true;
    } else if (option.kind === "choice") {
      input = el("select", { id, name: id }, ...(option.default ? [] : [el("option", { value: "", text: "(default)" })]),
        ...option.choices.map((choice) => el("option", { value: choice, text: choice })));
      input.value = values[option.name] ?? option.default;
    } else {
      input = el("input", { id, name: id, placeholder: option.default, size: 24 });
      input.value = values[option.name] ?? "";
    }
    input.dataset.option = option.name;
    group.append(el("div", { class: "option" },
      el("label", { for: id, text: `--${option.name}` }), input,
      el("span", { class: "help", text: option.help }),
      el("div", { class: "error", "data-for": option.name })));
  }
}

function buildPresets(names, table) {
  const body = $("#presets tbody");
  const rows = [{ name: "", options: [] }, ...(table.length ? table : names.map((name) => ({ name })))];
  const chosen = $("#train-form").elements.preset?.value || "";
  body.replaceChildren(...rows.map((row) => {
    const radio = el("input", { type: "radio", name: "preset", value: row.name });
    radio.checked = row.name === chosen;
    const fits = Object.entries(row.fits || {}).map(([gb, ok]) =>
      el("span", { class: ok ? "fits" : "no-fit", text: `${ok ? "✓" : "✗"} ${gb} GB` }));
    return el("tr", {}, el("td", {}, radio), el("td", { text: row.name || "my options as they are" }),
      el("td", {}, peakText(row), ...fits));
  }));
}

function peakText(row) {
  if (row.peak_gib === undefined) return "";
  const tiled = row.tiled_peak_gib < row.peak_gib ? ` (${row.tiled_peak_gib} with the VAE in tiles)` : "";
  return `${row.peak_gib} GiB${tiled} `;
}

function photoCard(src, name, caption) {
  return el("figure", { class: "photo" }, el("img", { src, alt: name }),
    el("figcaption", { text: name }),
    el("textarea", { "data-photo": name, rows: 2, cols: 24, placeholder: "caption (default: a photo of trigger class)" }, caption));
}

async function loadFolder() {
  const folder = $("#train-form").elements.photos_folder.value;
  const { ok, data } = await api("GET", `/api/folder?path=${encodeURIComponent(folder)}`);
  showErrors(ok ? {} : { photos: data.error });
  $('.warning[data-for="photos"]').textContent = ok ? data.skipped.join("\n") : "";
  if (!ok) return;
  $("#upload").value = "";
  $("#photos").replaceChildren(...data.photos.map((photo) => photoCard(
    `/api/folder/image?path=${encodeURIComponent(folder)}&name=${encodeURIComponent(photo.name)}`,
    photo.name, photo.caption)));
}

function showUploads() {
  const files = [...$("#upload").files];
  $("#photos").replaceChildren(...files.map((file) => photoCard(URL.createObjectURL(file), file.name, "")));
}

function formBody() {
  const form = $("#train-form");
  const advanced = {};
  form.querySelectorAll("[data-option]").forEach((input) => {
    advanced[input.dataset.option] = input.type === "checkbox" ? input.checked : input.value;
  });
  const captions = {};
  form.querySelectorAll("[data-photo]").forEach((area) => { captions[area.dataset.photo] = area.value; });
  const field = (name) => form.elements[name].value.trim();
  return { photos_folder: $("#upload").files.length ? "" : field("photos_folder"), trigger: field("trigger"),
    class_word: field("class_word"), pretrained_model_name_or_path: field("pretrained_model_name_or_path"),
    preset: form.elements.preset?.value || "", advanced, captions };
}

async function check(show) {
  const { ok, data } = await api("POST", "/api/check", formBody());
  showErrors(ok ? data.errors : { form: data.error });
  if (ok) {
    $("#command").textContent = data.command;
    $("#command").hidden = !show;
  }
  return ok && !Object.keys(data.errors).length;
}

async function copyCommand() {
  await check(true);
  try { await navigator.clipboard.writeText($("#command").textContent); } catch (error) { /* shown above */ }
}

async function plan() {
  $("#plan-state").textContent = "planning (up to a minute for SDXL)…";
  const { ok, data } = await api("POST", "/api/plan", formBody());
  $("#plan-state").textContent = ok ? "" : data.error;
  if (ok) buildPresets([], data.presets);
}

async function start(event) {
  event.preventDefault();
  const body = new FormData();
  body.append("form", JSON.stringify(formBody()));
  for (const file of $("#upload").files) body.append("photos", file);
  $("#start").disabled = true;
  const { ok, data } = await api("POST", "/api/jobs", body);
  $("#start").disabled = false;
  if (ok) window.location = `/jobs/${data.id}`;
  else showErrors(data.errors || { form: data.error });
}

async function refreshJobs() {
  const { ok, data } = await api("GET", "/api/jobs");
  if (!ok) return;
  $("#jobs-section").hidden = !data.jobs.length;
  $("#jobs tbody").replaceChildren(...data.jobs.map((job) => {
    const place = data.queue.indexOf(job.id);
    const actions = el("td");
    if (place > 0) actions.append(button("↑", () => api("POST", `/api/jobs/${job.id}/move`, { position: place - 1 }).then(refreshJobs)));
    if (place >= 0 && place < data.queue.length - 1) actions.append(button("↓", () => api("POST", `/api/jobs/${job.id}/move`, { position: place + 1 }).then(refreshJobs)));
    if (job.state === "waiting" || job.state === "running") actions.append(button("cancel", () => api("POST", `/api/jobs/${job.id}/cancel`).then(refreshJobs)));
    else actions.append(button("delete", () => deleteJob(job).then(refreshJobs)));
    // the id (its folder's name) tells apart jobs of one name; the time says which is which
    return el("tr", { "data-job": job.id }, el("td", {}, el("a", { href: `/jobs/${job.id}`, text: job.name || job.id })),
      el("td", { class: "muted", text: `${new Date(job.created * 1000).toLocaleString()} · ${job.id}` }),
      el("td", { class: `state ${job.state}`, text: job.state }), actions);
  }));
}

async function deleteJob(job) {
  if (!confirm(`Delete the job "${job.name || job.id}" with its adapters and images?`)) return false;
  const { ok, data } = await api("DELETE", `/api/jobs/${job.id}`);
  if (!ok) alert(data.error);
  return ok;
}

function button(text, onclick) {
  const node = el("button", { type: "button", text });
  node.addEventListener("click", onclick);
  return node;
}

// ---- the job page ----

function jobPage() {
  const id = $("#job").dataset.id;
  const files = (path) => `/api/jobs/${id}/files/${path.split("/").map(encodeURIComponent).join("/")}`;
  $("#cancel").addEventListener("click", () => api("POST", `/api/jobs/${id}/cancel`).then(refresh));
  $("#resume").addEventListener("click", () => api("POST", `/api/jobs/${id}/resume`).then(refresh));
  $("#delete").addEventListener("click", async () => {
    if (await deleteJob({ id, name: $("#job").dataset.name })) location.href = "/";
  });
  $("#generate").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target.elements;
    const { ok, data } = await api("POST", `/api/jobs/${id}/generate`, {
      prompts: form.prompts.value.split("\n"), checkpoint: form.checkpoint.value, seed: +form.seed.value,
      count: +form.count.value, guidance: +form.guidance.value, steps: +form.steps.value });
    showErrors(ok ? {} : { generate: data.error });
    refresh();
  });
  const adapter = $("#generate").elements.checkpoint;
  adapter.addEventListener("change", () => { adapter.dataset.picked = adapter.value; });
  let shown = "";
  async function refresh() {
    const { ok, data } = await api("GET", `/api/jobs/${id}`);
    if (!ok) return;
    $("#state").textContent = data.state;
    $("#state").className = `state ${data.state}`;
    $("#message").textContent = data.message.split("; wrote ")[0];  // the file list is in the log
    const p = data.progress;
    $("#bar").max = p.total || 1;
    $("#bar").value = p.step;
    $("#steps").textContent = p.total ? `step ${p.step} of ${p.total}` + (p.steps_per_second && data.state === "running"
      ? `, ${p.steps_per_second.toFixed(2)} steps/s, ${timeLeft(p)}` : "") : "";
    $("#cancel").hidden = !["running", "waiting"].includes(data.state) || data.message.startsWith("stopping");
    $("#resume").hidden = !["stopped", "failed", "cancelled"].includes(data.state);
    $("#delete").hidden = ["running", "waiting"].includes(data.state);
    chart($("#loss"), [
      { name: "loss", about: "each step's training loss", points: p.losses, colour: "#93c5fd" },
      { name: "mean of 10", about: "its mean over the last 10 steps", points: runningMean(p.losses, 10), colour: "#1d4ed8" },
    ]);
    $("#metrics-figure").hidden = !data.metrics.length;
    if (data.metrics.length) chart($("#metrics"), measureSeries(data.metrics, data.measures), data.samples.best_step);
    // the rest changes only when files appear: rebuilt then, so the images do not flicker
    const key = JSON.stringify([data.photos, data.samples, data.checkpoints, data.generations]);
    if (key !== shown) {
      shown = key;
      $("#instance").replaceChildren(...data.photos.map((path) => el("img", { src: files(path), title: path })));
      samples(data.samples, files);
      downloads(id, data.checkpoints);
      generated(data.generations, files);
    }
  }
  refresh();
  setInterval(refresh, 1000);
}

function timeLeft(p) {
  const validations = p.validations_left === 1 ? "1 validation" : `${p.validations_left} validations`;
  if (!p.validations_left) return `about ${duration(p.eta_seconds)} left`;
  if (p.validation_seconds === null) return `about ${duration(p.eta_seconds)} of training left, then ${validations}`;
  return `about ${duration(p.eta_seconds)} left (with ${validations})`;
}

function measureSeries(metrics, measures) {
  const colours = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];
  return Object.entries(measures).map(([name, about], index) => ({
    name, about, colour: colours[index % colours.length],
    points: metrics.filter((record) => typeof record[name] === "number").map((record) => [record.step, record[name]]),
  }));
}

function samples(grid, files) {
  $("#samples thead").replaceChildren(el("tr", {}, el("th", { text: "step" }),
    ...grid.prompts.map((prompt) => el("th", { text: prompt }))));
  $("#samples tbody").replaceChildren(...grid.rows.map((row) => el("tr",
    { class: row.step === grid.best_step ? "best" : "", "data-step": row.step },
    el("th", { text: `${row.final ? "final " : ""}${row.step}${row.step === grid.best_step ? " ★ best" : ""}` }),
    ...row.cells.map((cell) => el("td", {}, ...cell.map((path) => el("img", { src: files(path) })))))));
}

function downloads(id, checkpoints) {
  $("#downloads tbody").replaceChildren(...checkpoints.map((name) => el("tr", {}, el("td", { text: name }),
    ...["native", "diffusers", "kohya"].map((format) => el("td", {},
      el("a", { href: `/api/jobs/${id}/download/${name}/${format}`, download: "", "data-format": format, text: "download" }))))));
  // the adapter the user picked stays; until then it follows the run: best/ once there is one, else the newest
  const select = $("#generate").elements.checkpoint;
  const picked = select.dataset.picked;
  select.replaceChildren(...checkpoints.map((name) => el("option", { value: name, text: name })));
  const fallback = ["best", "final"].find((name) => checkpoints.includes(name)) || checkpoints[checkpoints.length - 1];
  select.value = checkpoints.includes(picked) ? picked : fallback || "";
}

function generated(list, files) {
  $("#generated").replaceChildren(...list.map((generation) => el("div", { class: `generation ${generation.state}` },
    el("p", { text: `#${generation.number} with ${generation.checkpoint}: ${generation.state} ${generation.message}` }),
    ...generation.images.map((image) => el("figure", { class: "photo" }, el("img", { src: files(image.path) }),
      el("figcaption", { class: "parameters", text: image.parameters }))))));
}

function runningMean(points, window) {
  return points.map(([step], index) => {
    const last = points.slice(Math.max(0, index - window + 1), index + 1);
    return [step, last.reduce((sum, [, value]) => sum + value, 0) / last.length];
  });
}

// A small line chart in SVG: one line per series of [step, value] points, each point a dot (so one validation shows),
// the chosen step marked; the legend beside it in HTML, each series in its colour with what it means.
function chart(svg, series, marked) {
  const [width, height, pad] = [320, 140, 24];
  const points = series.flatMap((line) => line.points);
  const legend = svg.parentElement.querySelector(".legend");
  legend.replaceChildren(...series.map((line) => el("li", {}, swatch(line.colour), el("b", { text: line.name }),
    line.about ? ` ${line.about}` : "")));
  if (marked !== null && marked !== undefined) {
    legend.append(el("li", {}, el("span", { class: "swatch marked" }), el("b", { text: `step ${marked}` }),
      " the chosen step (best/)"));
  }
  if (!points.length) { svg.replaceChildren(); return; }
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const x = (v) => pad + (width - 2 * pad) * (x1 > x0 ? (v - x0) / (x1 - x0) : 0.5);
  const y = (v) => height - pad - (height - 2 * pad) * (y1 > y0 ? (v - y0) / (y1 - y0) : 0.5);
  const ns = "http://www.w3.org/2000/svg";
  const node = (tag, attributes, text) => {
    const made = document.createElementNS(ns, tag);
    for (const [key, value] of Object.entries(attributes)) made.setAttribute(key, value);
    if (text !== undefined) made.textContent = text;
    return made;
  };
  const children = [node("text", { x: 2, y: 12, class: "axis" }, y1.toPrecision(3)),
    node("text", { x: 2, y: height - pad + 4, class: "axis" }, y0.toPrecision(3)),
    node("text", { x: pad, y: height - 4, class: "axis" }, `step ${x0}`),
    node("text", { x: width - pad, y: height - 4, class: "axis", "text-anchor": "end" }, `${x1}`)];
  if (marked !== null && marked !== undefined) {
    children.push(node("line", { x1: x(marked), x2: x(marked), y1: pad / 2, y2: height - pad, class: "marked" }));
  }
  for (const line of series) {
    const at = line.points.map(([a, b]) => [x(a).toFixed(1), y(b).toFixed(1)]);
    children.push(node("polyline", { fill: "none", stroke: line.colour, "stroke-width": 1.5,
      points: at.map((p) => p.join(",")).join(" ") }));
    if (line.points.length <= 40) {  // dots where they can be told apart: a single validation is one dot
      children.push(...at.map(([cx, cy]) => node("circle", { cx, cy, r: 2.5, fill: line.colour })));
    }
  }
  svg.replaceChildren(...children);
}

function swatch(colour) {
  const node = el("span", { class: "swatch" });
  node.style.background = colour;
  return node;
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.page === "new") newJobPage();
  if (document.body.dataset.page === "job") jobPage();
});
