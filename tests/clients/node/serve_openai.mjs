// The OpenAI Node SDK, unchanged, against imagegen serve's OpenAI-compatible endpoints.
//
// Usage: node serve_openai.mjs BASE_URL TOKEN RGBA_IMAGE.png MASK.png
// (run by runtime/tests/serve_api.rs; prints "openai-node ok" when every check passes).
import assert from "node:assert/strict";
import fs from "node:fs";

import OpenAI, { toFile } from "openai";

function pngSize(bytes) {
  assert.deepEqual([...bytes.subarray(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a], "not a PNG");
  return [bytes.readUInt32BE(16), bytes.readUInt32BE(20)];
}

async function fetchBytes(url) {
  const response = await fetch(url);
  return { status: response.status, bytes: Buffer.from(await response.arrayBuffer()) };
}

async function expectError(kind, call, check) {
  try {
    await call();
  } catch (e) {
    assert.ok(e instanceof kind, `${e?.constructor?.name}: ${e?.message}`);
    check(e);
    return;
  }
  assert.fail(`no ${kind.name}`);
}

const [base, token, imagePath, maskPath] = process.argv.slice(2);
const client = new OpenAI({ baseURL: base, apiKey: token, maxRetries: 0, timeout: 300_000 });

let result = await client.images.generate({
  prompt: "a cat", n: 2, size: "64x64", response_format: "b64_json", user: "u-1",
});
assert.equal(result.data.length, 2);
assert.equal(typeof result.created, "number");
for (const item of result.data) {
  assert.deepEqual(pngSize(Buffer.from(item.b64_json, "base64")), [64, 64]);
}

// The default answer is a URL that opens without credentials (signed, until the result
// expires); OpenAI model names mean the served model.
result = await client.images.generate({ model: "dall-e-2", prompt: "a dog", size: "64x64" });
const url = result.data[0].url;
assert.ok(url.startsWith("http://"), url);
const fetched = await fetchBytes(url);
assert.equal(fetched.status, 200);
assert.deepEqual(pngSize(fetched.bytes), [64, 64]);
assert.equal((await fetchBytes(url.replace("signature=", "signature=0"))).status, 401);

result = await client.images.generate({
  prompt: "a cat", size: "64x64", response_format: "b64_json", output_format: "webp",
});
const webp = Buffer.from(result.data[0].b64_json, "base64");
assert.equal(webp.subarray(0, 4).toString("latin1") + webp.subarray(8, 12).toString("latin1"), "RIFFWEBP");

// Edits, with files as the SDK uploads them (multipart).
result = await client.images.edit({
  image: await toFile(fs.readFileSync(imagePath), "image.png", { type: "image/png" }),
  mask: fs.createReadStream(maskPath),
  prompt: "a hat",
  size: "64x64",
  response_format: "b64_json",
});
assert.equal(result.data.length, 1);
assert.deepEqual(pngSize(Buffer.from(result.data[0].b64_json, "base64")), [64, 64]);

// Errors arrive in OpenAI's shape, as the SDK's error classes.
await expectError(OpenAI.UnprocessableEntityError, () => client.images.generate({ prompt: "x", size: "65x64" }), (e) => {
  assert.equal(e.param, "width");
  assert.equal(e.code, "invalid_field");
  assert.equal(e.type, "invalid_request_error");
  assert.ok(e.error.message);
});
await expectError(OpenAI.NotFoundError, () => client.images.generate({ model: "no-such-lora", prompt: "x", size: "64x64" }), (e) => {
  assert.equal(e.param, "model");
});
const stranger = new OpenAI({ baseURL: base, apiKey: "wrong-token", maxRetries: 0 });
await expectError(OpenAI.AuthenticationError, () => stranger.images.generate({ prompt: "x" }), (e) => {
  assert.equal(e.code, "unauthorized");
});
console.log("openai-node ok");
