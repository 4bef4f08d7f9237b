// Node half of edgeslm's WebGPU runner: starts headless Chromium with playwright-core, opens the
// runner page, then answers one JSON request per stdin line with one JSON line on stdout.
// argv: <chromium path> <page url> <user-data-dir>
import { createRequire } from "node:module";
import readline from "node:readline";

const require = createRequire(import.meta.url);
const { chromium } = require(process.env.EDGESLM_PLAYWRIGHT || "playwright-core");
const [chromePath, url, userDataDir] = process.argv.slice(2);

function send(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: chromePath,
  headless: true,
  args: [
    "--enable-unsafe-webgpu", "--no-sandbox", "--headless=new", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
  ],
});
const page = context.pages()[0] || (await context.newPage());
const consoleLines = [];
page.on("console", (m) => consoleLines.push(m.text()));
page.on("pageerror", (e) => consoleLines.push("pageerror: " + e.message));
await page.goto(url);
const ready = await page.evaluate(() => window.edgeslm ? window.edgeslm.ready : { ok: false, kind: "error", message: "runner page did not load" });
send({ ...ready, console: consoleLines.slice(-20) });

const rl = readline.createInterface({ input: process.stdin });
for await (const line of rl) {
  if (!line.trim()) continue;
  const req = JSON.parse(line);
  if (req.op === "close") break;
  try {
    const result = await page.evaluate(async ({ op, args }) => {
      try {
        return { ok: true, ...(await window.edgeslm[op](...args)) };
      } catch (e) {
        return { ok: false, kind: e.kind || "error", message: String(e && e.message ? e.message : e) };
      }
    }, { op: req.op, args: req.args || [] });
    send(result);
  } catch (e) {
    send({ ok: false, kind: "driver", message: String(e), console: consoleLines.slice(-20) });
  }
}
await context.close();
process.exit(0);
