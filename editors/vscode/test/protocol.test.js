#!/usr/bin/env node
// Protocol-level test of the extension: spawns `localcoder lsp` and exchanges the JSON-RPC
// messages the extension sends (built by the extension's own out/protocol.js), the way
// vscode-languageclient does it over stdio. VS Code itself cannot run here.
//
//   LOCALCODER_LSP="python -m localcoder.cli lsp --engine fake --model fake" node test/protocol.test.js
"use strict";
const assert = require("node:assert/strict");
const { spawn } = require("node:child_process");
const rpc = require("vscode-jsonrpc/node");
const proto = require("../out/protocol.js");

const expected = process.env.LOCALCODER_EXPECT || "return a + b";
const cmd = (process.env.LOCALCODER_LSP || "localcoder lsp").split(" ").filter(Boolean);

// What the extension reads from its settings (package.json defaults, a few overridden by a user).
const userSettings = { maxTokens: 48, debounceMs: 30, mode: "auto", extraArgs: [] };
const get = (key, fallback) => (key in userSettings ? userSettings[key] : fallback);

let checks = 0;
function check(cond, msg) {
  assert.ok(cond, msg);
  checks += 1;
}

function capabilities() {
  // the parts of VS Code's client capabilities that matter to this server
  return {
    general: { positionEncodings: ["utf-16"] },
    workspace: { applyEdit: true, didChangeConfiguration: { dynamicRegistration: true }, executeCommand: {} },
    textDocument: {
      synchronization: { didSave: true, dynamicRegistration: true },
      inlineCompletion: { dynamicRegistration: true },
      completion: { completionItem: { snippetSupport: true, documentationFormat: ["markdown", "plaintext"] } },
      codeAction: { codeActionLiteralSupport: { codeActionKind: { valueSet: ["refactor.rewrite"] } } },
    },
    window: { showMessage: {} },
  };
}

async function main() {
  const child = spawn(cmd[0], [...cmd.slice(1), ...proto.serverArgs(get).slice(1)], { stdio: ["pipe", "pipe", "inherit"] });
  const conn = rpc.createMessageConnection(new rpc.StreamMessageReader(child.stdout), new rpc.StreamMessageWriter(child.stdin));
  const messages = [];
  const edits = [];
  conn.onNotification("window/showMessage", (p) => messages.push(p));
  conn.onNotification("window/logMessage", () => {});
  conn.onRequest("workspace/applyEdit", (p) => { edits.push(p); return { applied: true }; });
  conn.listen();

  const t0 = Date.now();
  const init = await conn.sendRequest("initialize", {
    processId: process.pid,
    clientInfo: { name: "Visual Studio Code", version: "1.91.0" },
    rootUri: "file:///work/proj",
    capabilities: capabilities(),
    initializationOptions: proto.serverSettings(get),
  });
  const caps = init.capabilities;
  check(caps.inlineCompletionProvider, "inlineCompletionProvider advertised");
  check(caps.textDocumentSync.change === 2, "incremental sync");
  check(caps.executeCommandProvider.commands.includes(proto.Methods.acceptedCommand), "accept command registered");
  conn.sendNotification("initialized", {});
  console.log(`initialize answered in ${Date.now() - t0} ms`);

  // settings change, exactly as the extension sends it
  userSettings.maxTokens = 40;
  conn.sendNotification("workspace/didChangeConfiguration", proto.didChangeConfiguration(proto.serverSettings(get)));

  const uri = "file:///work/proj/add.py";
  conn.sendNotification("textDocument/didOpen", { textDocument: { uri, languageId: "python", version: 1, text: "# 😀 sum\n" } });
  // VS Code sends incremental changes with UTF-16 ranges: append after the emoji line
  conn.sendNotification("textDocument/didChange", {
    textDocument: { uri, version: 2 },
    contentChanges: [{ range: { start: { line: 1, character: 0 }, end: { line: 1, character: 0 } }, rangeLength: 0, text: "def add(a, b):\n    " }],
  });

  // automatic trigger, as the editor asks while the user types
  const judge = new proto.Judge((m, p) => conn.sendNotification(m, p));
  const req = (kind) => conn.sendRequest("textDocument/inlineCompletion", {
    textDocument: { uri }, position: { line: 2, character: 4 }, context: { triggerKind: kind },
  });
  judge.settle();
  const first = await req(2);
  check(first.items.length === 1 && first.items[0].insertText === expected, `completion text: ${JSON.stringify(first.items)}`);
  check(first.items[0].range.start.line === 2 && first.items[0].range.start.character === 4, "range at the cursor");
  judge.show(proto.completionId(first.items[0]));

  // the user accepts: VS Code runs the item's command, which the client proxies to the server
  const id = proto.completionId(first.items[0]);
  judge.accept(id);
  await conn.sendRequest("workspace/executeCommand", { command: first.items[0].command.command, arguments: first.items[0].command.arguments });

  // next completion is replaced without acceptance: the extension reports a rejection
  judge.settle();
  const second = await req(1);
  judge.show(proto.completionId(second.items[0]));
  judge.settle();

  // cancellation, as vscode-languageclient sends $/cancelRequest when the token fires
  const source = new rpc.CancellationTokenSource();
  const cancelled = conn.sendRequest("textDocument/inlineCompletion",
    { textDocument: { uri }, position: { line: 2, character: 4 }, context: { triggerKind: 2 } }, source.token);
  source.cancel();
  const outcome = await cancelled.then((r) => ({ r }), (e) => ({ e }));
  check(outcome.e ? outcome.e.code === -32800 : outcome.r.items.length <= 1, "cancelled request answered");

  // the cursor jumps far away and rests: the extension's Prefetcher tells the server, which prefills there
  const prefetcher = new proto.Prefetcher((m, p) => conn.sendNotification(m, p), 10);
  const warm = (s) => (s.prefills || 0) + (s.prefills_cancelled || 0);
  const before = warm(await conn.sendRequest(proto.Methods.stats, {}));
  prefetcher.moved(uri, 0, 0);
  prefetcher.moved(uri, 0, 3); // the same line: no second prefetch
  let warmed = {};
  for (let i = 0; i < 100 && !(warm(warmed) > before); i++) {
    await new Promise((r) => setTimeout(r, 50));
    warmed = await conn.sendRequest(proto.Methods.stats, {});
  }
  check(warm(warmed) === before + 1, `one prefetch reached the server: ${before} -> ${JSON.stringify(warmed)}`);

  const stats = await conn.sendRequest(proto.Methods.stats, {});
  check(stats.accepted === 1 && stats.rejected === 1, `accept/reject counted: ${JSON.stringify(stats)}`);
  check(stats.heavy_modules.indexOf("torch") < 0, "no torch in the LSP process");

  // generate docstring command (what the palette command sends)
  const doc = await conn.sendRequest("workspace/executeCommand", proto.generateDocstringParams(uri, 2, 4));
  check(doc.applied === true && edits.length === 1, `docstring edit applied: ${JSON.stringify(doc)}`);

  check(messages.length === 0, `no error messages: ${JSON.stringify(messages)}`);
  await conn.sendRequest("shutdown");
  conn.sendNotification("exit");
  const code = await new Promise((resolve) => child.on("exit", resolve));
  check(code === 0, `server exit code ${code}`);
  conn.dispose();
  console.log(`ok ${checks} checks`);
}

main().catch((err) => {
  console.error("FAIL", err);
  process.exit(1);
});
