// Every `ts` code block of README.md type-checks, as written, against the
// client's sources: each block is a module of its own importing
// "@daemoneye/eventbus" (mapped to src/index.ts) and "@bufbuild/protobuf",
// checked by the TypeScript compiler with the package's tsconfig.json.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import ts from "typescript";

const ROOT = fileURLToPath(new URL("../", import.meta.url));
const FENCE = "`".repeat(3);

/** The README's TypeScript blocks, with the line each starts on. */
function blocks(): { line: number; code: string }[] {
  const text = readFileSync(join(ROOT, "README.md"), "utf8");
  const out: { line: number; code: string }[] = [];
  const pattern = new RegExp(`^${FENCE}ts\\n([\\s\\S]*?)^${FENCE}$`, "gm");
  for (const match of text.matchAll(pattern)) {
    const line = text.slice(0, match.index).split("\n").length + 1;
    out.push({ line, code: match[1] ?? "" });
  }
  return out;
}

test("every TypeScript example of the README type-checks", { timeout: 120_000 }, () => {
  const examples = blocks();
  assert.ok(examples.length >= 8, `${examples.length} blocks`);
  const config = ts.readConfigFile(join(ROOT, "tsconfig.json"), (path) => ts.sys.readFile(path));
  const parsed = ts.parseJsonConfigFileContent(config.config, ts.sys, ROOT);
  const options: ts.CompilerOptions = {
    ...parsed.options,
    noEmit: true,
    noUnusedLocals: true,
    paths: { "@daemoneye/eventbus": ["./src/index.ts"] },
  };
  // Virtual files next to package.json ("type": "module"), one per block.
  const files = new Map(
    examples.map(({ line, code }) => [join(ROOT, `readme-line-${line}.ts`), code]),
  );
  const host = ts.createCompilerHost(options);
  const getSourceFile = host.getSourceFile.bind(host);
  host.getSourceFile = (name, language, onError, create) => {
    const code = files.get(name);
    return code === undefined
      ? getSourceFile(name, language, onError, create)
      : ts.createSourceFile(name, code, language, true);
  };
  const fileExists = host.fileExists.bind(host);
  host.fileExists = (name) => files.has(name) || fileExists(name);
  const readFile = host.readFile.bind(host);
  host.readFile = (name) => files.get(name) ?? readFile(name);
  const program = ts.createProgram([...files.keys()], options, host);
  const problems = ts
    .getPreEmitDiagnostics(program)
    .filter((d) => d.file === undefined || files.has(d.file.fileName))
    .map((d) => {
      const message = ts.flattenDiagnosticMessageText(d.messageText, "\n");
      if (d.file === undefined || d.start === undefined) {
        return message;
      }
      const { line } = d.file.getLineAndCharacterOfPosition(d.start);
      return `${d.file.fileName.slice(ROOT.length)}:${line + 1}: ${message}`;
    });
  assert.deepEqual(problems, []);
});
