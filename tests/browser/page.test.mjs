// The question page in a real browser: Debian's headless Chromium, driven by playwright-core,
// against a real `vlmserve serve` on the default configuration (the embedded shapes-vlm model)
// with one more model that has two versions.
// Saves screenshots under target/test-artifacts/.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const binary = process.env.VLMSERVE_BIN ?? path.join(root, "target/release/vlmserve");
const browserPath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const artifacts = path.join(root, "target/test-artifacts");
// A red circle drawn by export/synthetic.py (`--example`); the question's answer is "red".
const redCircle = path.join(root, "tests/fixtures/scenes/red-circle.png");
// 640x480 = 307200 pixels: over the image limit this test sets below, which the model's
// example pictures (up to 400x300) are within.
const largeImage = path.join(root, "models/shapes-vlm/eval-drawn/images/0011.png");
const MAX_IMAGE_PIXELS = 150000;

let server;
let baseUrl;
let browser;

// The default models (config/default.toml) and a model with versions.
const CONFIG = `
${["fp32", "fp16", "int8"]
  .map((p) => `[[models]]\nname = "shapes-vlm${p === "fp32" ? "" : `-${p}`}"\npath = "models/shapes-vlm/package"\nprecision = "${p}"\n`)
  .join("\n")}
[[models]]
name = "shapes-vlm-gray"
version = "stable"
path = "models/shapes-vlm/package"

[[models]]
name = "shapes-vlm-gray"
version = "candidate"
weight = 0
precision = "int8"
path = "models/shapes-vlm/package"
`;

function startServer() {
  const config = path.join(mkdtempSync(path.join(tmpdir(), "vlmserve-page-")), "config.toml");
  writeFileSync(config, CONFIG);
  const child = spawn(binary, ["serve", "--port", "0", "--config", config], {
    cwd: root,
    env: { ...process.env, VLMSERVE__SERVER__MAX_IMAGE_PIXELS: String(MAX_IMAGE_PIXELS) },
    stdio: ["ignore", "pipe", "inherit"],
  });
  return new Promise((resolve, reject) => {
    let out = "";
    child.stdout.on("data", (chunk) => {
      out += chunk;
      const found = out.match(/listening on (http:\/\/\S+)/);
      if (found) resolve({ child, url: found[1] });
    });
    child.on("exit", (code) => reject(new Error(`vlmserve serve exited with ${code} before listening`)));
  });
}

async function waitReady(url, seconds) {
  const end = Date.now() + seconds * 1000;
  while (Date.now() < end) {
    const response = await fetch(`${url}/ready`).catch(() => null);
    if (response && response.ok) return;
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`${url}/ready did not answer 200 within ${seconds} s`);
}

before(async () => {
  mkdirSync(artifacts, { recursive: true });
  ({ child: server, url: baseUrl } = await startServer());
  await waitReady(baseUrl, 120);
  browser = await chromium.launch({
    executablePath: browserPath,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
  });
});

after(async () => {
  await browser?.close();
  server?.kill("SIGTERM");
});

async function openPage() {
  const page = await browser.newPage({ viewport: { width: 900, height: 900 } });
  const failures = [];
  page.on("pageerror", (e) => failures.push(e.message));
  page.on("requestfailed", (r) => failures.push(`${r.url()} ${r.failure()?.errorText}`));
  await page.goto(baseUrl);
  await page.waitForFunction(() => document.querySelectorAll("#precision option").length > 0);
  return { page, failures };
}

async function askAndWait(page, question) {
  await page.fill("#question", question);
  await page.click("#send");
  await page.waitForFunction(() => !["-", "running"].includes(document.querySelector("#finish").textContent), null, {
    timeout: 60000,
  });
}

test("a question about an uploaded scene streams the right answer with timings", async () => {
  const { page, failures } = await openPage();
  const precisions = await page.$$eval("#precision option", (options) => options.map((o) => o.textContent));
  assert.deepEqual(precisions, ["fp32", "fp16", "int8"]);
  await page.setInputFiles("#file", redCircle);
  await page.waitForSelector("#preview:not([hidden])");
  const shown = await page.$eval("#preview", (img) => img.naturalWidth);
  assert.ok(shown > 0, "the chosen image is displayed");

  await askAndWait(page, "What color is the circle?");
  assert.equal(await page.textContent("#finish"), "stop");
  assert.equal((await page.textContent("#answer")).trim(), "red");
  assert.match(await page.textContent("#ttft"), /^\d+ ms$/);
  assert.match(await page.textContent("#answer-time"), /^\d+ ms$/);
  assert.equal(await page.textContent("#version"), "-", "a model without versions names none");
  // "red" and the end of utterance: two tokens, so a decode speed.
  assert.equal(await page.textContent("#tokens"), "2");
  assert.match(await page.textContent("#tps"), /^\d+\.\d$/);
  assert.equal(await page.isHidden("#error"), true);
  await page.screenshot({ path: path.join(artifacts, "page-answer.png"), fullPage: true });

  // Another precision of the same model, through the same page.
  await page.selectOption("#precision", { label: "int8" });
  await askAndWait(page, "What shape is the red object?");
  assert.equal((await page.textContent("#answer")).trim(), "circle");
  assert.deepEqual(failures, []);
  await page.close();
});

test("the model's card says what it knows, and an example picture is asked about in one click", async () => {
  const { page, failures } = await openPage();
  assert.match(await page.textContent("#about"), /circles, squares, triangles and stars/);
  const examples = await page.$$("#examples button");
  assert.equal(examples.length, 5);
  await page.waitForFunction(() => [...document.querySelectorAll("#examples img")].every((img) => img.naturalWidth > 0));
  await examples[0].click();
  await page.waitForSelector("#preview:not([hidden])");
  assert.equal(await page.inputValue("#question"), "What color is the square?");
  await page.click("#send");
  await page.waitForFunction(() => !["-", "running"].includes(document.querySelector("#finish").textContent), null, {
    timeout: 60000,
  });

  assert.equal((await page.textContent("#answer")).trim(), "blue");
  assert.match(await page.textContent("#answer-time"), /^\d+ ms$/);
  // A model with versions shows its versions' card.
  await page.selectOption("#model", { label: "shapes-vlm-gray" });
  assert.equal(await page.$$eval("#examples button", (b) => b.length), 5);
  assert.match(await page.textContent("#about"), /circles, squares, triangles and stars/);
  assert.deepEqual(failures, []);
  await page.screenshot({ path: path.join(artifacts, "page-examples.png"), fullPage: true });
  await page.close();
});

test("a model with versions offers each, and the answer names the version that gave it", async () => {
  const { page, failures } = await openPage();
  await page.selectOption("#model", { label: "shapes-vlm-gray" });
  const choices = await page.$$eval("#precision option", (options) => options.map((o) => o.textContent));
  assert.deepEqual(choices, ["any version, by weight", "stable (fp32, weight 100)", "candidate (int8, weight 0)"]);
  await page.setInputFiles("#file", redCircle);
  await page.waitForSelector("#preview:not([hidden])");
  await askAndWait(page, "What color is the circle?");
  assert.equal((await page.textContent("#answer")).trim(), "red");
  assert.equal(await page.textContent("#version"), "stable", "weight 0 takes nothing unasked");
  await page.selectOption("#precision", { label: "candidate (int8, weight 0)" });
  await askAndWait(page, "What color is the circle?");
  assert.equal((await page.textContent("#answer")).trim(), "red");
  assert.equal(await page.textContent("#version"), "candidate");
  assert.deepEqual(failures, []);
  await page.screenshot({ path: path.join(artifacts, "page-versions.png"), fullPage: true });
  await page.close();
});

test("a file that is not an image is refused with a readable message", async () => {
  const { page } = await openPage();
  await page.setInputFiles("#file", { name: "notes.txt", mimeType: "text/plain", buffer: Buffer.from("hello") });
  assert.match(await page.textContent("#error"), /"notes\.txt" is not an image/);
  assert.equal(await page.isHidden("#preview"), true);

  // Claims to be a PNG but is not one: the browser cannot show it, and the page says so.
  await page.setInputFiles("#file", { name: "fake.png", mimeType: "image/png", buffer: Buffer.from("not a png") });
  await page.waitForFunction(() => !document.querySelector("#error").hidden);
  assert.match(await page.textContent("#error"), /cannot display that file as an image/);
  await page.close();
});

test("an image over the server's limit shows the API's error", async () => {
  const { page } = await openPage();
  await page.setInputFiles("#file", largeImage);
  await page.waitForSelector("#preview:not([hidden])");
  await askAndWait(page, "What color is the circle?");
  assert.equal(await page.textContent("#finish"), "error");
  const message = await page.textContent("#error");
  assert.match(message, /HTTP 413/);
  assert.match(message, /pixels/);
  assert.equal(await page.textContent("#answer"), "");
  await page.screenshot({ path: path.join(artifacts, "page-error.png"), fullPage: true });
  await page.close();
});
