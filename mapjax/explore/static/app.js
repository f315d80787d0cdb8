// mapjax explore: the page. Plain JavaScript, no libraries, nothing fetched from anywhere but this server.
//
// State lives here (one level per value: free, locked at the mean, or a level as written); every change
// builds the palette string and asks the server, one request at a time: the newest palette waits while one is
// in flight, older unsent ones are dropped. Each palette is answered twice: first fast (verdict, λ, levels,
// KL, ESS, histograms), then with the LP certificate (the margin in sd). The URL carries the palette.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  let SLIDER_STEPS = 1000;     // the pool's description says how many steps a slider has
  const $ = (id) => document.getElementById(id);

  const state = {
    pool: null,
    levels: {},        // name -> {mode: "free" | "mean" | "level", text}
    order: [],         // constrained values in palette order
    priority: [],      // the priority order for Algorithm 3
    method: "greedy",
    prompt: null,
    answer: null,      // the last answer shown
    good: null,        // the last palette the server accepted
  };
  const stats = { answers: 0, certificates: 0, lastRoundTripMs: null, lastServerMs: null };
  const rows = {};     // name -> the row's elements

  // ------------------------------------------------------------------------------------------ requests
  class ServerError extends Error {
    constructor(message, status, field) { super(message); this.status = status; this.field = field; }
  }

  async function post(path, body) {
    const response = await fetch(path, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    let data = null;
    try { data = await response.json(); } catch (error) { data = null; }
    if (!response.ok) {
      const message = data && data.error ? data.error : `the server answered ${response.status}`;
      throw new ServerError(message, response.status, data && data.field);
    }
    return data;
  }

  // One request at a time; the newest wanted palette replaces any older one not yet sent.
  let latest = 0;
  let queued = null;
  let busy = false;

  function ask(palette, source) {
    latest += 1;
    queued = { palette, source, id: latest, started: performance.now() };
    document.body.dataset.pending = "1";
    pump();
  }

  async function pump() {
    if (busy || !queued) return;
    const job = queued;
    queued = null;
    busy = true;
    try {
      const answer = await post("/api/solve", { palette: job.palette, certificate: false });
      stats.lastServerMs = answer.timing_ms.total;
      show(answer, job);
      if (!queued && answer.status !== "unconstrained") {
        const full = await post("/api/solve", { palette: job.palette, certificate: true, histograms: false });
        if (!queued) showCertificate(full);
      }
    } catch (error) {
      refuse(error, job);
    } finally {
      release();
    }
  }

  // The solver is free again: run what queued meanwhile, or settle the page (samples, idle event).
  function release() {
    busy = false;
    if (queued) {
      pump();
    } else {
      document.body.dataset.pending = "0";
      refreshSamples();
      document.dispatchEvent(new CustomEvent("mapjax:idle", { detail: { palette: state.good } }));
    }
  }

  // ------------------------------------------------------------------------------------------- palette
  function paletteFromState() {
    return state.order
      .filter((name) => state.levels[name].mode !== "free")
      .map((name) => `${name}>=${state.levels[name].text}`)
      .join(", ");
  }

  function changeLevel(name, mode, text) {
    const level = state.levels[name];
    level.mode = mode;
    level.text = text;
    const position = state.order.indexOf(name);
    if (mode === "free" && position >= 0) state.order.splice(position, 1);
    if (mode !== "free" && position < 0) state.order.push(name);
    syncPriority();
    drawModes(name);
    ask(paletteFromState(), "control");
  }

  // The server's reading of a palette (typed, from the URL, adjusted) becomes the page's state.
  function adoptEntries(answer) {
    const entries = new Map(answer.entries.map((entry) => [entry.name, entry.level]));
    state.order = answer.entries.map((entry) => entry.name);
    for (const value of state.pool.values) {
      const text = entries.get(value.name);
      state.levels[value.name] = text === undefined ? { mode: "free", text: "" }
        : { mode: text === "mean" ? "mean" : "level", text };
      drawModes(value.name);
    }
    for (const value of answer.values) {
      if (value.target !== null) place(rows[value.name], value.target);
    }
    syncPriority();
  }

  function applyTyped() {
    const text = $("palette-input").value;
    ask(text, "typed");
  }

  // ------------------------------------------------------------------------------------------ answers
  function show(answer, job) {
    stats.answers += 1;
    const adopt = job.source !== "control";
    if (adopt) adoptEntries(answer);
    state.answer = answer;
    state.good = answer.palette;
    const input = $("palette-input");
    if (job.source !== "base") {
      $("palette-error").hidden = true;
      input.classList.remove("invalid");
      if (document.activeElement !== input || adopt) input.value = answer.palette;
    }
    drawVerdict(answer);
    drawValues(answer);
    drawCommands(answer);
    writeUrl();
    if (job.started !== undefined) stats.lastRoundTripMs = performance.now() - job.started;
    $("latency").textContent = `${answer.timing_ms.total.toFixed(1)} ms server · ${stats.lastRoundTripMs.toFixed(0)} ms shown`;
    document.body.dataset.answers = String(stats.answers);
    document.dispatchEvent(new CustomEvent("mapjax:answer", { detail: { palette: answer.palette } }));
  }

  function showCertificate(answer) {
    if (!state.answer || answer.palette !== state.answer.palette) return;
    stats.certificates += 1;
    state.answer.certificate = answer.certificate;
    drawVerdict(state.answer);
    for (const value of answer.values) rows[value.name].row.classList.toggle("blocking", value.blocking);
    document.body.dataset.certificates = String(stats.certificates);
  }

  function refuse(error, job) {
    if (job.source === "typed" || job.source === "url") {
      // A palette typed wrong: say why, next to it, and keep showing the last good state.
      $("palette-error").textContent = error.message;
      $("palette-error").hidden = false;
      $("palette-input").classList.add("invalid");
      if (job.source === "url" && state.good === null) {
        // A shared link with a palette that does not read: keep it in the box to fix, show the base meanwhile.
        $("palette-input").value = job.palette;
        ask("", "base");
      }
    } else {
      $("palette-error").textContent = error.message;
      $("palette-error").hidden = false;
    }
  }

  // ---------------------------------------------------------------------------------------- drawing
  function fmt(x, digits) {
    if (x === null || x === undefined || Number.isNaN(x)) return "—";
    const size = Math.abs(x);
    if (size !== 0 && (size >= 1e5 || size < 1e-3)) return x.toExponential(2);
    return x.toFixed(digits === undefined ? 3 : digits);
  }

  function drawVerdict(answer) {
    const verdict = $("verdict");
    const label = { reachable: "Reachable", unreachable: "Unreachable", "not converged": "Not converged",
      "base model": "Base model (no constraint)" }[answer.verdict] || answer.verdict;
    verdict.textContent = label;
    verdict.className = "verdict " + answer.verdict.replace(" ", "-");
    document.body.dataset.verdict = answer.verdict;
    const certificate = answer.certificate;
    $("explanation").textContent = certificate ? certificate.explanation
      : (answer.status === "unconstrained" ? "λ = 0: every value sits at its base level." : "");
    const margin = $("margin");
    if (!certificate) {
      margin.textContent = answer.status === "unconstrained" ? "—" : "…";
    } else if (certificate.source === "lp") {
      margin.textContent = `${certificate.margin_sd >= 0 ? "+" : ""}${Number(certificate.margin_sd).toPrecision(3)} sd`;
    } else {
      margin.textContent = `≤ ${Number(certificate.margin_sd).toPrecision(3)} sd (LP pending)`;
    }
    margin.dataset.source = certificate ? certificate.source : "";
    const blocking = certificate && !certificate.feasible ? certificate.blocking_values : [];
    $("blocking").textContent = blocking.length ? blocking.join(", ") : "none";
    $("blocking").classList.toggle("bad", blocking.length > 0);
    $("kl").textContent = fmt(answer.kl, 4);
    const scale = answer.ess_scale;
    $("ess").textContent = answer.ess === null ? "—"
      : `${fmt(answer.ess, scale.unit === "samples" ? 1 : 2)} of ${fmt(scale.of, scale.unit === "samples" ? 0 : 2)} ${scale.unit}`;
    $("kkt").textContent = answer.kkt_residual === null ? "—" : `${Number(answer.kkt_residual).toExponential(1)} sd`;
    const warning = $("ess-warning");
    warning.hidden = !answer.ess_warning;
    warning.textContent = answer.ess_warning || "";
  }

  function drawValues(answer) {
    for (const value of answer.values) {
      const parts = rows[value.name];
      const info = parts.info;
      parts.row.classList.toggle("blocking", value.blocking);
      parts.row.classList.toggle("constrained", value.target !== null);
      parts.target.textContent = value.target === null ? "unconstrained" : `≥ ${fmt(value.target)}`;
      if (value.level !== null && value.level !== undefined && !/^[-+0-9.e]+$/.test(value.level)) {
        parts.target.textContent += ` (${value.level})`;
      }
      parts.lambda.textContent = value.lambda === null ? "λ —" : `λ = ${fmt(value.lambda)}`;
      parts.lambda.dataset.value = value.lambda === null ? "" : String(value.lambda);
      drawBars(parts, info, value);
      drawHistogram(parts, info, answer.histograms ? answer.histograms[indexOf(value.name)] : null, value.target);
    }
  }

  function indexOf(name) { return state.pool.values.findIndex((value) => value.name === name); }

  function share(info, x) {
    const span = info.max - info.min;
    return span > 0 ? Math.min(1, Math.max(0, (x - info.min) / span)) : 0.5;
  }

  function drawBars(parts, info, value) {
    const realised = value.realised;
    parts.realisedBar.style.width = realised === null ? "0%" : `${(100 * share(info, realised)).toFixed(2)}%`;
    parts.baseBar.style.width = `${(100 * share(info, value.base)).toFixed(2)}%`;
    parts.targetMark.hidden = value.target === null;
    if (value.target !== null) parts.targetMark.style.left = `${(100 * share(info, value.target)).toFixed(2)}%`;
    parts.realisedText.textContent = `realised ${fmt(realised)}`;
    parts.baseText.textContent = `base ${fmt(value.base)}`;
  }

  function drawHistogram(parts, info, aligned, target) {
    const svg = parts.histogram;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const base = info.histogram.base;
    const bins = base.length;
    const top = Math.max(...base, ...(aligned || [0])) || 1;
    const width = 100 / bins;
    for (let i = 0; i < bins; i += 1) {
      svg.appendChild(rect(i * width, 40 - 40 * base[i] / top, width, 40 * base[i] / top, "hist-base"));
      if (aligned) svg.appendChild(rect(i * width + width * 0.2, 40 - 40 * aligned[i] / top, width * 0.6,
        40 * aligned[i] / top, "hist-aligned"));
    }
    if (target !== null) {
      const line = document.createElementNS(SVG, "line");
      const x = 100 * share(info, target);
      for (const [key, val] of [["x1", x], ["x2", x], ["y1", 0], ["y2", 40]]) line.setAttribute(key, val);
      line.setAttribute("class", "hist-target");
      svg.appendChild(line);
    }
  }

  function rect(x, y, width, height, kind) {
    const shape = document.createElementNS(SVG, "rect");
    shape.setAttribute("x", x.toFixed(3));
    shape.setAttribute("y", y.toFixed(3));
    shape.setAttribute("width", width.toFixed(3));
    shape.setAttribute("height", Math.max(0, height).toFixed(3));
    shape.setAttribute("class", kind);
    return shape;
  }

  function drawModes(name) {
    const parts = rows[name];
    const level = state.levels[name];
    for (const [mode, button] of Object.entries(parts.modes)) {
      button.classList.toggle("active", level.mode === mode);
      button.setAttribute("aria-pressed", level.mode === mode ? "true" : "false");
    }
    parts.row.dataset.mode = level.mode;
    parts.slider.classList.toggle("idle", level.mode === "free");
    parts.slider.disabled = !parts.info.constrainable || level.mode === "mean";
    if (level.mode === "mean") place(parts, parts.info.mean);
  }

  function drawCommands(answer) {
    const commands = answer.commands;
    $("command").textContent = commands ? commands.cli : "(no palette: nothing to solve)";
    $("copy-cli").disabled = !commands;
    $("copy-python").disabled = !commands;
  }

  // ------------------------------------------------------------------------------------------- building
  function buildValues(pool) {
    const container = $("values");
    for (const info of pool.values) {
      const row = element("article", "value-row");
      row.dataset.value = info.name;
      const head = element("div", "value-head");
      const title = element("h3", "value-name", info.name);
      const modes = element("div", "modes");
      const buttons = {};
      for (const [mode, label, help] of [["free", "free", "leave unconstrained"],
        ["mean", "lock at mean", "hold at its base mean"], ["level", "level", "a level from the slider"]]) {
        const button = element("button", "mode", label);
        button.type = "button";
        button.title = help;
        button.dataset.mode = mode;
        button.disabled = !info.constrainable && mode !== "free";
        button.addEventListener("click", () => {
          if (mode === "level") changeLevel(info.name, "level", sliderText(info, slider));
          else changeLevel(info.name, mode, mode === "mean" ? "mean" : "");
        });
        buttons[mode] = button;
        modes.appendChild(button);
      }
      const target = element("span", "target", "unconstrained");
      const lambda = element("span", "lambda", "λ = 0");
      head.append(title, modes, target, lambda);

      const sliderBox = element("div", "slider-box");
      const slider = document.createElement("input");
      slider.type = "range";
      slider.className = "slider idle";
      // The slider runs over whole steps 0..SLIDER_STEPS so that both ends are exactly reachable.
      slider.min = "0";
      slider.max = String(SLIDER_STEPS);
      slider.step = "1";
      slider.value = String(Math.round(share(info, info.mean) * SLIDER_STEPS));
      slider.setAttribute("aria-label", `${info.name} level`);
      slider.addEventListener("input", () => changeLevel(info.name, "level", sliderText(info, slider)));
      // Quantile ticks and the base mean; a label that would overlap one already placed is left to its tooltip.
      const ticks = element("div", "ticks");
      const marks = [{ at: share(info, info.mean), label: "mean", kind: "tick mean-tick",
        title: `base mean: ${fmt(info.mean)}` }].concat(info.quantiles.map((quantile) => ({
        at: share(info, quantile.level), label: `q${Math.round(quantile.q * 100)}`, kind: "tick",
        title: `q${quantile.q}: ${fmt(quantile.level)}` })));
      const labelled = [];
      for (const mark of marks) {
        const tick = element("span", mark.kind);
        tick.style.left = `${(100 * mark.at).toFixed(2)}%`;
        tick.title = mark.title;
        if (labelled.every((at) => Math.abs(at - mark.at) > 0.11)) {
          tick.appendChild(element("span", "tick-label", mark.label));
          labelled.push(mark.at);
        }
        ticks.appendChild(tick);
      }
      const range = element("div", "range-labels");
      range.append(element("span", "", fmt(info.min)), element("span", "", fmt(info.max)));
      sliderBox.append(slider, ticks, range);

      const bars = element("div", "bars");
      const track = element("div", "track");
      const baseBar = element("div", "bar base-bar");
      const realisedBar = element("div", "bar realised-bar");
      const targetMark = element("div", "target-mark");
      targetMark.hidden = true;
      track.append(baseBar, realisedBar, targetMark);
      const legend = element("div", "bar-legend");
      const realisedText = element("span", "realised-text", "");
      const baseText = element("span", "base-text", "");
      legend.append(realisedText, baseText);
      bars.append(track, legend);

      const histogram = document.createElementNS(SVG, "svg");
      histogram.setAttribute("viewBox", "0 0 100 40");
      histogram.setAttribute("preserveAspectRatio", "none");
      histogram.setAttribute("class", "histogram");
      histogram.setAttribute("role", "img");
      histogram.setAttribute("aria-label", `${info.name}: histogram under the base (grey) and aligned (blue) model`);

      row.append(head, sliderBox, bars, histogram);
      if (!info.constrainable) row.appendChild(element("p", "note", "constant over the pool: nothing to constrain"));
      container.appendChild(row);
      rows[info.name] = { row, slider, modes: buttons, target, lambda, baseBar, realisedBar, targetMark,
        realisedText, baseText, histogram, info };
      state.levels[info.name] = { mode: "free", text: "" };
      drawModes(info.name);
    }
  }

  // A slider's level as text: rounded to its step, except at its ends, which are the exact smallest and largest
  // rewards (rounding could step outside the pool's range, which the server refuses).
  function sliderText(info, slider) {
    const position = Number(slider.value);
    if (position >= SLIDER_STEPS) return String(info.max);
    if (position <= 0) return String(info.min);
    return (info.min + (info.max - info.min) * position / SLIDER_STEPS).toFixed(info.decimals);
  }

  function place(parts, level) {
    parts.slider.value = String(Math.round(share(parts.info, level) * SLIDER_STEPS));
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ------------------------------------------------------------------------------------------ priority
  function syncPriority() {
    const constrained = state.order.filter((name) => state.levels[name].mode !== "free");
    state.priority = state.priority.filter((name) => constrained.includes(name));
    for (const name of constrained) if (!state.priority.includes(name)) state.priority.push(name);
    drawPriority();
  }

  let dragged = null;

  function drawPriority() {
    const list = $("priority");
    while (list.firstChild) list.removeChild(list.firstChild);
    state.priority.forEach((name, index) => {
      const item = element("li", "priority-item");
      item.draggable = true;
      item.dataset.value = name;
      const handle = element("span", "handle", "⋮⋮");
      const label = element("span", "priority-name", name);
      const up = element("button", "move up", "↑");
      up.type = "button";
      up.title = `raise ${name}`;
      up.disabled = index === 0;
      up.addEventListener("click", () => move(name, -1));
      const down = element("button", "move down", "↓");
      down.type = "button";
      down.title = `lower ${name}`;
      down.disabled = index === state.priority.length - 1;
      down.addEventListener("click", () => move(name, 1));
      item.append(handle, label, up, down);
      item.addEventListener("dragstart", (event) => {
        dragged = name;
        event.dataTransfer.effectAllowed = "move";
        event.dataTransfer.setData("text/plain", name);
        item.classList.add("dragging");
      });
      item.addEventListener("dragend", () => { dragged = null; item.classList.remove("dragging"); });
      item.addEventListener("dragover", (event) => { event.preventDefault(); item.classList.add("over"); });
      item.addEventListener("dragleave", () => item.classList.remove("over"));
      item.addEventListener("drop", (event) => {
        event.preventDefault();
        const source = dragged || event.dataTransfer.getData("text/plain");
        if (source && source !== name && state.priority.includes(source)) {
          // The dragged value takes the place of the one it is dropped on, which moves one place towards it.
          const to = state.priority.indexOf(name);
          state.priority.splice(state.priority.indexOf(source), 1);
          state.priority.splice(to, 0, source);
          drawPriority();
          writeUrl();
        }
      });
      list.appendChild(item);
    });
    $("nearest").disabled = state.priority.length === 0;
    const greedy = state.method === "greedy";
    list.classList.toggle("inactive", !greedy);
    $("priority-hint").textContent = greedy
      ? "Priority, most important first (drag, or use the arrows):"
      : "Algorithm 2 moves every level towards the base along one line; no priority.";
  }

  function move(name, step) {
    const index = state.priority.indexOf(name);
    const other = index + step;
    if (other < 0 || other >= state.priority.length) return;
    [state.priority[index], state.priority[other]] = [state.priority[other], state.priority[index]];
    drawPriority();
    writeUrl();
  }

  async function nearest() {
    const palette = state.good;
    if (!palette) return;
    const body = { palette, method: state.method };
    if (state.method === "greedy") body.priority = state.priority;
    const button = $("nearest");
    button.disabled = true;
    latest += 1;      // answers to palettes asked before this click are no longer wanted
    queued = null;
    const started = performance.now();
    try {
      while (busy) await new Promise((resolve) => setTimeout(resolve, 5));
      busy = true;
      const answer = await post("/api/adjust", body);
      show(answer, { source: "adjust", started });
      showCertificate(answer);
      const adjustment = answer.adjustment;
      const note = $("adjust-note");
      note.hidden = false;
      note.textContent = adjustment.changed
        ? `${adjustment.algorithm}: moved ${adjustment.moved.join(", ")}` +
          (adjustment.rho !== null ? ` (ρ = ${adjustment.rho.toFixed(4)})` : "") + "."
        : "The palette is already reachable: nothing moved.";
    } catch (error) {
      refuse(error, { source: "typed" });
    } finally {
      button.disabled = state.priority.length === 0;
      release();
    }
  }

  // ------------------------------------------------------------------------------------------- samples
  let samplesAsked = 0;

  async function refreshSamples() {
    if (!state.pool || !state.pool.has_texts || state.prompt === null || state.good === null) return;
    const asked = ++samplesAsked;
    try {
      const answer = await post("/api/samples", { palette: state.good, prompt: state.prompt });
      if (asked === samplesAsked) drawSamples(answer);
    } catch (error) {
      $("samples-note").hidden = false;
      $("samples-note").textContent = error.message;
    }
  }

  function drawSamples(answer) {
    $("prompt-text").textContent = answer.prompt_text || `prompt ${answer.prompt}`;
    const note = $("samples-note");
    note.hidden = !answer.note;
    note.textContent = answer.note || "";
    const list = $("samples");
    while (list.firstChild) list.removeChild(list.firstChild);
    for (const sample of answer.samples) {
      const item = element("li", "sample");
      const bar = element("div", "sample-bar");
      const fill = element("div", "sample-fill");
      fill.style.width = `${(100 * sample.probability).toFixed(2)}%`;
      const base = element("div", "sample-base");
      base.style.left = `${(100 * sample.base_probability).toFixed(2)}%`;
      bar.append(fill, base);
      const head = element("div", "sample-head");
      head.append(element("span", "sample-p", `p = ${sample.probability.toFixed(3)}`),
        element("span", "sample-rewards", Object.entries(sample.rewards)
          .map(([name, value]) => `${name} ${fmt(value, 2)}`).join(" · ")));
      item.append(head, bar, element("p", "sample-text", sample.text));
      list.appendChild(item);
    }
    document.body.dataset.samples = String(answer.samples.length);
  }

  async function findPrompts(query) {
    try {
      const answer = await post("/api/prompts", { query, limit: 100 });
      const select = $("prompt-select");
      while (select.firstChild) select.removeChild(select.firstChild);
      if (state.prompt !== null && !answer.prompts.some((prompt) => prompt.index === state.prompt)) {
        select.appendChild(new Option(`#${state.prompt} (current)`, String(state.prompt)));
      }
      for (const prompt of answer.prompts) {
        select.appendChild(new Option(`#${prompt.index} · ${prompt.samples} samples · ${prompt.text}`,
          String(prompt.index)));
      }
      if (state.prompt !== null) select.value = String(state.prompt);
    } catch (error) {
      $("samples-note").hidden = false;
      $("samples-note").textContent = error.message;
    }
  }

  // ---------------------------------------------------------------------------------------------- URL
  function writeUrl() {
    const params = new URLSearchParams();
    if (state.good) params.set("palette", state.good);
    if (state.method !== "greedy") params.set("method", state.method);
    if (state.priority.length && state.priority.join(",") !== state.order.join(",")) {
      params.set("priority", state.priority.join(","));
    }
    if (state.prompt !== null && state.pool && state.prompt !== state.pool.default_prompt) {
      params.set("prompt", String(state.prompt));
    }
    const query = params.toString();
    history.replaceState(null, "", query ? `?${query}` : location.pathname);
  }

  function readUrl() {
    const params = new URLSearchParams(location.search);
    const method = params.get("method");
    if (method && state.pool.adjust_methods.some((known) => known.name === method)) state.method = method;
    const prompt = Number(params.get("prompt"));
    if (params.has("prompt") && Number.isInteger(prompt) && prompt >= 0 && prompt < state.pool.prompts) {
      state.prompt = prompt;
    }
    const priority = params.get("priority");
    return { palette: params.get("palette"), priority: priority ? priority.split(",") : null };
  }

  // --------------------------------------------------------------------------------------------- copy
  async function copy(text, what) {
    let done = false;
    try {
      await navigator.clipboard.writeText(text);
      done = true;
    } catch (error) {
      const area = element("textarea", "offscreen");
      area.value = text;
      document.body.appendChild(area);
      area.select();
      try { done = document.execCommand("copy"); } catch (ignored) { done = false; }
      document.body.removeChild(area);
    }
    const note = $("copy-note");
    note.hidden = false;
    note.textContent = done ? `Copied the ${what}.` : `Could not reach the clipboard; the ${what} is above.`;
    document.body.dataset.copied = what;
  }

  // -------------------------------------------------------------------------------------------- start
  async function start() {
    const response = await fetch("/api/pool");
    const pool = await response.json();
    state.pool = pool;
    SLIDER_STEPS = pool.slider_steps;
    const samples = `${pool.prompts} prompts, ${pool.samples} samples` +
      (pool.samples_per_prompt.max > 1 ? ` (${pool.samples_per_prompt.min}–${pool.samples_per_prompt.max} per prompt)` : "");
    $("pool-info").textContent = `${pool.source || "pool"} · ${samples} · ${pool.values.length} values · ` +
      `${pool.normaliser === "per_prompt" ? "per-prompt" : "pooled"} normaliser`;
    for (const method of pool.adjust_methods) $("adjust-method").appendChild(new Option(method.label, method.name));
    buildValues(pool);
    const wanted = readUrl();
    $("adjust-method").value = state.method;
    if (pool.has_texts) {
      $("samples-card").hidden = false;
      if (state.prompt === null) state.prompt = pool.default_prompt;
      findPrompts("");
    }

    $("palette-input").addEventListener("keydown", (event) => { if (event.key === "Enter") applyTyped(); });
    $("apply-palette").addEventListener("click", applyTyped);
    $("clear-palette").addEventListener("click", () => ask("", "typed"));
    $("nearest").addEventListener("click", nearest);
    $("adjust-method").addEventListener("change", () => {
      state.method = $("adjust-method").value;
      drawPriority();
      writeUrl();
    });
    $("copy-cli").addEventListener("click", () => copy(state.answer.commands.cli, "mapjax solve command"));
    $("copy-python").addEventListener("click", () => copy(state.answer.commands.python, "Python call"));
    $("copy-link").addEventListener("click", () => copy(location.href, "link to this view"));
    let searching = null;
    $("prompt-query").addEventListener("input", () => {
      clearTimeout(searching);
      searching = setTimeout(() => findPrompts($("prompt-query").value), 150);
    });
    $("prompt-select").addEventListener("change", () => {
      state.prompt = Number($("prompt-select").value);
      writeUrl();
      refreshSamples();
    });

    if (wanted.priority) state.priority = wanted.priority.filter((name) => name in state.levels);
    document.body.dataset.ready = "1";
    ask(wanted.palette || "", "url");
  }

  window.mapjaxExplore = { state, stats, ask };
  document.addEventListener("DOMContentLoaded", () => {
    start().catch((error) => {
      $("pool-info").textContent = `cannot load the pool: ${error.message}`;
    });
  });
})();
