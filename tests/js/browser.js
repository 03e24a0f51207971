// Drive Debian's headless Chromium with playwright-core for the Python tests.
//
//   node tests/js/browser.js CHROMIUM USER_DATA_DIR
//
// Launches CHROMIUM (never a browser downloaded by Playwright) with a new empty profile
// in USER_DATA_DIR, prints {"ready":true,"version":...} and then answers commands, one
// JSON object a line on stdin, with one JSON line on stdout: {"ok":true,"value":...} or
// {"ok":false,"error":"..."}. Page console lines and errors go to stderr. Ends when
// stdin closes. Commands ({"cmd": NAME, ...}):
//   goto {url}                      open url, wait for its load event
//   wait {expr, timeout}            wait until the JS expression is truthy in the page
//   text {selector}                 textContent of the first match
//   rows {selector}                 [[cell text, ...], ...] of every matching row
//   eval {expr}                     the value of the JS expression in the page
//   click {selector}                click the first match, as a user would
//   cookie {name, value, url}       add a cookie to the browser context
//   screenshot {path}               full-page PNG
"use strict";

const path = require("path");
const readline = require("readline");

function loadPlaywright() {
  const where = [
    path.join(__dirname, "..", "..", ".tools", "node_modules", "playwright-core"),
    "playwright-core",
  ];
  for (const candidate of where) {
    try {
      return require(candidate);
    } catch (err) {
      if (err.code !== "MODULE_NOT_FOUND") throw err;
    }
  }
  throw new Error("playwright-core is not installed (scripts/setup installs it in .tools/)");
}

function reply(object) {
  process.stdout.write(JSON.stringify(object) + "\n");
}

async function main() {
  const [executablePath, userDataDir] = process.argv.slice(2);
  if (!executablePath || !userDataDir) {
    throw new Error("usage: node browser.js CHROMIUM USER_DATA_DIR");
  }
  const { chromium } = loadPlaywright();
  // A persistent context on a new empty directory is Chromium's --user-data-dir.
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    viewport: { width: 1280, height: 800 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const page = context.pages()[0] || (await context.newPage());
  page.on("console", (msg) => process.stderr.write(`console.${msg.type()}: ${msg.text()}\n`));
  page.on("pageerror", (err) => process.stderr.write(`pageerror: ${err.message}\n`));
  page.on("websocket", (ws) => {
    process.stderr.write(`websocket: ${ws.url()}\n`);
    ws.on("close", () => process.stderr.write(`websocket closed: ${ws.url()}\n`));
  });
  const version = context.browser() ? context.browser().version() : "";
  reply({ ready: true, version });

  const commands = {
    goto: async (c) => {
      const response = await page.goto(c.url, { waitUntil: "load", timeout: c.timeout || 10000 });
      return response ? response.status() : null;
    },
    wait: async (c) => {
      await page.waitForFunction(c.expr, null, { timeout: c.timeout || 10000, polling: 50 });
      return true;
    },
    text: async (c) => page.textContent(c.selector, { timeout: c.timeout || 5000 }),
    rows: async (c) =>
      page.$$eval(c.selector, (rows) =>
        rows.map((row) => Array.from(row.children, (cell) => cell.textContent))),
    eval: async (c) => page.evaluate(c.expr),
    click: async (c) => {
      await page.click(c.selector, { timeout: c.timeout || 5000 });
      return true;
    },
    cookie: async (c) => {
      await context.addCookies([{ name: c.name, value: c.value, url: c.url }]);
      return true;
    },
    screenshot: async (c) => {
      await page.screenshot({ path: c.path, fullPage: true });
      return c.path;
    },
  };

  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (!line.trim()) continue;
    let command;
    try {
      command = JSON.parse(line);
      const run = commands[command.cmd];
      if (!run) throw new Error(`unknown command ${command.cmd}`);
      reply({ ok: true, value: await run(command) });
    } catch (err) {
      reply({ ok: false, error: String(err && err.message || err) });
    }
  }
  await context.close();
}

main().catch((err) => {
  process.stderr.write(`browser.js: ${err && err.stack || err}\n`);
  process.exit(1);
});
