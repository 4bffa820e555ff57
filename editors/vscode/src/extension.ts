// localcoder for VS Code: starts `localcoder lsp`, shows its inline completions as ghost text.
// All completion logic lives in the server; this file wires settings, status and commands.
import * as vscode from "vscode";
import {
  ExecuteCommandRequest,
  LanguageClient,
  LanguageClientOptions,
  ServerOptions,
  State,
  TransportKind,
} from "vscode-languageclient/node";
import {
  Judge,
  Methods,
  Prefetcher,
  completionId,
  didChangeConfiguration,
  generateDocstringParams,
  serverArgs,
  serverSettings,
} from "./protocol";

const SECTION = "localcoder";

type Status = "starting" | "ready" | "generating" | "error" | "disabled";

class Extension {
  private client: LanguageClient | undefined;
  private readonly status = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  private readonly judge = new Judge((method, params) => void this.client?.sendNotification(method, params));
  private readonly prefetcher = new Prefetcher((method, params) => void this.client?.sendNotification(method, params));
  private inflight = 0;

  constructor(private readonly context: vscode.ExtensionContext) {
    this.status.command = "localcoder.toggle";
    this.status.show();
    context.subscriptions.push(this.status);
  }

  private get config(): vscode.WorkspaceConfiguration {
    return vscode.workspace.getConfiguration(SECTION);
  }

  private get enabled(): boolean {
    return this.config.get<boolean>("enabled", true);
  }

  private get = <T>(key: string, fallback: T): T => this.config.get<T>(key, fallback);

  setStatus(s: Status, detail = ""): void {
    const icons: Record<Status, string> = {
      starting: "$(loading~spin)", ready: "$(sparkle)", generating: "$(sync~spin)", error: "$(error)", disabled: "$(circle-slash)",
    };
    this.status.text = `${icons[s]} localcoder`;
    this.status.tooltip = `localcoder: ${s}${detail ? ` — ${detail}` : ""} (click to toggle)`;
    this.status.backgroundColor = s === "error" ? new vscode.ThemeColor("statusBarItem.errorBackground") : undefined;
  }

  async start(): Promise<void> {
    const serverOptions: ServerOptions = {
      command: this.get("command", "localcoder"),
      args: serverArgs(this.get),
      transport: TransportKind.stdio,
    };
    const clientOptions: LanguageClientOptions = {
      documentSelector: [{ scheme: "file" }, { scheme: "untitled" }],
      initializationOptions: serverSettings(this.get),
      outputChannel: vscode.window.createOutputChannel("localcoder", { log: true }),
      middleware: {
        provideInlineCompletionItems: async (document, position, context, token, next) => {
          this.judge.settle();
          if (!this.enabled) return [];
          this.inflight += 1;
          this.setStatus("generating");
          try {
            const result = await next(document, position, context, token);
            const items = Array.isArray(result) ? result : result?.items ?? [];
            const first = items[0] as { command?: { command: string; arguments?: unknown[] } } | undefined;
            this.judge.show(first ? completionId(first) : undefined);
            return result;
          } finally {
            this.inflight -= 1;
            if (this.inflight === 0) this.setStatus(this.enabled ? "ready" : "disabled");
          }
        },
        executeCommand: async (command, args, next) => {
          if (command === Methods.acceptedCommand && typeof args[0] === "number") this.judge.accept(args[0]);
          return next(command, args);
        },
      },
    };
    this.setStatus("starting");
    this.client = new LanguageClient("localcoder", "localcoder", serverOptions, clientOptions);
    this.client.onDidChangeState((e) => {
      if (e.newState === State.Running) this.setStatus(this.enabled ? "ready" : "disabled");
      if (e.newState === State.Stopped) this.setStatus("error", "language server stopped");
    });
    try {
      await this.client.start();
    } catch (err) {
      this.setStatus("error", String(err));
      void vscode.window.showErrorMessage(`localcoder: cannot start \`${serverOptions.command} lsp\`: ${err}`);
      return;
    }
    // the server reports a failure once (model missing, server unreachable): show it and go red
    this.client.onNotification("window/showMessage", (p: { type: number; message: string }) => {
      if (p.type === 1) {
        this.setStatus("error", p.message);
        void vscode.window.showErrorMessage(p.message);
      } else {
        void vscode.window.showInformationMessage(p.message);
      }
    });
  }

  async stop(): Promise<void> {
    const c = this.client;
    this.client = undefined;
    if (c) await c.stop();
  }

  async onConfigurationChanged(e: vscode.ConfigurationChangeEvent): Promise<void> {
    if (!e.affectsConfiguration(SECTION)) return;
    if (e.affectsConfiguration(`${SECTION}.command`) || e.affectsConfiguration(`${SECTION}.extraArgs`)) {
      await this.restart();
      return;
    }
    this.setStatus(this.enabled ? "ready" : "disabled");
    await this.client?.sendNotification("workspace/didChangeConfiguration", didChangeConfiguration(serverSettings(this.get)));
  }

  async restart(): Promise<void> {
    await this.stop();
    await this.start();
  }

  async toggle(): Promise<void> {
    await this.config.update("enabled", !this.enabled, vscode.ConfigurationTarget.Global);
  }

  async generateDocstring(): Promise<void> {
    const editor = vscode.window.activeTextEditor;
    if (!editor || !this.client) return;
    const pos = editor.selection.active;
    const params = generateDocstringParams(editor.document.uri.toString(), pos.line, pos.character);
    this.setStatus("generating");
    try {
      await this.client.sendRequest(ExecuteCommandRequest.type, params);
    } catch (err) {
      void vscode.window.showErrorMessage(`localcoder: ${err instanceof Error ? err.message : err}`);
    } finally {
      this.setStatus("ready");
    }
  }

  /** The cursor moved (or another editor became active): maybe a jump worth a prefetch on the server. */
  cursorMoved(editor: vscode.TextEditor | undefined): void {
    if (!editor || !this.client || !this.enabled || editor.document.uri.scheme !== "file") return;
    const p = editor.selection.active;
    this.prefetcher.moved(editor.document.uri.toString(), p.line, p.character);
  }

  async showStats(): Promise<void> {
    if (!this.client) return;
    const s = await this.client.sendRequest<Record<string, unknown>>(Methods.stats, {});
    const rate = s.acceptance_rate == null ? "n/a" : `${Math.round(Number(s.acceptance_rate) * 100)}%`;
    void vscode.window.showInformationMessage(
      `localcoder: shown ${s.shown}, accepted ${s.accepted}, rejected ${s.rejected} (acceptance ${rate}); ` +
        `p50 ${s.latency_ms_p50 ?? "-"} ms, p95 ${s.latency_ms_p95 ?? "-"} ms`,
    );
  }
}

let extension: Extension | undefined;

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  const ext = new Extension(context);
  extension = ext;
  context.subscriptions.push(
    vscode.commands.registerCommand("localcoder.toggle", () => ext.toggle()),
    vscode.commands.registerCommand("localcoder.generateDocstring", () => ext.generateDocstring()),
    vscode.commands.registerCommand("localcoder.showStats", () => ext.showStats()),
    vscode.commands.registerCommand("localcoder.restart", () => ext.restart()),
    vscode.workspace.onDidChangeConfiguration((e) => ext.onConfigurationChanged(e)),
    vscode.window.onDidChangeTextEditorSelection((e) => ext.cursorMoved(e.textEditor)),
    vscode.window.onDidChangeActiveTextEditor((editor) => ext.cursorMoved(editor)),
  );
  await ext.start();
}

export async function deactivate(): Promise<void> {
  await extension?.stop();
}
