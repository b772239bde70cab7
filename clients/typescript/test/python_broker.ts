// The real Python broker for the TypeScript tests: `serve` runs from the
// project's virtualenv (.venv, `make venv`) in its own process, on a socket
// path of the test's choosing; tests that need it are skipped without it.

import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

import { connect } from "../src/index.js";

export const REPO = fileURLToPath(new URL("../../../", import.meta.url));
export const PYTHON = join(REPO, ".venv", "bin", "python");
/** A reason to skip, or false when the broker can run. */
export const SKIP: string | false = existsSync(PYTHON) ? false : `no ${PYTHON}: run \`make venv\``;

export const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** The environment the Python programs need: this checkout first on PYTHONPATH. */
export function pythonEnv(): NodeJS.ProcessEnv {
  const path = [REPO, join(REPO, "generated"), process.env["PYTHONPATH"] ?? ""];
  return { ...process.env, PYTHONPATH: path.filter(Boolean).join(":") };
}

/** A running broker: its process and what it wrote on stderr. */
export interface Broker {
  readonly proc: ChildProcess;
  stderr(): string;
}

/** Start `serve` on `path` and wait until it accepts a handshake. */
export async function startBroker(path: string, ...extra: string[]): Promise<Broker> {
  const args = ["-m", "daemoneye_eventbus.cli", "serve", "--socket", path, ...extra];
  if (process.getuid?.() === 0) {
    args.push("--allow-root"); // as root (CI) serve refuses to run on without it
  }
  const proc = spawn(PYTHON, args, { env: pythonEnv(), stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  proc.stderr?.on("data", (chunk: Buffer) => {
    stderr += chunk.toString();
  });
  const deadline = Date.now() + 20_000;
  for (;;) {
    if (proc.exitCode !== null) {
      throw new Error(`the broker exited with ${proc.exitCode}: ${stderr}`);
    }
    if (existsSync(path)) {
      try {
        const probe = await connect(path, { name: "probe" });
        await probe.close();
        break;
      } catch {
        // not accepting yet
      }
    }
    if (Date.now() > deadline) {
      proc.kill("SIGKILL");
      throw new Error(`the broker did not start: ${stderr}`);
    }
    await sleep(50);
  }
  return { proc, stderr: () => stderr };
}

/**
 * Stop the broker: SIGTERM shuts it down in order (a goodbye to every
 * client, protocol §8); SIGKILL after `graceMs` if it is still running.
 * Resolves to its exit code.
 */
export async function stopBroker(
  broker: Broker | undefined,
  signal: NodeJS.Signals = "SIGTERM",
  graceMs = 10_000,
): Promise<number | null> {
  if (broker === undefined || broker.proc.exitCode !== null || broker.proc.signalCode !== null) {
    return broker?.proc.exitCode ?? null;
  }
  const exited = new Promise<number | null>((resolve) =>
    broker.proc.once("exit", (code) => resolve(code)),
  );
  broker.proc.kill(signal);
  let timer: NodeJS.Timeout | undefined;
  const code = await Promise.race([
    exited,
    new Promise<null>((resolve) => (timer = setTimeout(() => resolve(null), graceMs))),
  ]);
  clearTimeout(timer);
  if (broker.proc.exitCode === null && broker.proc.signalCode === null) {
    broker.proc.kill("SIGKILL");
    return exited;
  }
  return code;
}

/** Run a command of the Python CLI against the broker; resolve to its exit code and output. */
export function cli(
  socket: string,
  command: string,
  ...args: string[]
): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve) => {
    const argv = ["-m", "daemoneye_eventbus.cli", command, "--socket", socket, ...args];
    const proc = spawn(PYTHON, argv, { env: pythonEnv(), stdio: ["ignore", "pipe", "pipe"] });
    let output = "";
    proc.stdout.on("data", (chunk: Buffer) => (output += chunk.toString()));
    proc.stderr.on("data", (chunk: Buffer) => (output += chunk.toString()));
    proc.on("close", (code) => resolve({ code, output }));
  });
}
