// The public surface of esf.js: every export is declared in esf.d.ts (and
// nothing is declared that is not exported), and documented in
// docs/websocket.md.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

import * as esf from "../../esf/web/esf.js";

const read = (path) => readFileSync(new URL(path, import.meta.url), "utf-8");

test("every export of esf.js is declared in esf.d.ts, and only those", () => {
  const declared = [...read("../../esf/web/esf.d.ts").matchAll(/^export declare (?:const|function|class) (\w+)/gm)]
    .map((m) => m[1]);
  assert.deepEqual([...new Set(declared)].sort(), Object.keys(esf).sort());
});

test("every export of esf.js is documented in docs/websocket.md", () => {
  const docs = read("../../docs/websocket.md");
  // `name` or `name(arguments)`, in code.
  const undocumented = Object.keys(esf).filter((name) => !new RegExp(`\`${name}[\`(]`).test(docs));
  assert.deepEqual(undocumented, []);
});
