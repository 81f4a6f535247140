// Validate glTF/GLB files with the Khronos glTF validator; prints one JSON report per line:
// {"path", "errors", "warnings", "infos", "messages": [first error/warning messages]}.
// Usage: node validate.cjs FILE...
const fs = require("fs");
const validator = require("gltf-validator");

async function main() {
  for (const path of process.argv.slice(2)) {
    const report = await validator.validateBytes(new Uint8Array(fs.readFileSync(path)), {
      maxIssues: 50,
      externalResourceFunction: (uri) => Promise.reject(new Error(`external resource ${uri} not allowed`)),
    });
    const issues = report.issues;
    console.log(JSON.stringify({
      path,
      errors: issues.numErrors,
      warnings: issues.numWarnings,
      infos: issues.numInfos,
      messages: issues.messages.filter((m) => m.severity <= 1).map((m) => `${m.code}: ${m.message} (${m.pointer || ""})`),
    }));
  }
}

main().catch((e) => { console.error(e.message); process.exit(1); });
