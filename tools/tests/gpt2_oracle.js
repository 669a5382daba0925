// gpt2_oracle.js PACKAGE_DIR IN OUT - the oracle of test_tokenizer.c: reads one JSON string per
// line from IN, encodes each with the npm package gpt-3-encoder found in PACKAGE_DIR, and writes
// the ids of each as one JSON array per line to OUT, in the same order.
'use strict';
const fs = require('fs');
const path = require('path');

const [pkg, inPath, outPath] = process.argv.slice(2);
const { encode } = require(path.resolve(pkg));
const out = [];
for (const line of fs.readFileSync(inPath, 'utf8').split('\n')) {
  if (line !== '') out.push(JSON.stringify(encode(JSON.parse(line))));
}
fs.writeFileSync(outPath, out.join('\n') + (out.length ? '\n' : ''));
