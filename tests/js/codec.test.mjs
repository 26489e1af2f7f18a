// The JavaScript codec against the Python codec: the golden frames of
// tests/test_wire.py, the body layouts, the tables and the enums, exported
// to vectors.json by export_vectors.py.  Run: node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

import * as esf from "../../esf/web/esf.js";

const exported = JSON.parse(readFileSync(new URL("./vectors.json", import.meta.url), "utf-8"));

const camel = (name) => name.replace(/_([a-z])/g, (_, c) => c.toUpperCase());
const hex = (bytes) => Buffer.from(bytes).toString("hex");
const fromHex = (text) => new Uint8Array(Buffer.from(text, "hex"));

/** A body exported from Python, as esf.js holds it. */
function jsBody(fields) {
  const out = {};
  for (const [name, value] of Object.entries(fields)) {
    out[camel(name)] = value && typeof value === "object" && "hex" in value ? fromHex(value.hex) : value;
  }
  return out;
}

test("the enums are Python's", () => {
  const tables = {
    ClientType: esf.ClientType, MessageType: esf.MessageType, LogonResult: esf.LogonResult,
    DisconnectedType: esf.DisconnectedType, ErrorCode: esf.ErrorCode,
  };
  for (const [name, members] of Object.entries(exported.enums)) {
    assert.deepEqual({ ...tables[name] }, members, name);
  }
});

test("the body layouts are Python's, field by field", () => {
  const python = Object.fromEntries(
    Object.entries(exported.bodies).map(([name, fields]) => [name, fields.map(([f, kind]) => [camel(f), kind])]),
  );
  assert.deepEqual(Object.keys(esf.BODIES).sort(), Object.keys(python).sort());
  for (const [name, fields] of Object.entries(python)) assert.deepEqual(esf.BODIES[name], fields, name);
  assert.deepEqual({ ...esf.REQUEST_BODIES }, exported.request_bodies);
  assert.deepEqual({ ...esf.REPLY_BODIES }, exported.reply_bodies);
});

test("there are golden vectors of every body", () => {
  assert.ok(exported.vectors.length >= 40);
  const covered = new Set(exported.vectors.map((v) => v.body_class));
  for (const name of Object.keys(esf.BODIES)) assert.ok(covered.has(name), name);
});

for (const v of exported.vectors) {
  const config = new esf.WireConfig({ maxUserIdLength: v.max_userid_length });
  const table = v.sender === "client" ? esf.REQUEST_BODIES : esf.REPLY_BODIES;

  test(`golden encode: ${v.name}`, () => {
    assert.equal(table[v.message_type], v.body_class);
    const body = esf.encodeBody(v.body_class, jsBody(v.body));
    const frame = esf.encodeFrame(config, {
      messageType: v.message_type, body, clientType: v.client_type, messageId: v.message_id,
      userId: v.user_id, destUserId: v.dest_user_id,
    });
    assert.equal(hex(frame), v.hex);
  });

  test(`golden decode: ${v.name}`, () => {
    const frame = esf.decodeFrame(config, fromHex(v.hex));
    assert.equal(frame.messageType, v.message_type);
    assert.equal(frame.clientType, v.client_type);
    assert.equal(frame.messageId, v.message_id);
    assert.equal(frame.userId, v.user_id);
    assert.equal(frame.destUserId, v.dest_user_id);
    assert.equal(frame.body.length, fromHex(v.hex).length - config.headerLength);
    assert.deepEqual(esf.decodeBody(v.body_class, frame.body), jsBody(v.body));
  });
}

test("header lengths follow 2n + 14 rounded up to 4", () => {
  for (const [n, h] of [[1, 16], [2, 20], [11, 36], [20, 56], [255, 524]]) {
    const config = new esf.WireConfig({ maxUserIdLength: n });
    assert.equal(config.headerLength, h);
    assert.equal(config.idSlot, (h - 14) / 2);
  }
  assert.throws(() => new esf.WireConfig({ maxUserIdLength: 0 }), RangeError);
  assert.throws(() => new esf.WireConfig({ maxUserIdLength: 256 }), RangeError);
});

test("integers are little-endian", () => {
  const config = new esf.WireConfig();
  const frame = esf.encodeFrame(config, {
    messageType: 0x0259, messageId: 0x01020304, body: new Uint8Array(0x0105), userId: "a", destUserId: "b",
  });
  assert.deepEqual([...frame.subarray(2, 12)], [0x59, 0x02, 0x04, 0x03, 0x02, 0x01, 0x05, 0x01, 0, 0]);
  const body = esf.encodeBody("Information", { informationType: -2, payload: new Uint8Array(0) });
  assert.deepEqual([...body], [0xfe, 0xff, 0xff, 0xff]);
});

const golden = (name) => fromHex(exported.vectors.find((v) => v.name === name).hex);

test("decodeFrame refuses what is not exactly one valid frame", () => {
  const config = new esf.WireConfig({ maxMessageSize: 4096 });
  const heartbeat = golden("heartbeat");
  const cases = {
    "less than a header": heartbeat.subarray(0, 35),
    "two frames": new Uint8Array([...heartbeat, ...heartbeat]),
    "part of a body": golden("send-to-user").subarray(0, 40),
    "bad start token": Uint8Array.from(heartbeat, (b, i) => (i === 0 ? 0xfe : b)),
    "ID too long": Uint8Array.from(heartbeat, (b, i) => (i === 12 ? 12 : b)),
    "non-zero padding": Uint8Array.from(heartbeat, (b, i) => (i === 20 ? 1 : b)),
    "control character": Uint8Array.from(heartbeat, (b, i) => (i === 13 ? 0x07 : b)),
    "invalid UTF-8": Uint8Array.from(heartbeat, (b, i) => (i === 13 ? 0xc3 : b)),
    "negative body length": Uint8Array.from(heartbeat, (b, i) => (i === 11 ? 0x80 : b)),
  };
  for (const [what, bytes] of Object.entries(cases)) {
    assert.throws(() => esf.decodeFrame(config, bytes), esf.FrameError, what);
  }
  const big = Uint8Array.from(heartbeat, (b, i) => (i === 9 ? 0x10 : b)); // 4096 + 36 announced
  assert.throws(() => esf.decodeFrame(config, big), (e) => e.reason === esf.DisconnectedType.MESSAGE_TOO_LARGE);
});

test("encodeFrame refuses IDs that do not fit and frames that are too large", () => {
  const config = new esf.WireConfig({ maxMessageSize: 100 });
  assert.throws(() => esf.encodeFrame(config, { messageType: 104, userId: "a-very-long-id" }), RangeError);
  assert.throws(() => esf.encodeFrame(config, { messageType: 104, userId: "bad\nid" }), RangeError);
  assert.throws(() => esf.encodeFrame(config, { messageType: 202, body: new Uint8Array(65) }), RangeError);
  assert.equal(esf.encodeFrame(config, { messageType: 202, body: new Uint8Array(64) }).length, 100);
  // A UTF-8 ID is measured in bytes: 张三 is 6 bytes.
  assert.equal(esf.encodeId("张三", config).length, 6);
});

test("decodeBody refuses short, long and lying bodies", () => {
  assert.throws(() => esf.decodeBody("LogonReply", new Uint8Array([0, 5, 0])), esf.BadRequest);
  assert.throws(() => esf.decodeBody("Ack", new Uint8Array(5)), esf.BadRequest);
  assert.throws(() => esf.decodeBody("QueryOnlines", new Uint8Array([0xff, 0xff, 0, 0])), esf.BadRequest);
  assert.throws(() => esf.decodeBody("GetMyIPEReply", new Uint8Array([2, 0, 0xc3, 0x28])), esf.BadRequest);
  assert.deepEqual(esf.decodeBody("Empty", new Uint8Array(0)), {});
  assert.throws(() => esf.decodeBody("Empty", new Uint8Array(1)), esf.BadRequest);
});

test("payloads are bytes or text", () => {
  assert.deepEqual(esf.toBytes("hé"), new Uint8Array([0x68, 0xc3, 0xa9]));
  assert.equal(esf.toText(esf.toBytes("hé")), "hé");
  assert.deepEqual(esf.toBytes(new Uint8Array([1, 2]).buffer), new Uint8Array([1, 2]));
  assert.throws(() => esf.toBytes(42), TypeError);
});
