// The messages the extension sends to `localcoder lsp`, with no dependency on the `vscode` module,
// so the protocol test (test/protocol.test.js) exchanges exactly these with a real server.

export type Getter = <T>(key: string, fallback: T) => T;

/** The server-side settings (localcoder.* minus client-only ones), as `localcoder lsp` reads them. */
export interface ServerSettings {
  serverUrl?: string;
  model?: string;
  engine?: string;
  mode: string;
  maxTokens: number;
  timeBudgetMs: number;
  debounceMs: number;
  contextTokens: number;
}

export function serverSettings(get: Getter): ServerSettings {
  const s: ServerSettings = {
    mode: get("mode", "auto"),
    maxTokens: get("maxTokens", 64),
    timeBudgetMs: get("timeBudgetMs", 0),
    debounceMs: get("debounceMs", 0),
    contextTokens: get("contextTokens", 512),
  };
  // empty strings mean "the server's default": do not send them
  const url = get("serverUrl", "");
  const model = get("model", "");
  const engine = get("engine", "");
  if (url) s.serverUrl = url;
  if (model) s.model = model;
  if (engine) s.engine = engine;
  return s;
}

export function serverArgs(get: Getter): string[] {
  return ["lsp", ...get<string[]>("extraArgs", [])];
}

export const Methods = {
  accepted: "localcoder/accepted",
  rejected: "localcoder/rejected",
  stats: "localcoder/stats",
  prefetch: "localcoder/prefetch",
  acceptedCommand: "localcoder.accepted",
  docstringCommand: "localcoder.generateDocstring",
} as const;

export function didChangeConfiguration(settings: ServerSettings) {
  return { settings: { localcoder: settings } };
}

export function generateDocstringParams(uri: string, line: number, character: number) {
  return { command: Methods.docstringCommand, arguments: [uri, { line, character }] };
}

/** The completion id the server put in an item's accept command (undefined if none). */
export function completionId(item: { command?: { command: string; arguments?: unknown[] } }): number | undefined {
  const cmd = item.command;
  if (!cmd || cmd.command !== Methods.acceptedCommand || !cmd.arguments) return undefined;
  const id = cmd.arguments[0];
  return typeof id === "number" ? id : undefined;
}

/**
 * Tracks the completion on screen: when a new one replaces it without the accept command having
 * run, the old one was rejected (VS Code has no stable "rejected" event).
 */
export class Judge {
  private shown: number | undefined;
  private accepted = new Set<number>();

  constructor(private notify: (method: string, params: unknown) => void) {}

  show(id: number | undefined): void {
    this.settle();
    this.shown = id;
  }

  accept(id: number): void {
    this.accepted.add(id);
    if (this.accepted.size > 100) this.accepted.clear();
  }

  settle(): void {
    const id = this.shown;
    this.shown = undefined;
    if (id !== undefined && !this.accepted.has(id)) this.notify(Methods.rejected, { id });
  }
}

/** A cursor this many lines or more from the last place it rested has jumped (typing stays on a line). */
export const JUMP_LINES = 2;

export function prefetchParams(uri: string, line: number, character: number) {
  return { textDocument: { uri }, position: { line, character } };
}

/**
 * Sends `localcoder/prefetch` when the cursor lands somewhere new (another document, or JUMP_LINES or
 * more away from where it last rested) and stays there for `delayMs`: the server prefills a completion
 * there at the lowest priority, so the first keystroke after a jump finds its cache warm.
 */
export class Prefetcher {
  private last: { uri: string; line: number } | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;

  constructor(private notify: (method: string, params: unknown) => void, private delayMs = 250) {}

  moved(uri: string, line: number, character: number): void {
    const last = this.last;
    if (last && last.uri === uri && Math.abs(last.line - line) < JUMP_LINES) return;
    this.last = { uri, line };
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.notify(Methods.prefetch, prefetchParams(uri, line, character));
    }, this.delayMs);
  }

  dispose(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }
}
