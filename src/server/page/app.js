// The question page: everything goes through the public API (GET /v1/models,
// POST /v1/chat/completions with stream: true), so it shows what any client would get.
"use strict";

const $ = (id) => document.getElementById(id);
let models = []; // /v1/models data
let image = null; // data: URL of the chosen image
let controller = null; // aborts the running request

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

// An OpenAI error body ({"error": {"message": ...}}) or whatever else came back, as one line.
async function apiError(response) {
  const text = await response.text();
  try {
    const message = JSON.parse(text).error.message;
    if (message) return `${message} (HTTP ${response.status})`;
  } catch (_) {
    // not an OpenAI error body: show the text itself
  }
  return `HTTP ${response.status} ${response.statusText}${text ? ": " + text.slice(0, 300) : ""}`;
}

// The second choice's entries for one listed model: its precision, or for a model with
// versions, the model itself (requests split by weight) and each version.
function choicesOf(m) {
  if (!m.versions) return [{ id: m.id, root: m.root, label: m.precision, state: m.state, card: m.card }];
  const versions = m.versions.map((v) => ({
    id: v.id,
    root: m.id,
    label: `${v.version} (${v.precision}, weight ${v.weight})`,
    state: v.state,
    card: v.card,
  }));
  return [{ id: m.id, root: m.id, label: "any version, by weight", state: m.state, card: m.card }, ...versions];
}

// Models that share a package (`root`) are one choice; their precisions (or versions) the second.
async function loadModels() {
  try {
    const response = await fetch("/v1/models");
    if (!response.ok) throw new Error(await apiError(response));
    models = (await response.json()).data.flatMap(choicesOf);
  } catch (e) {
    showError(`Could not list the models: ${e.message}`);
    return;
  }
  const roots = [...new Set(models.map((m) => m.root))];
  $("model").replaceChildren(...roots.map((root) => new Option(models.find((m) => m.root === root).id, root)));
  fillPrecisions();
}

// The chosen model's card: one line on what it knows, and example pictures to ask about.
function showCard(choices) {
  const card = (choices.find((m) => m.card) || {}).card;
  $("about").textContent = card ? card.about : "";
  $("about").hidden = !card;
  $("examples").replaceChildren(
    ...(card ? card.examples : []).map((example) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "example";
      button.title = example.question;
      const thumb = new Image();
      thumb.src = example.image;
      thumb.alt = example.question;
      button.append(thumb);
      button.addEventListener("click", () => takeExample(example));
      return button;
    }),
  );
}

async function takeExample(example) {
  showError("");
  try {
    const response = await fetch(example.image);
    if (!response.ok) throw new Error(await apiError(response));
    takeFile(await response.blob(), example.question);
  } catch (e) {
    showError(`Could not load the example: ${e.message}`);
  }
}

function fillPrecisions() {
  const choices = models.filter((m) => m.root === $("model").value);
  showCard(choices);
  $("precision").replaceChildren(
    ...choices.map((m) => {
      const option = new Option(m.state === "ready" ? m.label : `${m.label} (${m.state})`, m.id);
      option.disabled = m.state !== "ready";
      return option;
    }),
  );
}

// A picture chosen, dropped or taken from the examples (then with its question).
function takeFile(file, question) {
  showError("");
  if (!file) return;
  const name = file.name || "the example";
  if (!file.type.startsWith("image/")) {
    showError(`"${name}" is not an image (${file.type || "unknown type"}). Choose a PNG, JPEG, GIF, WebP or BMP file.`);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    image = reader.result;
    $("preview").src = image;
    $("preview").hidden = false;
    $("drop-hint").classList.add("small");
    if (question) $("question").value = question;
  };
  reader.onerror = () => showError(`Could not read "${name}".`);
  reader.readAsDataURL(file);
}

// Server-sent events of a streaming completion, as parsed JSON objects, until [DONE].
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trim())
        .join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function setStats(stats) {
  for (const [id, text] of Object.entries(stats)) $(id).textContent = text;
}

function running(yes) {
  $("send").disabled = yes;
  $("stop").disabled = !yes;
}

async function ask(event) {
  event.preventDefault();
  showError("");
  const question = $("question").value.trim();
  if (!question) {
    showError("Type a question first.");
    return;
  }
  const content = image ? [{ type: "image_url", image_url: { url: image } }] : [];
  content.push({ type: "text", text: question });
  const body = {
    model: $("precision").value,
    messages: [{ role: "user", content }],
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: Number($("max-tokens").value) || undefined,
  };
  $("answer").textContent = "";
  setStats({ ttft: "-", tps: "-", tokens: "-", "answer-time": "-", finish: "running", version: "-" });
  controller = new AbortController();
  running(true);
  const start = performance.now();
  let first = null; // arrival of the first text
  let pieces = 0;
  let tokens = null;
  let served = null; // decode speed as the server measured it
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await apiError(response));
    setStats({ version: response.headers.get("x-vlmserve-model-version") || "-" });
    for await (const data of events(response)) {
      if (data.error) throw new Error(data.error.message);
      const choice = data.choices && data.choices[0];
      const text = choice && choice.delta && choice.delta.content;
      // Decode speed: tokens after the first over the time since it, up to this event (the
      // last one carries the end-of-sequence token's usage).
      const now = performance.now();
      if (text) {
        if (first === null) {
          first = now;
          setStats({ ttft: `${Math.round(first - start)} ms` });
        }
        pieces += 1;
        $("answer").textContent += text;
      }
      if (choice && choice.finish_reason) setStats({ finish: choice.finish_reason });
      if (data.usage) tokens = data.usage.completion_tokens;
      const count = tokens === null ? pieces : tokens;
      // The server's figure once it comes: fast tokens reach the page together, untimeable here.
      const timings = choice && choice.timings;
      if (timings && timings.decode_steps > 0) served = timings.decode_tokens_per_second;
      const seconds = first === null ? 0 : (now - first) / 1000;
      const measured = count > 1 && seconds > 0 ? (count - 1) / seconds : null;
      const tps = served === null ? measured : served;
      setStats({ tokens: String(count), tps: tps === null ? "-" : tps.toFixed(1) });
    }
  } catch (e) {
    if (e.name === "AbortError") setStats({ finish: "stopped" });
    else {
      setStats({ finish: "error" });
      showError(e.message);
    }
  } finally {
    setStats({ "answer-time": `${Math.round(performance.now() - start)} ms` });
    running(false);
  }
}

function init() {
  $("model").addEventListener("change", fillPrecisions);
  $("file").addEventListener("change", (e) => takeFile(e.target.files[0]));
  $("preview").addEventListener("error", () => {
    if (!image) return;
    image = null;
    $("preview").hidden = true;
    showError("The browser cannot display that file as an image. Choose another one.");
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    takeFile(e.dataTransfer.files[0]);
  });
  $("ask").addEventListener("submit", ask);
  $("stop").addEventListener("click", () => controller && controller.abort());
  loadModels();
}

init();
