// esf.js: the ESF v1 protocol for browsers (and any JavaScript runtime with
// WebSocket), in one ES module with no dependency and no build step.
//
//   import { EsfClient } from "./esf.js";
//   const client = new EsfClient("wss://chat.example.com/esf", { userId: "alice", password: "..." });
//   client.addEventListener("information", (e) => console.log(e.detail));
//   await client.logon();
//   client.send("bob", 1, "hello");
//
// The wire format is the one of docs/protocol.md: a fixed header (36 bytes
// with the default maximum UserID length of 11), then the body; every
// integer is LITTLE-endian (DataView's default is big-endian, so every
// get/set below passes `true`).  Over WebSocket each frame is one binary
// message (docs/websocket.md).

export const PROTOCOL_VERSION = 1;
export const SUBPROTOCOL = "esf.v1";
export const SERVER_ID = "_0";
export const EVERYONE_ID = "*";
export const DEVICE_MARK = "#";
export const START_TOKEN = 0xff;

/** Device kinds (ESFramework's numbering). */
export const ClientType = Object.freeze({
  DOTNET: 0, SILVERLIGHT: 1, WINDOWS_PHONE: 2, WEBSOCKET: 3, IOS: 4,
  ANDROID: 5, XAMARIN: 6, WEBSOCKET_SSL: 7, OTHERS: 8,
});

export const MessageType = Object.freeze({
  GET_MY_IPE: 101, PING_BY_SERVER: 102, PING_ACK: 103, HEARTBEAT: 104,
  BEING_PUSHED_OUT_NOTIFY: 105, DISCONNECT_NOTICE: 106, LOGOFF: 107, KICK_OUT: 108,
  BEING_KICKED_OUT_NOTIFY: 109, GET_ALL_ONLINE_USERS: 110, QUERY_ONLINE: 111, LOGON: 112,
  QUERY_ONLINES: 114, GET_MY_DEVICES: 116, MY_DEVICE_ONLINE: 117, MY_DEVICE_OFFLINE: 118,
  ERROR: 120, SEND: 202, REQUEST: 203, RESPONSE: 204, SEND_CERTAINLY: 205, ACK: 206,
  BLOB: 207, BROADCAST: 601,
});

export const LogonResult = Object.freeze({
  SUCCEED: 0, FAILED: 1, HAD_LOGGED_ON: 2, VERSION_MISMATCHED: 3, CLIENT_TYPE_REJECTED: 4, BUSY: 5,
});

export const DisconnectedType = Object.freeze({
  NETWORK_INTERRUPTED: 0, INVALID_MESSAGE: 1, MESSAGE_WITH_WRONG_USER_ID: 2,
  HEARTBEAT_TIMEOUT: 3, BEING_PUSHED_OUT: 4, NEW_CONNECTION_IGNORED: 5,
  CHANNEL_CACHE_OVERFLOW: 6, UNAUTHORIZED_CLIENT_TYPE: 7, MAX_CONNECTION_COUNT_LIMITTED: 8,
  BEING_KICKED_OUT: 9, LOGGED_OFF: 10, SERVER_SHUTDOWN: 11, LOGON_TIMEOUT: 12,
  LOGON_FAILED: 13, NOT_LOGGED_ON: 14, MESSAGE_TOO_LARGE: 15,
});

export const ErrorCode = Object.freeze({
  NOT_LOGGED_ON: 1, USER_OFFLINE: 2, NOT_AUTHORIZED: 3, UNKNOWN_MESSAGE_TYPE: 4,
  HANDLER_ERROR: 5, BAD_REQUEST: 6, TOO_LARGE: 7, RATE_LIMITED: 8, TIMEOUT: 9,
});

/** The name of `value` in one of the tables above, or the number as text. */
export function nameOf(table, value) {
  for (const [name, v] of Object.entries(table)) if (v === value) return name;
  return String(value);
}

// -- errors --------------------------------------------------------------------

/** Bytes that are not one valid frame. */
export class FrameError extends Error {
  constructor(message, reason = DisconnectedType.INVALID_MESSAGE) {
    super(message);
    this.name = "FrameError";
    this.reason = reason;
  }
}

/** A body too short, too long or malformed for its message type. */
export class BadRequest extends Error {
  constructor(message) {
    super(message);
    this.name = "BadRequest";
  }
}

/** A request answered with Error, or not answered in time (code TIMEOUT). */
export class RequestError extends Error {
  constructor(code, text) {
    super(`${nameOf(ErrorCode, code)}: ${text}`);
    this.name = "RequestError";
    this.code = code;
    this.text = text;
  }
}

/**
 * The call needs a logged-on session and there is none, or the connection
 * was lost.  `state` is the client's state then; `closeCode` the WebSocket
 * close code when a close caused it; `beforeHandshake` is true when the
 * connection closed before its WebSocket handshake completed (the server
 * could not be reached, or refused the handshake: an origin it does not
 * allow gets HTTP 403, which a page cannot see).
 */
export class NotConnected extends Error {
  constructor(message = "not logged on", { state = null, closeCode = null, beforeHandshake = false } = {}) {
    super(message);
    this.name = "NotConnected";
    this.state = state;
    this.closeCode = closeCode;
    this.beforeHandshake = beforeHandshake;
  }
}

/** The server refused the logon; `response` is its LogonResponse. */
export class LogonFailed extends Error {
  constructor(response) {
    super(`${nameOf(LogonResult, response.result)}: ${response.failureCause}`);
    this.name = "LogonFailed";
    this.response = response;
    this.result = response.result;
    this.cause = response.failureCause;
  }
}

// -- frames ----------------------------------------------------------------------

const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder("utf-8", { fatal: true });
// C0 and C1 control characters, and DEL: never allowed in an ID.
const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;

/** Text as UTF-8 bytes; bytes (Uint8Array, ArrayBuffer, views) as they are. */
export function toBytes(data) {
  if (typeof data === "string") return utf8Encoder.encode(data);
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (data === undefined || data === null) return new Uint8Array(0);
  throw new TypeError(`a payload is a string or bytes, not ${typeof data}`);
}

/** UTF-8 bytes as text (throws on invalid UTF-8). */
export function toText(bytes) {
  return utf8Decoder.decode(bytes);
}

/** The two settings both ends must agree on, and the header layout they give. */
export class WireConfig {
  constructor({ maxUserIdLength = 11, maxMessageSize = 1024 * 1024 } = {}) {
    if (!(Number.isInteger(maxUserIdLength) && maxUserIdLength >= 1 && maxUserIdLength <= 255)) {
      throw new RangeError(`maxUserIdLength must be in 1..255, not ${maxUserIdLength}`);
    }
    this.maxUserIdLength = maxUserIdLength;
    // 2n + 14 rounded up to a multiple of 4: 36 for n = 11.
    this.headerLength = Math.ceil((2 * maxUserIdLength + 14) / 4) * 4;
    this.idSlot = (this.headerLength - 14) / 2;
    if (!(maxMessageSize >= this.headerLength && maxMessageSize <= 0x7fffffff)) {
      throw new RangeError(`maxMessageSize must be at least the header length, not ${maxMessageSize}`);
    }
    this.maxMessageSize = maxMessageSize;
    Object.freeze(this);
  }
}

/** An ID's bytes for a header slot; throws RangeError when it does not fit. */
export function encodeId(id, config) {
  const bytes = utf8Encoder.encode(id);
  if (bytes.length > config.idSlot) {
    throw new RangeError(`ID ${JSON.stringify(id)} is ${bytes.length} bytes; the slot holds ${config.idSlot}`);
  }
  if (CONTROL.test(id)) throw new RangeError(`ID ${JSON.stringify(id)} holds control characters`);
  return bytes;
}

/**
 * One frame's bytes.
 * @param {WireConfig} config
 * @param {{messageType:number, body?:Uint8Array, clientType?:number, messageId?:number,
 *          userId?:string, destUserId?:string}} fields
 */
export function encodeFrame(config, { messageType, body = new Uint8Array(0), clientType = 0,
                                      messageId = 0, userId = "", destUserId = "" }) {
  const uid = encodeId(userId, config);
  const dest = encodeId(destUserId, config);
  const h = config.headerLength;
  const s = config.idSlot;
  if (h + body.length > config.maxMessageSize) {
    throw new RangeError(`a ${body.length}-byte body exceeds the maximum message size ${config.maxMessageSize}`);
  }
  const out = new Uint8Array(h + body.length);
  const view = new DataView(out.buffer);
  view.setUint8(0, START_TOKEN);
  view.setUint8(1, clientType);
  view.setUint16(2, messageType, true);
  view.setInt32(4, messageId, true);
  view.setInt32(8, body.length, true);
  view.setUint8(12, uid.length);
  out.set(uid, 13);
  view.setUint8(13 + s, dest.length);
  out.set(dest, 14 + s);
  out.set(body, h);
  return out;
}

function decodeId(bytes, offset, slot, which) {
  const length = bytes[offset];
  if (length > slot) throw new FrameError(`${which} length ${length} exceeds the ${slot}-byte ID slot`);
  for (let i = offset + 1 + length; i < offset + 1 + slot; i++) {
    if (bytes[i] !== 0) throw new FrameError(`${which} padding is not zero`);
  }
  let text;
  try {
    text = utf8Decoder.decode(bytes.subarray(offset + 1, offset + 1 + length));
  } catch {
    throw new FrameError(`${which} is not valid UTF-8`);
  }
  if (CONTROL.test(text)) throw new FrameError(`${which} holds control characters`);
  return text;
}

/**
 * Decode bytes that hold exactly one frame (one WebSocket message).
 * @returns {{clientType:number, messageType:number, messageId:number,
 *            userId:string, destUserId:string, body:Uint8Array}}
 */
export function decodeFrame(config, data) {
  const bytes = toBytes(data);
  const h = config.headerLength;
  if (bytes.length < h) throw new FrameError(`${bytes.length} bytes are less than one ${h}-byte header`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const start = view.getUint8(0);
  if (start !== START_TOKEN) throw new FrameError(`start token is 0x${start.toString(16)}, not 0xff`);
  const bodyLength = view.getInt32(8, true);
  if (bodyLength < 0 || h + bodyLength > config.maxMessageSize) {
    throw new FrameError(`body length ${bodyLength} outside 0..${config.maxMessageSize - h}`,
                         bodyLength < 0 ? DisconnectedType.INVALID_MESSAGE : DisconnectedType.MESSAGE_TOO_LARGE);
  }
  if (h + bodyLength !== bytes.length) {
    throw new FrameError(`the header announces ${h + bodyLength} bytes, the message holds ${bytes.length}`);
  }
  return {
    clientType: view.getUint8(1),
    messageType: view.getUint16(2, true),
    messageId: view.getInt32(4, true),
    userId: decodeId(bytes, 12, config.idSlot, "UserID"),
    destUserId: decodeId(bytes, 13 + config.idSlot, config.idSlot, "DestUserID"),
    body: bytes.subarray(h),
  };
}

// -- bodies ------------------------------------------------------------------------
//
// Each body is a list of fields in wire order: [name, kind] with kind one of
// u8 u16 u32 i32 (little-endian integers), bool (a u8), str (u16 byte count,
// then UTF-8), rest (the rest of the body, bytes), strs (u32 count, then
// strs), bools32 (u32 count, then u8 booleans), u8s8 (u8 count, then u8s).

export const BODIES = Object.freeze({
  Empty: [],
  Logon: [["protocolVersion", "u16"], ["systemToken", "str"], ["password", "str"]],
  LogonReply: [["result", "u8"], ["failureCause", "str"], ["heartbeatInterval", "u16"],
               ["heartbeatTimeout", "u16"], ["maxMessageSize", "u32"]],
  GetMyIPEReply: [["address", "str"]],
  BeingPushedOutNotify: [["cause", "str"]],
  DisconnectNotice: [["reason", "u8"], ["text", "str"]],
  KickOut: [["reason", "str"]],
  KickOutReply: [["ok", "bool"], ["cause", "str"]],
  BeingKickedOutNotify: [["operator", "str"], ["reason", "str"]],
  GetAllOnlineUsers: [["offset", "u32"], ["limit", "u32"]],
  GetAllOnlineUsersReply: [["total", "u32"], ["userIds", "strs"]],
  QueryOnlineReply: [["online", "bool"]],
  QueryOnlines: [["userIds", "strs"]],
  QueryOnlinesReply: [["online", "bools32"]],
  GetMyDevicesReply: [["clientTypes", "u8s8"]],
  Error: [["requestMessageType", "u16"], ["code", "u16"], ["text", "str"]],
  Information: [["informationType", "i32"], ["payload", "rest"]],
  Ack: [["informationType", "i32"]],
  BlobFragment: [["informationType", "i32"], ["blobId", "u32"], ["fragmentIndex", "u32"],
                 ["isLast", "bool"], ["payload", "rest"]],
});

/** The body of every message a client sends, by MessageType. */
export const REQUEST_BODIES = Object.freeze({
  112: "Logon", 104: "Empty", 101: "Empty", 102: "Empty", 103: "Empty", 107: "Empty",
  108: "KickOut", 110: "GetAllOnlineUsers", 111: "Empty", 114: "QueryOnlines", 116: "Empty",
  202: "Information", 203: "Information", 204: "Information", 205: "Information",
  206: "Ack", 207: "BlobFragment", 601: "Information",
});

/** The body of every message a server sends, by MessageType. */
export const REPLY_BODIES = Object.freeze({
  112: "LogonReply", 104: "Empty", 101: "GetMyIPEReply", 102: "Empty", 103: "Empty",
  105: "BeingPushedOutNotify", 106: "DisconnectNotice", 108: "KickOutReply",
  109: "BeingKickedOutNotify", 110: "GetAllOnlineUsersReply", 111: "QueryOnlineReply",
  114: "QueryOnlinesReply", 116: "GetMyDevicesReply", 117: "Empty", 118: "Empty",
  120: "Error", 202: "Information", 203: "Information", 204: "Information",
  205: "Information", 206: "Ack", 207: "BlobFragment", 601: "Information",
});

const INT_SIZES = { u8: 1, u16: 2, u32: 4, i32: 4, bool: 1 };

function encodeStr(text) {
  const bytes = utf8Encoder.encode(text);
  if (bytes.length > 0xffff) throw new RangeError(`a str field holds at most 65535 bytes, not ${bytes.length}`);
  const out = new Uint8Array(2 + bytes.length);
  new DataView(out.buffer).setUint16(0, bytes.length, true);
  out.set(bytes, 2);
  return out;
}

function encodeInt(kind, value) {
  const out = new Uint8Array(INT_SIZES[kind]);
  const view = new DataView(out.buffer);
  const n = kind === "bool" ? (value ? 1 : 0) : value;
  if (!Number.isInteger(n)) throw new RangeError(`${kind} needs a whole number, not ${value}`);
  if (kind === "u8" || kind === "bool") {
    if (n < 0 || n > 0xff) throw new RangeError(`${n} does not fit a u8`);
    view.setUint8(0, n);
  } else if (kind === "u16") {
    if (n < 0 || n > 0xffff) throw new RangeError(`${n} does not fit a u16`);
    view.setUint16(0, n, true);
  } else if (kind === "u32") {
    if (n < 0 || n > 0xffffffff) throw new RangeError(`${n} does not fit a u32`);
    view.setUint32(0, n, true);
  } else {
    if (n < -0x80000000 || n > 0x7fffffff) throw new RangeError(`${n} does not fit an i32`);
    view.setInt32(0, n, true);
  }
  return out;
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const p of parts) {
    out.set(p, offset);
    offset += p.length;
  }
  return out;
}

/** Encode a body: `encodeBody("Information", {informationType: 1, payload})`. */
export function encodeBody(name, fields = {}) {
  const parts = [];
  for (const [field, kind] of BODIES[name]) {
    const value = fields[field];
    if (kind in INT_SIZES) parts.push(encodeInt(kind, value ?? 0));
    else if (kind === "str") parts.push(encodeStr(value ?? ""));
    else if (kind === "rest") parts.push(toBytes(value));
    else if (kind === "strs") parts.push(encodeInt("u32", value.length), ...value.map(encodeStr));
    else if (kind === "bools32") parts.push(encodeInt("u32", value.length), ...value.map((v) => encodeInt("bool", v)));
    else if (kind === "u8s8") parts.push(encodeInt("u8", value.length), ...value.map((v) => encodeInt("u8", v)));
    else throw new Error(`unknown field kind ${kind}`);
  }
  return concat(parts);
}

class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
  }

  int(kind) {
    const size = INT_SIZES[kind];
    if (this.pos + size > this.bytes.length) throw new BadRequest(`body ends inside a ${kind} at byte ${this.pos}`);
    const at = this.pos;
    this.pos += size;
    switch (kind) {
      case "u8": return this.view.getUint8(at);
      case "bool": return this.view.getUint8(at) !== 0;
      case "u16": return this.view.getUint16(at, true);
      case "u32": return this.view.getUint32(at, true);
      default: return this.view.getInt32(at, true);
    }
  }

  str() {
    const n = this.int("u16");
    if (this.pos + n > this.bytes.length) throw new BadRequest(`str of ${n} bytes at byte ${this.pos} runs past the body`);
    const at = this.pos;
    this.pos += n;
    try {
      return utf8Decoder.decode(this.bytes.subarray(at, at + n));
    } catch {
      throw new BadRequest(`str at byte ${at} is not valid UTF-8`);
    }
  }

  count(kind, itemSize) {
    const n = this.int(kind);
    if (n * itemSize > this.bytes.length - this.pos) throw new BadRequest(`count ${n} cannot fit in the rest of the body`);
    return n;
  }

  rest() {
    const data = this.bytes.slice(this.pos);
    this.pos = this.bytes.length;
    return data;
  }
}

/** Decode a body; throws BadRequest when it does not parse. */
export function decodeBody(name, data) {
  const reader = new Reader(toBytes(data));
  const out = {};
  for (const [field, kind] of BODIES[name]) {
    if (kind in INT_SIZES) out[field] = reader.int(kind);
    else if (kind === "str") out[field] = reader.str();
    else if (kind === "rest") out[field] = reader.rest();
    else if (kind === "strs") out[field] = Array.from({ length: reader.count("u32", 2) }, () => reader.str());
    else if (kind === "bools32") out[field] = Array.from({ length: reader.count("u32", 1) }, () => reader.int("bool"));
    else if (kind === "u8s8") out[field] = Array.from({ length: reader.count("u8", 1) }, () => reader.int("u8"));
  }
  if (reader.pos !== reader.bytes.length) throw new BadRequest(`${reader.bytes.length - reader.pos} unexpected bytes after the body`);
  return out;
}

// -- the client ----------------------------------------------------------------------

/** Answers to this client's own requests, matched by MessageID and sender. */
const REPLY_TYPES = new Set([
  MessageType.LOGON, MessageType.GET_MY_IPE, MessageType.PING_ACK, MessageType.KICK_OUT,
  MessageType.GET_ALL_ONLINE_USERS, MessageType.QUERY_ONLINE, MessageType.QUERY_ONLINES,
  MessageType.GET_MY_DEVICES, MessageType.ERROR, MessageType.RESPONSE, MessageType.ACK,
]);

/** Notices after which the client does not reconnect. */
const FOR_GOOD = new Set([
  DisconnectedType.BEING_PUSHED_OUT, DisconnectedType.BEING_KICKED_OUT,
  DisconnectedType.NEW_CONNECTION_IGNORED, DisconnectedType.LOGON_FAILED,
]);

const MAX_MESSAGE_ID = 0x7fffffff;

/** Message types the server's offline store delivers (protocol.md 8.7). */
const STORED_TYPES = new Set([MessageType.SEND, MessageType.SEND_CERTAINLY, MessageType.BLOB]);

// The close codes this client sends.  A browser may send only 1000 and
// 3000-4999, so the two failures have codes of their own.
export const CLOSE_NORMAL = 1000;
/** The server did not answer (a logon, or any frame for heartbeatTimeout). */
export const CLOSE_NO_ANSWER = 4000;
/** The server sent what is not one ESF frame per binary message, or another subprotocol. */
export const CLOSE_PROTOCOL_ERROR = 4002;
/** The server read nothing while this client answered it with more than maxBufferedAmount bytes. */
export const CLOSE_BACKED_UP = 4003;

/**
 * Above this many unsent bytes the server is taken as not reading: the
 * client sends no PingAck then (as the server sends no pong to a peer that
 * does not read), the same threshold as a TCP transport's.
 */
const BUSY_AMOUNT = 64 * 1024;

/** `text` cut to at most `limit` bytes of UTF-8, on a character boundary. */
function truncateUtf8(text, limit) {
  let out = text;
  while (utf8Encoder.encode(out).length > limit) out = out.slice(0, -1);
  return out;
}

/** The real clock; tests pass their own with the same three members. */
const systemClock = Object.freeze({
  now: () => Date.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (handle) => clearTimeout(handle),
});

/** Who answers a request sent to `dest`: the user, without a device mark. */
function answerer(dest) {
  const mark = dest.indexOf(DEVICE_MARK);
  return mark < 0 ? dest : dest.slice(0, mark);
}

/**
 * Where an answer to `frame` goes: the device that sent it (`user#kind`),
 * not every device of its user (two of them may wait on the same
 * MessageID); the server is "_0".  When `#kind` does not fit the ID slot
 * (a user ID of 10 or 11 bytes in the default 11-byte slot), the user: the
 * server hands the answer to its device that waits for it.
 */
function asker(frame, config) {
  if (frame.userId === SERVER_ID) return SERVER_ID;
  const device = deviceAddress(frame.userId, frame.clientType);
  return utf8Encoder.encode(device).length > config.idSlot ? frame.userId : device;
}

/** `user` or `user#kind` (one device of the user). */
export function deviceAddress(userId, clientType) {
  return clientType === undefined || clientType === null ? userId : `${userId}${DEVICE_MARK}${clientType}`;
}

/**
 * A logged-on session with an esf server over WebSocket that survives
 * connection loss: it logs on, sends heartbeats, notices a dead server,
 * reconnects with backoff and logs on again.  Every call that waits for an
 * answer returns a Promise.
 *
 * Events (an EventTarget; each event's `detail` holds the fields):
 *   statechange {state, previous}    `state` changed (idle, connecting, loggedon, reconnecting, closed)
 *   logon {response}                 the first logon succeeded
 *   relogon {response}               a logon after a reconnect was answered
 *   interrupted {why}                the connection dropped; a reconnect follows
 *   reconnecting {attempt, delay}    the next attempt is due in `delay` ms
 *   disconnected {reason, reasonName, text}
 *                                    the server closed the connection (a reconnect follows)
 *   pushedout {cause}                the same user logged on elsewhere with this device kind
 *   kickedout {operator, reason}     kicked by the server ("_0") or an administrator
 *   closed {why}                     the client has stopped for good
 *   information {sender, clientType, informationType, payload, stored}
 *                                    a Send or SendCertainly from a user or the server;
 *                                    `stored`: kept by the server's offline store while
 *                                    this user was offline, delivered at logon
 *   broadcast {sender, groupId, informationType, payload}
 *   deviceonline {clientType}, deviceoffline {clientType}
 */
export class EsfClient extends EventTarget {
  /**
   * @param {string} url  e.g. "wss://host/esf"
   * @param {object} options
   *   userId, password = "", systemToken = "",
   *   clientType = WEBSOCKET_SSL for wss: URLs, else WEBSOCKET,
   *   maxUserIdLength = 11, maxMessageSize = 1 MiB (the largest frame this client sends or takes),
   *   requestTimeout = 30000 (ms),
   *   maxBufferedAmount = 8 MiB: past this many bytes of answers the client writes
   *     on its own (Acks, Errors, query answers) while the server reads nothing (more
   *     than 64 KiB unsent in the WebSocket), the connection is closed (4003, a
   *     "disconnected" event with CHANNEL_CACHE_OVERFLOW) and rebuilt; what the
   *     application sends is not counted,
   *   retry = {initialDelay: 1000, maxDelay: 30000, factor: 2, jitter: true},
   *   queue = {maxMessages: 0, maxBytes: 1 MiB}: application messages sent while
   *     reconnecting are queued (at most maxMessages, maxBytes of bodies) and written
   *     after the re-logon; 0 messages (the default) refuses them at once,
   *   handler = {handleInformation(sender, clientType, informationType, payload),
   *              handleQuery(sender, clientType, informationType, payload) -> bytes|string|Promise}
   *   WebSocket, clock, random: for tests (defaults: the global WebSocket, systemClock, Math.random)
   */
  constructor(url, options = {}) {
    super();
    const {
      userId, password = "", systemToken = "", clientType,
      maxUserIdLength = 11, maxMessageSize = 1024 * 1024, requestTimeout = 30000,
      maxBufferedAmount = 8 * 1024 * 1024, retry = {}, queue = {}, handler = null,
      WebSocket: WebSocketClass = globalThis.WebSocket, clock = systemClock, random = Math.random,
    } = options;
    this.url = url;
    this.wire = new WireConfig({ maxUserIdLength, maxMessageSize });
    if (!userId) throw new RangeError("a userId is needed");
    encodeId(userId, this.wire);
    this.userId = userId;
    this.password = password;
    this.systemToken = systemToken;
    this.clientType = clientType ?? (String(url).startsWith("wss:") ? ClientType.WEBSOCKET_SSL : ClientType.WEBSOCKET);
    this.requestTimeout = requestTimeout;
    if (!(maxBufferedAmount > 0)) throw new RangeError(`maxBufferedAmount must be above 0, not ${maxBufferedAmount}`);
    this.maxBufferedAmount = maxBufferedAmount;
    // Bytes of the answers written on its own while the server read nothing.
    this._answersWhileBusy = 0;
    this.retry = { initialDelay: 1000, maxDelay: 30000, factor: 2, jitter: true, ...retry };
    this.queue = { maxMessages: 0, maxBytes: 1024 * 1024, ...queue };
    if (!(Number.isInteger(this.queue.maxMessages) && this.queue.maxMessages >= 0)) {
      throw new RangeError(`queue.maxMessages must be a whole number >= 0, not ${this.queue.maxMessages}`);
    }
    this.handler = handler;
    this.WebSocket = WebSocketClass;
    this.clock = clock;
    this.random = random;
    /** The current LogonResponse, once logged on. */
    this.logonResponse = null;
    /** Answers dropped because they came from another party than the one asked. */
    this.refusedAnswers = 0;
    /** Pings from other users left unanswered while the server was not reading. */
    this.pingsUnanswered = 0;
    /**
     * The highest ID of a message from the server's offline store that this
     * client has handled: one delivered again (after a lost connection) is
     * acknowledged and not handled twice.  A page that must not handle one
     * twice across reloads saves it (localStorage) and sets it before logon().
     */
    this.offlineMark = 0;
    this._state = "idle";
    this._closedWhy = "";
    this._queue = []; // application messages sent while reconnecting
    this._queuedBytes = 0;
    this._ackId = 0; // the highest stored message handled on this connection, to acknowledge
    this._ackType = 0;
    this._ackTimer = null;
    this._stored = Promise.resolve(); // stored messages are handled one after the other
    this._ws = null;
    this._loggedOn = false;
    this._stopped = false;
    this._first = null; // {resolve, reject} of logon() until its answer
    this._ending = null; // why the current connection is ending, if the server said
    this._pending = new Map(); // MessageID -> {asked, types, resolve, reject, timer}
    this._nextId = 1;
    this._attempt = 0; // connections in a row that did not log on
    this._lastReceived = 0;
    this._beatTimer = null;
    this._retryTimer = null;
    this._limit = this.wire;
  }

  /** Whether a session is logged on now. */
  get loggedOn() {
    return this._loggedOn;
  }

  /**
   * Where the client is in its life: "idle" (before logon()), "connecting"
   * (the first logon), "loggedon", "reconnecting" (the connection was lost;
   * a reconnect and re-logon follow), "closed" (for good).  Each change is
   * a "statechange" event.
   */
  get state() {
    return this._state;
  }

  /** How many application messages wait for the re-logon (see the `queue` option). */
  get queued() {
    return this._queue.length;
  }

  _setState(state) {
    const previous = this._state;
    if (state === previous) return;
    this._state = state;
    this._emit("statechange", { state, previous });
  }

  /** Bytes queued in the browser's WebSocket, not yet sent. */
  get bufferedAmount() {
    return this._ws ? this._ws.bufferedAmount : 0;
  }

  // -- life ----------------------------------------------------------------------

  /**
   * Connect and log on.  Resolves with the LogonResponse; rejects with
   * LogonFailed (refused) or an Error (the first connection failed).
   * Later reconnects log on again by themselves ("relogon" events).
   */
  logon() {
    if (this._first || this._ws || this._stopped) throw new Error("logon() was already called");
    return new Promise((resolve, reject) => {
      this._first = { resolve, reject };
      this._setState("connecting");
      this._connect();
    });
  }

  /** Stop for good and close the connection (no Logoff is sent). */
  close() {
    this._stop("closed by the application");
  }

  /** Leave gracefully: the server ends the session (LoggedOff); no reconnect. */
  logoff() {
    if (this._loggedOn) this._write(MessageType.LOGOFF);
    this._stop("logged off");
  }

  _connect() {
    this._retryTimer = null;
    let ws;
    try {
      ws = new this.WebSocket(this.url, SUBPROTOCOL);
    } catch (error) {
      this._connectionLost(null, `cannot connect: ${error.message}`);
      return;
    }
    ws.binaryType = "arraybuffer";
    this._ws = ws;
    this._ending = null;
    let open = false;
    ws.onopen = () => {
      open = true;
      if (ws === this._ws) this._opened(ws);
    };
    ws.onmessage = (event) => ws === this._ws && this._message(ws, event.data);
    ws.onerror = () => {}; // a close event follows, with what is known
    ws.onclose = (event) => {
      if (ws !== this._ws) return;
      const code = event && event.code !== undefined ? event.code : null;
      // A browser tells a page nothing of a refused handshake (the 403 of
      // an origin the server does not allow is only in the console): say
      // where to look.
      const why = open ? closeText(event) : `${closeText(event)} ${BEFORE_HANDSHAKE}`;
      this._connectionLost(ws, why, { closeCode: code, beforeHandshake: !open });
    };
  }

  _opened(ws) {
    if (ws.protocol !== SUBPROTOCOL) {
      this._drop(ws, CLOSE_PROTOCOL_ERROR, `the server speaks ${JSON.stringify(ws.protocol)}, not ${SUBPROTOCOL}`);
      return;
    }
    this._lastReceived = this.clock.now();
    const body = encodeBody("Logon", {
      protocolVersion: PROTOCOL_VERSION, systemToken: this.systemToken, password: this.password,
    });
    const messageId = this._expect(
      SERVER_ID, [MessageType.LOGON], this.requestTimeout,
      (frame) => this._logonAnswered(ws, frame),
      (error) => {
        // No answer in time: this connection is no good; try another.
        if (ws === this._ws && !(error instanceof NotConnected)) {
          this._drop(ws, CLOSE_NO_ANSWER, `no logon reply: ${error.message}`);
        }
      },
    );
    ws.send(encodeFrame(this.wire, {
      messageType: MessageType.LOGON, body, clientType: this.clientType,
      messageId, userId: this.userId, destUserId: SERVER_ID,
    }));
  }

  _logonAnswered(ws, frame) {
    if (ws !== this._ws) return;
    const reply = decodeBody("LogonReply", frame.body);
    const response = Object.freeze({ ...reply, succeeded: reply.result === LogonResult.SUCCEED });
    const first = this._first;
    this._first = null;
    if (response.succeeded) {
      this.logonResponse = response;
      this._loggedOn = true;
      this._attempt = 0;
      this._ackId = 0; // stored messages come again from the first one not acknowledged
      this._limit = new WireConfig({
        maxUserIdLength: this.wire.maxUserIdLength,
        maxMessageSize: Math.min(this.wire.maxMessageSize, response.maxMessageSize),
      });
      this._scheduleBeat();
    } else if (!first && response.result === LogonResult.BUSY) {
      this._ending = { kind: "busy" }; // the server closes; try again later
    } else {
      const why = `logon refused: ${nameOf(LogonResult, response.result)}: ${response.failureCause}`;
      this._ending = { kind: "refused", why };
      this._stopped = true;
    }
    if (response.succeeded) this._setState("loggedon");
    if (first) {
      if (response.succeeded) {
        first.resolve(response);
        this._emit("logon", { response });
      } else {
        first.reject(new LogonFailed(response));
      }
    } else {
      this._emit("relogon", { response });
      // After the listeners, which may restore what the server forgot
      // (rooms joined...) before the queued messages go out.
      if (response.succeeded && ws === this._ws && this._loggedOn) this._flushQueue();
    }
  }

  _stop(why) {
    if (this._stopped) return;
    this._stopped = true;
    this._loggedOn = false;
    if (this._retryTimer !== null) this.clock.clearTimeout(this._retryTimer);
    this._retryTimer = null;
    const ws = this._ws;
    if (ws) this._drop(ws, CLOSE_NORMAL, why);
    else this._closed(why);
  }

  /** The client has stopped for good: what waits fails, and "closed". */
  _closed(why, details = {}) {
    this._closedWhy = why;
    const queue = this._queue;
    this._queue = [];
    this._queuedBytes = 0;
    this._setState("closed");
    for (const entry of queue) {
      if (entry.timer !== null) this.clock.clearTimeout(entry.timer);
      entry.fail(new NotConnected(`not sent: ${why}`, { state: "closed", ...details }));
    }
    this._emit("closed", { why });
  }

  /** Leave `ws` now, without waiting for its close handshake. */
  _drop(ws, code, why) {
    try {
      ws.close(code, truncateUtf8(why, 123));
    } catch {
      // closing a socket that is still connecting may throw in old browsers
    }
    this._connectionLost(ws, why);
  }

  _connectionLost(ws, why, details = {}) {
    if (ws !== this._ws) return;
    this._ws = null;
    if (!this._loggedOn) this._attempt += 1;
    this._loggedOn = false;
    if (this._beatTimer !== null) this.clock.clearTimeout(this._beatTimer);
    this._beatTimer = null;
    const ending = this._ending;
    this._ending = null;
    if (ending && ending.why) {
      why = ending.why;
    } else if (ending && ending.kind === "disconnected") {
      why = `the server closed the connection (${nameOf(DisconnectedType, ending.reason)}: ${ending.text})`;
    }
    if (this._ackTimer !== null) this.clock.clearTimeout(this._ackTimer);
    this._ackTimer = null;
    const first = this._first;
    this._first = null;
    // The state the client is going to: what was pending fails with it.
    const next = first || this._stopped ? "closed" : "reconnecting";
    const pending = this._pending;
    this._pending = new Map();
    for (const entry of pending.values()) {
      this.clock.clearTimeout(entry.timer);
      entry.reject(new NotConnected(why, { state: next, ...details }));
    }
    if (first) {
      // The first connection failed: no reconnect (the application decides).
      this._stopped = true;
      this._closedWhy = why;
      this._setState("closed");
      first.reject(new NotConnected(why, { state: "closed", ...details }));
      return;
    }
    if (ending && ending.kind === "disconnected") {
      this._emit("disconnected", {
        reason: ending.reason, reasonName: nameOf(DisconnectedType, ending.reason), text: ending.text,
      });
    }
    if (this._stopped) {
      this._closed(why, details);
      return;
    }
    this._setState("reconnecting");
    this._emit("interrupted", { why });
    const { initialDelay, maxDelay, factor, jitter } = this.retry;
    const base = Math.min(maxDelay, initialDelay * factor ** Math.max(0, this._attempt - 1));
    const delay = Math.round(jitter ? base * (0.5 + this.random() / 2) : base);
    this._emit("reconnecting", { attempt: this._attempt, delay });
    this._retryTimer = this.clock.setTimeout(() => this._connect(), delay);
  }

  // -- incoming ----------------------------------------------------------------------

  _message(ws, data) {
    this._lastReceived = this.clock.now();
    let frame;
    try {
      if (typeof data === "string") throw new FrameError("a text message");
      frame = decodeFrame(this.wire, data);
    } catch (error) {
      this._drop(ws, CLOSE_PROTOCOL_ERROR, `the server sent an invalid frame: ${error.message}`);
      return;
    }
    if (frame.messageId !== 0 && REPLY_TYPES.has(frame.messageType)) {
      this._answer(frame);
      return;
    }
    if (frame.destUserId === SERVER_ID && frame.messageId > 0 && STORED_TYPES.has(frame.messageType)) {
      // No live relayed frame is addressed to "_0": this one comes from the
      // server's offline store (protocol.md 8.7).
      const id = frame.messageId;
      this._stored = this._stored.then(() => this._onStored(ws, frame)).catch(() => this._ackStored(ws, id, 0));
      return;
    }
    try {
      this._incoming(ws, frame);
    } catch (error) {
      if (!(error instanceof BadRequest)) throw error;
      this._answerError(frame, ErrorCode.BAD_REQUEST, error.message);
    }
  }

  _answer(frame) {
    const entry = this._pending.get(frame.messageId);
    if (!entry) return; // nobody waits for it (any more)
    // Only the party asked may answer, with the expected type or an Error;
    // the server ("_0") may answer for a user too: with an Error (the user
    // is offline, a limit...), or with the Ack of a message it stored for a
    // user who is offline.  Another user relaying a Response or an Error
    // with a guessed MessageID changes nothing.
    const isError = frame.messageType === MessageType.ERROR;
    const expected = isError || entry.types.includes(frame.messageType);
    if (!expected || (frame.userId !== entry.asked && frame.userId !== SERVER_ID)) {
      this.refusedAnswers += 1;
      return;
    }
    this._pending.delete(frame.messageId);
    this.clock.clearTimeout(entry.timer);
    if (frame.messageType === MessageType.ERROR) {
      let error;
      try {
        const body = decodeBody("Error", frame.body);
        error = new RequestError(body.code, body.text);
      } catch (e) {
        error = new RequestError(ErrorCode.BAD_REQUEST, `a malformed Error: ${e.message}`);
      }
      entry.reject(error);
    } else {
      entry.resolve(frame);
    }
  }

  _incoming(ws, frame) {
    const sender = frame.userId;
    switch (frame.messageType) {
      case MessageType.HEARTBEAT:
        return; // its arrival counted as activity
      case MessageType.BEING_PUSHED_OUT_NOTIFY: {
        const { cause } = decodeBody("BeingPushedOutNotify", frame.body);
        this._endForGood(`pushed out: ${cause}`);
        this._emit("pushedout", { cause });
        return;
      }
      case MessageType.BEING_KICKED_OUT_NOTIFY: {
        const { operator, reason } = decodeBody("BeingKickedOutNotify", frame.body);
        this._endForGood(`kicked out by ${operator}: ${reason}`);
        this._emit("kickedout", { operator, reason });
        return;
      }
      case MessageType.DISCONNECT_NOTICE: {
        const { reason, text } = decodeBody("DisconnectNotice", frame.body);
        if (this._ending) return; // the pushed-out or kicked notice came first
        if (FOR_GOOD.has(reason)) this._endForGood("");
        this._ending = { kind: "disconnected", reason, text };
        return;
      }
      case MessageType.MY_DEVICE_ONLINE:
        return this._emit("deviceonline", { clientType: frame.clientType });
      case MessageType.MY_DEVICE_OFFLINE:
        return this._emit("deviceoffline", { clientType: frame.clientType });
      case MessageType.PING_BY_SERVER:
        // Another user pings this client through the server: no PingAck
        // while the server is not reading (it would only pile up unsent).
        if (!frame.messageId || !this._loggedOn) return;
        if (ws.bufferedAmount > BUSY_AMOUNT) {
          this.pingsUnanswered += 1;
          return;
        }
        this._write(MessageType.PING_ACK, new Uint8Array(0), { messageId: frame.messageId, dest: asker(frame, this.wire), answer: true });
        return;
      // The body is read here, not in the async handlers: a malformed one
      // throws BadRequest to _message, which answers it, and leaves no
      // rejected promise behind.
      case MessageType.SEND:
      case MessageType.SEND_CERTAINLY:
        this._information(frame, decodeBody("Information", frame.body));
        return;
      case MessageType.REQUEST:
        this._onRequest(frame, decodeBody("Information", frame.body));
        return;
      case MessageType.BROADCAST: {
        const { informationType, payload } = decodeBody("Information", frame.body);
        return this._emit("broadcast", { sender, groupId: frame.destUserId, informationType, payload });
      }
      case MessageType.BLOB:
        return this._answerError(frame, ErrorCode.BAD_REQUEST, "this client does not take blobs");
      default:
        return this._answerError(frame, ErrorCode.UNKNOWN_MESSAGE_TYPE, `unknown message type ${frame.messageType}`);
    }
  }

  _endForGood(why) {
    this._ending = { kind: "forgood", why };
    this._loggedOn = false;
    this._stopped = true;
    if (this._retryTimer !== null) this.clock.clearTimeout(this._retryTimer);
    this._retryTimer = null;
  }

  async _information(frame, { informationType, payload }) {
    const sender = frame.userId;
    this._emit("information", { sender, clientType: frame.clientType, informationType, payload, stored: false });
    try {
      if (this.handler && this.handler.handleInformation) {
        await this.handler.handleInformation(sender, frame.clientType, informationType, payload);
      }
      if (frame.messageType === MessageType.SEND_CERTAINLY && frame.messageId) {
        this._write(MessageType.ACK, encodeBody("Ack", { informationType }), { messageId: frame.messageId, dest: asker(frame, this.wire), answer: true });
      }
    } catch (error) {
      this._handlerFailed(frame, error);
    }
  }

  async _onRequest(frame, { informationType, payload }) {
    if (!this.handler || !this.handler.handleQuery) {
      this._answerError(frame, ErrorCode.HANDLER_ERROR, "this client answers no queries");
      return;
    }
    try {
      const answer = await this.handler.handleQuery(frame.userId, frame.clientType, informationType, payload);
      const body = encodeBody("Information", { informationType, payload: toBytes(answer) });
      this._write(MessageType.RESPONSE, body, { messageId: frame.messageId, dest: asker(frame, this.wire), answer: true });
    } catch (error) {
      this._handlerFailed(frame, error);
    }
  }

  // -- from the offline store ------------------------------------------------------------

  /**
   * A message kept for this user while it was offline: handled once (its
   * ID is above every one handled before), then acknowledged to the server
   * (cumulatively: an Ack of ID n covers every stored message up to n).
   * Its sender was answered when it was stored: no Ack goes to it.
   */
  async _onStored(ws, frame) {
    const id = frame.messageId;
    if (ws !== this._ws) return; // that connection is gone: it comes again
    if (id <= this.offlineMark) {
      this._ackStored(ws, id, 0); // delivered again: acknowledged, not handled twice
      return;
    }
    this.offlineMark = id;
    if (frame.messageType === MessageType.BLOB) {
      this._ackStored(ws, id, 0); // this client takes no blobs: dropped, not kept forever
      return;
    }
    let informationType = 0;
    try {
      const body = decodeBody("Information", frame.body);
      informationType = body.informationType;
      this._emit("information", {
        sender: frame.userId, clientType: frame.clientType, informationType, payload: body.payload, stored: true,
      });
      if (this.handler && this.handler.handleInformation) {
        await this.handler.handleInformation(frame.userId, frame.clientType, informationType, body.payload);
      }
    } catch {
      // A malformed body or a failing handler: acknowledged all the same,
      // or the server would deliver it again at every logon.
    }
    this._ackStored(ws, id, informationType);
  }

  _ackStored(ws, id, informationType) {
    if (ws !== this._ws || !this._loggedOn) return; // delivered again after the next logon
    if (id > this._ackId) {
      this._ackId = id;
      this._ackType = informationType;
    }
    // One Ack for every stored message handled in this turn.
    if (this._ackTimer === null) this._ackTimer = this.clock.setTimeout(() => this._sendStoredAck(ws), 0);
  }

  _sendStoredAck(ws) {
    this._ackTimer = null;
    if (ws !== this._ws || !this._loggedOn || !this._ackId) return;
    this._write(MessageType.ACK, encodeBody("Ack", { informationType: this._ackType }), {
      messageId: this._ackId, dest: SERVER_ID,
    });
  }

  _handlerFailed(frame, error) {
    if (error instanceof NotConnected) return;
    this._answerError(frame, ErrorCode.HANDLER_ERROR, `${error.name}: ${error.message}`.slice(0, 200));
  }

  _answerError(frame, code, text) {
    if (!frame.messageId || !this._loggedOn) return;
    const body = encodeBody("Error", { requestMessageType: frame.messageType, code, text });
    this._write(MessageType.ERROR, body, { messageId: frame.messageId, dest: asker(frame, this.wire), answer: true });
  }

  // -- heartbeats ------------------------------------------------------------------------

  _scheduleBeat() {
    const interval = Math.max(1, this.logonResponse.heartbeatInterval) * 1000;
    this._beatTimer = this.clock.setTimeout(() => this._beat(), interval);
  }

  _beat() {
    this._beatTimer = null;
    const ws = this._ws;
    if (!ws || !this._loggedOn) return;
    const silence = this.clock.now() - this._lastReceived;
    if (silence >= this.logonResponse.heartbeatTimeout * 1000) {
      // The server echoes every heartbeat: silence this long means it is gone.
      this._drop(ws, CLOSE_NO_ANSWER, `nothing from the server for ${Math.round(silence / 1000)} s`);
      return;
    }
    this._write(MessageType.HEARTBEAT);
    this._scheduleBeat();
  }

  // -- output ------------------------------------------------------------------------------

  _write(messageType, body = new Uint8Array(0), { messageId = 0, dest = SERVER_ID, answer = false } = {}) {
    const ws = this._ws;
    if (!ws || !this._loggedOn) throw this._notConnected();
    const frame = encodeFrame(this._limit, {
      messageType, body, clientType: this.clientType, messageId, userId: this.userId, destUserId: dest,
    });
    ws.send(frame);
    if (!answer) return; // what the application sends paces itself (bufferedAmount)
    // An answer this client writes on its own: counted while the server
    // reads nothing (more than BUSY_AMOUNT unsent), from the first such one.
    if (ws.bufferedAmount <= BUSY_AMOUNT + frame.length) {
      this._answersWhileBusy = 0;
      return;
    }
    this._answersWhileBusy += frame.length;
    if (this._answersWhileBusy > this.maxBufferedAmount) {
      // The server reads nothing: past the bound, the connection is given
      // up as broken (what waits on it fails, saying so) and rebuilt.
      const text = `the server read nothing while this client answered it with ` +
        `${this._answersWhileBusy} bytes (maxBufferedAmount is ${this.maxBufferedAmount})`;
      if (!this._ending) {
        this._ending = {
          kind: "disconnected", reason: DisconnectedType.CHANNEL_CACHE_OVERFLOW, text,
          why: `this client closed the connection: ${text}`,
        };
      }
      this._drop(ws, CLOSE_BACKED_UP, text);
    }
  }

  /**
   * Wait for the answer to a request to `asked`: `resolve(frame)` with the
   * answer, or `reject(error)` (an Error answer, a timeout, the connection
   * lost).  Returns the request's MessageID.
   */
  _expect(asked, types, timeout, resolve, reject) {
    let messageId = this._nextId;
    while (this._pending.has(messageId)) messageId = (messageId % MAX_MESSAGE_ID) + 1;
    this._nextId = (messageId % MAX_MESSAGE_ID) + 1;
    const entry = { asked, types, resolve, reject, timer: null };
    entry.timer = this.clock.setTimeout(() => {
      if (this._pending.get(messageId) === entry) {
        this._pending.delete(messageId);
        entry.reject(new RequestError(ErrorCode.TIMEOUT, "no answer in time"));
      }
    }, timeout ?? this.requestTimeout);
    this._pending.set(messageId, entry);
    return messageId;
  }

  /** Why a call cannot be made now, as a NotConnected. */
  _notConnected() {
    const state = this._state;
    if (state === "reconnecting") {
      return new NotConnected("not sent: reconnecting (the connection was lost; the client is logging on again)", { state });
    }
    if (state === "closed") return new NotConnected(`not logged on: ${this._closedWhy}`, { state });
    return new NotConnected("not logged on", { state });
  }

  /**
   * Keep an application message sent while reconnecting until the
   * re-logon: `write(elapsed)` sends it then.  Throws NotConnected when
   * the queue is off or full.  A message that waits longer than `timeout`
   * ms (if not null) fails with RequestError(TIMEOUT).
   */
  _enqueue(size, timeout, write, fail) {
    const { maxMessages, maxBytes } = this.queue;
    if (this._state !== "reconnecting" || maxMessages === 0) throw this._notConnected();
    if (this._queue.length >= maxMessages || this._queuedBytes + size > maxBytes) {
      throw new NotConnected(
        `not sent: reconnecting, and ${this._queue.length} messages (${this._queuedBytes} bytes) already wait ` +
        `(queue: at most ${maxMessages} messages, ${maxBytes} bytes)`, { state: this._state });
    }
    const entry = { size, since: this.clock.now(), write, fail, timer: null };
    if (timeout !== null) {
      entry.timer = this.clock.setTimeout(() => {
        const at = this._queue.indexOf(entry);
        if (at < 0) return;
        this._queue.splice(at, 1);
        this._queuedBytes -= size;
        fail(new RequestError(ErrorCode.TIMEOUT, "not sent: still reconnecting"));
      }, timeout);
    }
    this._queue.push(entry);
    this._queuedBytes += size;
  }

  /** Write what was queued while reconnecting, in order. */
  _flushQueue() {
    const queue = this._queue;
    this._queue = [];
    this._queuedBytes = 0;
    for (const entry of queue) {
      if (entry.timer !== null) this.clock.clearTimeout(entry.timer);
      try {
        entry.write(this.clock.now() - entry.since);
      } catch (error) {
        entry.fail(error);
      }
    }
  }

  /**
   * Send a request; resolve with the answer's frame, reject with
   * RequestError or NotConnected.  With `queued`, a request made while
   * reconnecting waits in the queue (when it is on) for the re-logon.
   */
  _call(messageType, body, { dest = SERVER_ID, asked = SERVER_ID, answer = messageType, timeout, queued = false } = {}) {
    if (!this._ws || !this._loggedOn) {
      if (!queued) return Promise.reject(this._notConnected());
      return new Promise((resolve, reject) => {
        const limit = timeout ?? this.requestTimeout;
        this._enqueue(body.length, limit, (elapsed) => {
          const rest = Math.max(1, limit - elapsed);
          this._call(messageType, body, { dest, asked, answer, timeout: rest }).then(resolve, reject);
        }, reject);
      });
    }
    return new Promise((resolve, reject) => {
      const messageId = this._expect(asked, [answer], timeout, resolve, reject);
      try {
        this._write(messageType, body, { messageId, dest });
      } catch (error) {
        this.clock.clearTimeout(this._pending.get(messageId).timer);
        this._pending.delete(messageId);
        reject(error instanceof RangeError ? new RequestError(ErrorCode.TOO_LARGE, error.message) : error);
      }
    });
  }

  // -- framework calls -----------------------------------------------------------------------

  /** Round trip to the server, in ms. */
  async ping({ timeout } = {}) {
    const start = this.clock.now();
    await this._call(MessageType.PING_BY_SERVER, undefined, { answer: MessageType.PING_ACK, timeout });
    return this.clock.now() - start;
  }

  /** Round trip to another user's client, through the server, in ms. */
  async pingUser(userId, { timeout } = {}) {
    const start = this.clock.now();
    await this._call(MessageType.PING_BY_SERVER, undefined, {
      dest: userId, asked: answerer(userId), answer: MessageType.PING_ACK, timeout,
    });
    return this.clock.now() - start;
  }

  /** This client's address as the server sees it, "host:port". */
  async getMyIPE() {
    const frame = await this._call(MessageType.GET_MY_IPE);
    return decodeBody("GetMyIPEReply", frame.body).address;
  }

  /**
   * Every online user's ID, at most `limit` of them (100000 by default), as
   * many requests as it takes.  The server's total is a claim, not a bound:
   * an ID sent again is kept once, and a page that brings no new ID ends
   * the list.
   */
  async getAllOnlineUsers({ limit = 100000 } = {}) {
    if (!(Number.isInteger(limit) && limit >= 1 && limit <= 0xffffffff)) {
      throw new RangeError(`limit must be a whole number in 1..4294967295, not ${limit}`);
    }
    const users = new Set();
    let offset = 0;
    while (users.size < limit) {
      const body = encodeBody("GetAllOnlineUsers", { offset, limit: limit - users.size });
      const frame = await this._call(MessageType.GET_ALL_ONLINE_USERS, body);
      const page = decodeBody("GetAllOnlineUsersReply", frame.body);
      offset += page.userIds.length;
      const before = users.size;
      for (const id of page.userIds) {
        if (users.size >= limit) break;
        users.add(id);
      }
      if (users.size === before || offset >= Math.min(page.total, 0xffffffff)) break;
    }
    return [...users];
  }

  /** Whether `userId` is online. */
  async isUserOnline(userId) {
    const frame = await this._call(MessageType.QUERY_ONLINE, undefined, { dest: userId });
    return decodeBody("QueryOnlineReply", frame.body).online;
  }

  /** A Map from each of `userIds` to whether it is online. */
  async queryOnlines(userIds) {
    const ids = [...userIds];
    const frame = await this._call(MessageType.QUERY_ONLINES, encodeBody("QueryOnlines", { userIds: ids }));
    const { online } = decodeBody("QueryOnlinesReply", frame.body);
    return new Map(ids.map((id, i) => [id, Boolean(online[i])]));
  }

  /** The ClientTypes of this user's devices online now, this one included. */
  async getMyDevices() {
    const frame = await this._call(MessageType.GET_MY_DEVICES);
    return decodeBody("GetMyDevicesReply", frame.body).clientTypes;
  }

  /** Ask the server to kick `userId`; rejects with RequestError(NOT_AUTHORIZED) when refused. */
  async kickOut(userId, reason = "") {
    const frame = await this._call(MessageType.KICK_OUT, encodeBody("KickOut", { reason }), { dest: userId });
    const reply = decodeBody("KickOutReply", frame.body);
    if (!reply.ok) throw new RequestError(ErrorCode.NOT_AUTHORIZED, reply.cause);
  }

  // -- application messages -------------------------------------------------------------------

  /**
   * One-way message to a user (every device, or `clientType`) or to the
   * server ("_0").  `payload` is bytes or a string (sent as UTF-8).
   * Throws NotConnected when not logged on.
   */
  send(userId, informationType, payload = "", { clientType } = {}) {
    const body = encodeBody("Information", { informationType, payload: toBytes(payload) });
    const dest = deviceAddress(userId, clientType);
    if (!this._ws || !this._loggedOn) {
      encodeFrame(this._limit, { messageType: MessageType.SEND, body, userId: this.userId, destUserId: dest });
      this._enqueue(body.length, null, () => this._write(MessageType.SEND, body, { dest }), () => {});
      return "queued";
    }
    this._write(MessageType.SEND, body, { dest });
    return "sent";
  }

  /** Ask a user's client (or the server, "_0"); resolves with the answer's payload (bytes). */
  async query(userId, informationType, payload = "", { timeout, clientType } = {}) {
    const body = encodeBody("Information", { informationType, payload: toBytes(payload) });
    const frame = await this._call(MessageType.REQUEST, body, {
      dest: deviceAddress(userId, clientType), asked: answerer(userId), answer: MessageType.RESPONSE, timeout, queued: true,
    });
    return decodeBody("Information", frame.body).payload;
  }

  /**
   * A message the receiver acknowledges once its handler has run; resolves
   * then with "delivered".  When the receiver is offline and the server
   * keeps the message for it (its offline store), resolves with "stored"
   * once the server has stored it: it is delivered at the receiver's next
   * logon, and nobody tells the sender when.
   */
  async sendCertainly(userId, informationType, payload = "", { timeout, clientType } = {}) {
    const body = encodeBody("Information", { informationType, payload: toBytes(payload) });
    const asked = answerer(userId);
    const frame = await this._call(MessageType.SEND_CERTAINLY, body, {
      dest: deviceAddress(userId, clientType), asked, answer: MessageType.ACK, timeout, queued: true,
    });
    return frame.userId === SERVER_ID && asked !== SERVER_ID ? "stored" : "delivered";
  }

  /** Broadcast to a group's online members (or "*"); resolves once the server has fanned it out. */
  async broadcast(groupId, informationType, payload = "", { timeout } = {}) {
    const body = encodeBody("Information", { informationType, payload: toBytes(payload) });
    await this._call(MessageType.BROADCAST, body, { dest: groupId, answer: MessageType.ACK, timeout, queued: true });
  }

  _emit(type, detail) {
    // CustomEvent is global in browsers and node >= 19; node 18 has Event only.
    const event = typeof CustomEvent === "function"
      ? new CustomEvent(type, { detail })
      : Object.assign(new Event(type), { detail });
    this.dispatchEvent(event);
  }
}

/** What a close before the WebSocket handshake completed may mean, and where to look. */
const BEFORE_HANDSHAKE =
  "before the WebSocket handshake completed: the server could not be reached, or refused the " +
  "handshake (a page whose origin the server does not allow gets HTTP 403, which only the browser's " +
  "console and the server's log, event websocket_refused, show; see the server's --websocket-origin)";

function closeText(event) {
  const code = event && event.code !== undefined ? event.code : "?";
  const reason = event && event.reason ? `: ${event.reason}` : "";
  return `the connection closed (${code}${reason})`;
}
