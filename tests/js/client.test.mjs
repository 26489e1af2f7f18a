// EsfClient's behaviour on a fake WebSocket and a fake clock: logon,
// heartbeats and dead-server detection, reconnect with backoff and
// re-logon, answers taken only from the party asked, events.
// The real thing (a browser against twistd esf) is tests/test_websocket_browser.py.
import { test } from "node:test";
import assert from "node:assert/strict";

import * as esf from "../../esf/web/esf.js";

const { MessageType: MT, DisconnectedType: DT, ErrorCode, LogonResult } = esf;
const wire = new esf.WireConfig();

class FakeClock {
  constructor() {
    this.time = 1_000_000;
    this.timers = new Map();
    this.next = 1;
  }
  now() {
    return this.time;
  }
  setTimeout(fn, ms) {
    const id = this.next++;
    this.timers.set(id, { at: this.time + ms, fn });
    return id;
  }
  clearTimeout(id) {
    this.timers.delete(id);
  }
  /** Move time on by `ms`, running each timer when it is due. */
  advance(ms) {
    const end = this.time + ms;
    for (;;) {
      const due = [...this.timers.entries()].filter(([, t]) => t.at <= end).sort((a, b) => a[1].at - b[1].at);
      if (!due.length) break;
      const [id, timer] = due[0];
      this.timers.delete(id);
      this.time = timer.at;
      timer.fn();
    }
    this.time = end;
  }
}

/** A WebSocket the test plays the server of. */
class FakeWebSocket {
  static made = [];
  constructor(url, protocol) {
    this.url = url;
    this.requested = protocol;
    this.protocol = "";
    this.binaryType = "blob";
    this.bufferedAmount = 0;
    /** A server that reads nothing: what is sent stays in bufferedAmount. */
    this.stalled = false;
    this.sent = [];
    this.closedWith = null;
    FakeWebSocket.made.push(this);
  }
  send(data) {
    if (this.stalled) this.bufferedAmount += data.length;
    this.sent.push(esf.decodeFrame(wire, data.slice()));
  }
  close(code, reason) {
    if (code !== 1000 && !(code >= 3000 && code <= 4999)) throw new Error(`a browser refuses close code ${code}`);
    this.closedWith = { code, reason };
  }
  // the server's side
  open(protocol = "esf.v1") {
    this.protocol = protocol;
    this.onopen({});
  }
  deliver(fields, bodyName, body) {
    const bytes = esf.encodeFrame(wire, {
      userId: "_0", destUserId: "alice", ...fields, body: bodyName ? esf.encodeBody(bodyName, body) : new Uint8Array(0),
    });
    this.onmessage({ data: bytes.buffer });
  }
  serverClose(code = 1000, reason = "") {
    this.onclose({ code, reason });
  }
  /** The frames sent since the last call. */
  take() {
    const out = this.sent;
    this.sent = [];
    return out;
  }
  /** Answer the Logon this socket sent. */
  acceptLogon(result = LogonResult.SUCCEED, cause = "") {
    const [logon] = this.take().filter((f) => f.messageType === MT.LOGON);
    assert.ok(logon, "a Logon was sent");
    this.deliver({ messageType: MT.LOGON, messageId: logon.messageId }, "LogonReply", {
      result, failureCause: cause, heartbeatInterval: 10, heartbeatTimeout: 30, maxMessageSize: 1 << 20,
    });
    return logon;
  }
}

function setup(options = {}) {
  FakeWebSocket.made = [];
  const clock = new FakeClock();
  const events = [];
  const client = new esf.EsfClient("ws://server/esf", {
    userId: "alice", password: "pw", WebSocket: FakeWebSocket, clock, random: () => 1,
    requestTimeout: 5000, ...options,
  });
  for (const type of ["logon", "relogon", "interrupted", "reconnecting", "disconnected", "pushedout",
                      "kickedout", "closed", "information", "broadcast", "deviceonline", "deviceoffline"]) {
    client.addEventListener(type, (e) => events.push([type, e.detail]));
  }
  const states = [];
  client.addEventListener("statechange", (e) => states.push(e.detail.state));
  const socket = () => FakeWebSocket.made.at(-1);
  return { client, clock, events, socket, states };
}

async function loggedOn(options) {
  const s = setup(options);
  const logon = s.client.logon();
  s.socket().open();
  s.socket().acceptLogon();
  await logon;
  return s;
}

const flush = () => new Promise((resolve) => setImmediate(resolve));
const kinds = (events) => events.map(([type]) => type);

test("logon: subprotocol, binary messages, the Logon frame, the response", async () => {
  const { client, socket, events } = setup({ systemToken: "tok" });
  const logon = client.logon();
  const ws = socket();
  assert.equal(ws.url, "ws://server/esf");
  assert.equal(ws.requested, "esf.v1");
  assert.equal(ws.binaryType, "arraybuffer");
  ws.open();
  const [frame] = ws.sent;
  assert.equal(frame.messageType, MT.LOGON);
  assert.equal(frame.clientType, esf.ClientType.WEBSOCKET);
  assert.equal(frame.userId, "alice");
  assert.equal(frame.destUserId, "_0");
  assert.deepEqual(esf.decodeBody("Logon", frame.body), { protocolVersion: 1, systemToken: "tok", password: "pw" });
  ws.acceptLogon();
  const response = await logon;
  assert.equal(response.succeeded, true);
  assert.equal(response.heartbeatInterval, 10);
  assert.ok(client.loggedOn);
  assert.deepEqual(kinds(events), ["logon"]);
});

test("a wss: URL declares WebSocketSSL", () => {
  FakeWebSocket.made = [];
  const client = new esf.EsfClient("wss://server/esf", { userId: "alice", WebSocket: FakeWebSocket });
  assert.equal(client.clientType, esf.ClientType.WEBSOCKET_SSL);
});

test("a refused first logon rejects with LogonFailed and stops", async () => {
  const { client, socket, clock } = setup();
  const logon = client.logon();
  socket().open();
  socket().acceptLogon(LogonResult.FAILED, "bad password");
  await assert.rejects(logon, (e) => e instanceof esf.LogonFailed && e.cause === "bad password");
  socket().serverClose();
  clock.advance(120_000);
  assert.equal(FakeWebSocket.made.length, 1);
});

test("a first connection that fails rejects and does not retry", async () => {
  const { client, socket, clock } = setup();
  const logon = client.logon();
  socket().serverClose(1006);
  await assert.rejects(logon, esf.NotConnected);
  clock.advance(120_000);
  assert.equal(FakeWebSocket.made.length, 1);
});

test("a server that speaks another subprotocol is left", async () => {
  const { client, socket } = setup();
  const logon = client.logon();
  socket().open("");
  await assert.rejects(logon, /esf.v1/);
  assert.equal(socket().closedWith.code, esf.CLOSE_PROTOCOL_ERROR);
});

test("heartbeats every interval; a silent server is dropped and the client reconnects", async () => {
  const { client, socket, clock, events } = await loggedOn();
  const first = socket();
  clock.advance(10_000);
  assert.deepEqual(first.take().map((f) => f.messageType), [MT.HEARTBEAT]);
  first.deliver({ messageType: MT.HEARTBEAT }); // the echo, at 10 s
  clock.advance(20_000);
  assert.deepEqual(first.take().map((f) => f.messageType), [MT.HEARTBEAT, MT.HEARTBEAT]);
  // Nothing more from the server: at 30 s of silence it is taken as gone.
  clock.advance(9_999);
  assert.equal(first.closedWith, null);
  clock.advance(1);
  assert.equal(first.closedWith.code, esf.CLOSE_NO_ANSWER);
  assert.equal(first.take().length, 0);
  assert.ok(!client.loggedOn);
  assert.deepEqual(kinds(events).slice(1), ["interrupted", "reconnecting"]);
  // The reconnect, then the re-logon.
  clock.advance(1000);
  assert.equal(FakeWebSocket.made.length, 2);
  socket().open();
  socket().acceptLogon();
  assert.ok(client.loggedOn);
  assert.equal(events.at(-1)[0], "relogon");
  assert.equal(events.at(-1)[1].response.succeeded, true);
});

test("reconnects back off, with a ceiling, and reset after a logon", async () => {
  const { socket, clock, events } = await loggedOn({ retry: { initialDelay: 1000, maxDelay: 5000, factor: 2, jitter: false } });
  socket().serverClose(1006);
  const delays = [];
  for (let i = 0; i < 5; i++) {
    delays.push(events.at(-1)[1].delay);
    clock.advance(events.at(-1)[1].delay);
    socket().serverClose(1006); // connects, then fails before logon
  }
  assert.deepEqual(delays, [1000, 1000, 2000, 4000, 5000]);
  clock.advance(events.at(-1)[1].delay);
  socket().open();
  socket().acceptLogon();
  socket().serverClose(1006);
  assert.equal(events.at(-1)[1].delay, 1000);
});

test("jitter spreads the delay between half and all of it", async () => {
  const { socket, events } = await loggedOn({ random: () => 0 });
  socket().serverClose(1006);
  assert.equal(events.at(-1)[1].delay, 500);
});

test("a Busy re-logon keeps retrying; another refusal stops", async () => {
  const { client, socket, clock, events } = await loggedOn();
  socket().serverClose(1006);
  clock.advance(1000);
  socket().open();
  socket().acceptLogon(LogonResult.BUSY, "try later");
  socket().serverClose();
  assert.equal(events.at(-1)[0], "reconnecting");
  clock.advance(events.at(-1)[1].delay);
  socket().open();
  socket().acceptLogon(LogonResult.FAILED, "gone");
  socket().serverClose();
  assert.equal(events.at(-1)[0], "closed");
  clock.advance(600_000);
  assert.ok(!client.loggedOn);
  assert.equal(FakeWebSocket.made.length, 3);
});

test("query: the answer of the user asked", async () => {
  const { client, socket } = await loggedOn();
  const answer = client.query("bob", 9, "time?");
  const [request] = socket().take();
  assert.equal(request.messageType, MT.REQUEST);
  assert.equal(request.destUserId, "bob");
  assert.deepEqual(esf.decodeBody("Information", request.body), { informationType: 9, payload: esf.toBytes("time?") });
  socket().deliver({ messageType: MT.RESPONSE, messageId: request.messageId, userId: "bob" }, "Information",
                   { informationType: 9, payload: esf.toBytes("12:00") });
  assert.equal(esf.toText(await answer), "12:00");
});

test("answers from anyone but the party asked are refused", async () => {
  const { client, socket } = await loggedOn();
  const answer = client.query("bob", 9, "secret?");
  const [request] = socket().take();
  const id = request.messageId;
  // mallory relays a Response and an Error with bob's MessageID
  socket().deliver({ messageType: MT.RESPONSE, messageId: id, userId: "mallory" }, "Information",
                   { informationType: 9, payload: esf.toBytes("forged") });
  socket().deliver({ messageType: MT.ERROR, messageId: id, userId: "mallory" }, "Error",
                   { requestMessageType: MT.REQUEST, code: ErrorCode.NOT_AUTHORIZED, text: "forged" });
  // bob answers with the wrong type
  socket().deliver({ messageType: MT.ACK, messageId: id, userId: "bob" }, "Ack", { informationType: 9 });
  assert.equal(client.refusedAnswers, 3);
  socket().deliver({ messageType: MT.RESPONSE, messageId: id, userId: "bob" }, "Information",
                   { informationType: 9, payload: esf.toBytes("real") });
  assert.equal(esf.toText(await answer), "real");
});

test("a server's answer cannot come from a user", async () => {
  const { client, socket } = await loggedOn();
  const online = client.isUserOnline("bob");
  const [request] = socket().take();
  socket().deliver({ messageType: MT.QUERY_ONLINE, messageId: request.messageId, userId: "bob" }, "QueryOnlineReply", { online: false });
  assert.equal(client.refusedAnswers, 1);
  socket().deliver({ messageType: MT.QUERY_ONLINE, messageId: request.messageId }, "QueryOnlineReply", { online: true });
  assert.equal(await online, true);
});

test("an Error from the server rejects with its code", async () => {
  const { client, socket } = await loggedOn();
  const sent = client.sendCertainly("bob", 1, "hi");
  const [request] = socket().take();
  socket().deliver({ messageType: MT.ERROR, messageId: request.messageId }, "Error",
                   { requestMessageType: MT.SEND_CERTAINLY, code: ErrorCode.USER_OFFLINE, text: "bob is offline" });
  await assert.rejects(sent, (e) => e instanceof esf.RequestError && e.code === ErrorCode.USER_OFFLINE);
});

test("requests time out", async () => {
  const { client, clock } = await loggedOn();
  const answer = client.query("bob", 1, "", { timeout: 2000 });
  clock.advance(1999);
  let settled = false;
  answer.catch(() => {}).finally(() => { settled = true; });
  await flush();
  assert.equal(settled, false);
  clock.advance(1);
  await assert.rejects(answer, (e) => e.code === ErrorCode.TIMEOUT);
});

test("acked send resolves on the receiver's Ack; a device is addressed with #", async () => {
  const { client, socket } = await loggedOn();
  const sent = client.sendCertainly("bob", 4, "hi", { clientType: 5 });
  const [request] = socket().take();
  assert.equal(request.messageType, MT.SEND_CERTAINLY);
  assert.equal(request.destUserId, "bob#5");
  socket().deliver({ messageType: MT.ACK, messageId: request.messageId, userId: "bob" }, "Ack", { informationType: 4 });
  assert.equal(await sent, "delivered");
});

test("broadcast resolves on the server's Ack, not a member's", async () => {
  const { client, socket } = await loggedOn();
  const done = client.broadcast("room", 3, "hello room");
  const [request] = socket().take();
  assert.equal(request.messageType, MT.BROADCAST);
  assert.equal(request.destUserId, "room");
  socket().deliver({ messageType: MT.ACK, messageId: request.messageId, userId: "bob" }, "Ack", { informationType: 3 });
  assert.equal(client.refusedAnswers, 1);
  socket().deliver({ messageType: MT.ACK, messageId: request.messageId }, "Ack", { informationType: 3 });
  await done;
});

test("online queries", async () => {
  const { client, socket } = await loggedOn();
  const all = client.getAllOnlineUsers();
  let [request] = socket().take();
  assert.deepEqual(esf.decodeBody("GetAllOnlineUsers", request.body), { offset: 0, limit: 100000 });
  socket().deliver({ messageType: MT.GET_ALL_ONLINE_USERS, messageId: request.messageId }, "GetAllOnlineUsersReply",
                   { total: 3, userIds: ["alice", "bob"] });
  await flush();
  [request] = socket().take();
  assert.deepEqual(esf.decodeBody("GetAllOnlineUsers", request.body), { offset: 2, limit: 99998 });
  socket().deliver({ messageType: MT.GET_ALL_ONLINE_USERS, messageId: request.messageId }, "GetAllOnlineUsersReply",
                   { total: 3, userIds: ["carol"] });
  assert.deepEqual(await all, ["alice", "bob", "carol"]);

  const some = client.queryOnlines(["bob", "dave"]);
  [request] = socket().take();
  socket().deliver({ messageType: MT.QUERY_ONLINES, messageId: request.messageId }, "QueryOnlinesReply", { online: [true, false] });
  assert.deepEqual([...(await some)], [["bob", true], ["dave", false]]);

  const devices = client.getMyDevices();
  [request] = socket().take();
  socket().deliver({ messageType: MT.GET_MY_DEVICES, messageId: request.messageId }, "GetMyDevicesReply", { clientTypes: [3, 0] });
  assert.deepEqual(await devices, [3, 0]);
});

/**
 * Play a server that answers every GetAllOnlineUsers with `page(offset)`,
 * a {total, userIds}, for at most 50 turns: what the call gave (if it
 * settled) and the requests it made.
 */
async function lyingLister(s, call, page) {
  const out = { settled: false, value: undefined, requests: [] };
  call.then((v) => Object.assign(out, { settled: true, value: v }), (e) => Object.assign(out, { settled: true, value: e }));
  for (let turn = 0; turn < 50 && !out.settled; turn++) {
    await flush();
    for (const request of s.socket().take()) {
      if (request.messageType !== MT.GET_ALL_ONLINE_USERS) continue;
      const asked = esf.decodeBody("GetAllOnlineUsers", request.body);
      out.requests.push(asked);
      s.socket().deliver({ messageType: MT.GET_ALL_ONLINE_USERS, messageId: request.messageId },
                         "GetAllOnlineUsersReply", page(asked.offset));
    }
  }
  await flush();
  return out;
}

test("getAllOnlineUsers trusts no total: a page with nothing new ends it, and at most `limit` IDs", async () => {
  const s = await loggedOn();
  const same = await lyingLister(s, s.client.getAllOnlineUsers(), () => ({ total: 0xffffffff, userIds: ["bob", "alice", "bob"] }));
  assert.ok(same.settled, `still asking after ${same.requests.length} pages`);
  assert.deepEqual(same.value, ["bob", "alice"]);
  assert.deepEqual(same.requests.map((r) => r.offset), [0, 3]);

  const fresh = await lyingLister(s, s.client.getAllOnlineUsers({ limit: 25 }), (offset) => ({
    total: 0xffffffff, userIds: Array.from({ length: 10 }, (_, i) => `u${offset + i}`),
  }));
  assert.ok(fresh.settled, `still asking after ${fresh.requests.length} pages`);
  assert.deepEqual(fresh.value, Array.from({ length: 25 }, (_, i) => `u${i}`));
  assert.deepEqual(fresh.requests, [{ offset: 0, limit: 25 }, { offset: 10, limit: 15 }, { offset: 20, limit: 5 }]);
  await assert.rejects(s.client.getAllOnlineUsers({ limit: 0 }), RangeError);
});

test("kickOut: refused with the server's cause", async () => {
  const { client, socket } = await loggedOn();
  const kick = client.kickOut("bob", "spam");
  const [request] = socket().take();
  assert.equal(request.destUserId, "bob");
  socket().deliver({ messageType: MT.KICK_OUT, messageId: request.messageId }, "KickOutReply", { ok: false, cause: "not an admin" });
  await assert.rejects(kick, (e) => e.code === ErrorCode.NOT_AUTHORIZED && e.text === "not an admin");
});

test("pushed out: the event with its cause, then closed, and no reconnect", async () => {
  const { client, socket, clock, events } = await loggedOn();
  socket().deliver({ messageType: MT.BEING_PUSHED_OUT_NOTIFY }, "BeingPushedOutNotify", { cause: "a new logon from 10.0.0.2" });
  socket().deliver({ messageType: MT.DISCONNECT_NOTICE }, "DisconnectNotice", { reason: DT.BEING_PUSHED_OUT, text: "" });
  socket().serverClose(1000);
  assert.deepEqual(kinds(events), ["logon", "pushedout", "closed"]);
  assert.deepEqual(events[1][1], { cause: "a new logon from 10.0.0.2" });
  assert.equal(events[2][1].why, "pushed out: a new logon from 10.0.0.2");
  clock.advance(600_000);
  assert.equal(FakeWebSocket.made.length, 1);
  assert.ok(!client.loggedOn);
  assert.throws(() => client.send("bob", 1, "x"), esf.NotConnected);
});

test("kicked out: operator and reason, no reconnect", async () => {
  const { socket, clock, events } = await loggedOn();
  socket().deliver({ messageType: MT.BEING_KICKED_OUT_NOTIFY }, "BeingKickedOutNotify", { operator: "admin", reason: "spam" });
  socket().serverClose(1000);
  assert.deepEqual(events[1], ["kickedout", { operator: "admin", reason: "spam" }]);
  assert.deepEqual(kinds(events), ["logon", "kickedout", "closed"]);
  clock.advance(600_000);
  assert.equal(FakeWebSocket.made.length, 1);
});

test("any other notice: disconnected with its reason, then a reconnect", async () => {
  const { socket, events } = await loggedOn();
  socket().deliver({ messageType: MT.DISCONNECT_NOTICE }, "DisconnectNotice", { reason: DT.SERVER_SHUTDOWN, text: "bye" });
  socket().serverClose(1001);
  assert.deepEqual(kinds(events), ["logon", "disconnected", "interrupted", "reconnecting"]);
  assert.deepEqual(events[1][1], { reason: DT.SERVER_SHUTDOWN, reasonName: "SERVER_SHUTDOWN", text: "bye" });
});

test("pending calls fail when the connection drops, with the state it goes to", async () => {
  const { client, socket } = await loggedOn();
  const answer = client.query("bob", 1);
  socket().serverClose(1006);
  await assert.rejects(answer, (e) => e instanceof esf.NotConnected && e.state === "reconnecting" && e.closeCode === 1006);
});

test("incoming messages: events, Ack for an acked send, answers to queries and pings", async () => {
  const { socket, events } = await loggedOn({
    handler: { handleQuery: async (sender, clientType, type, payload) => `${sender} asked ${esf.toText(payload)}` },
  });
  socket().deliver({ messageType: MT.SEND_CERTAINLY, messageId: 7, userId: "bob", clientType: 0 }, "Information",
                   { informationType: 2, payload: esf.toBytes("hi") });
  await flush();
  assert.deepEqual(events.at(-1), ["information", { sender: "bob", clientType: 0, informationType: 2, payload: esf.toBytes("hi"), stored: false }]);
  let [ack] = socket().take();
  assert.deepEqual([ack.messageType, ack.messageId, ack.destUserId], [MT.ACK, 7, "bob#0"]);

  socket().deliver({ messageType: MT.REQUEST, messageId: 8, userId: "bob" }, "Information", { informationType: 3, payload: esf.toBytes("q") });
  await flush();
  const [response] = socket().take();
  assert.deepEqual([response.messageType, response.messageId, response.destUserId], [MT.RESPONSE, 8, "bob#0"]);
  assert.equal(esf.toText(esf.decodeBody("Information", response.body).payload), "bob asked q");

  socket().deliver({ messageType: MT.PING_BY_SERVER, messageId: 9, userId: "bob" });
  const [pingAck] = socket().take();
  assert.deepEqual([pingAck.messageType, pingAck.messageId, pingAck.destUserId], [MT.PING_ACK, 9, "bob#0"]);

  socket().deliver({ messageType: MT.BROADCAST, userId: "bob", destUserId: "room" }, "Information", { informationType: 3, payload: esf.toBytes("all") });
  assert.deepEqual(events.at(-1), ["broadcast", { sender: "bob", groupId: "room", informationType: 3, payload: esf.toBytes("all") }]);

  socket().deliver({ messageType: MT.MY_DEVICE_ONLINE, clientType: 5 });
  assert.deepEqual(events.at(-1), ["deviceonline", { clientType: 5 }]);
});

test("answers go to the device that asked, not to every device of its user", async () => {
  // Bob's phone (5) and desktop (0) may both wait on MessageID 7 from
  // alice: an answer to "bob" would reach the first of them the server
  // finds, whichever asked.
  const { socket } = await loggedOn({
    handler: {
      handleInformation: async (sender, clientType, type, payload) => {
        if (type === 9) throw new Error("refused");
      },
      handleQuery: async () => "answer",
    },
  });
  const from = { userId: "bob", clientType: 5 };
  socket().deliver({ messageType: MT.SEND_CERTAINLY, messageId: 7, ...from }, "Information", { informationType: 2, payload: new Uint8Array(0) });
  socket().deliver({ messageType: MT.REQUEST, messageId: 8, ...from }, "Information", { informationType: 3, payload: new Uint8Array(0) });
  socket().deliver({ messageType: MT.PING_BY_SERVER, messageId: 9, ...from });
  socket().deliver({ messageType: MT.SEND_CERTAINLY, messageId: 10, ...from }, "Information", { informationType: 9, payload: new Uint8Array(0) });
  socket().deliver({ messageType: MT.BLOB, messageId: 11, ...from }, "BlobFragment",
                   { informationType: 1, blobId: 1, fragmentIndex: 0, isLast: true, payload: new Uint8Array(0) });
  await flush();
  const answers = socket().take().map((f) => [f.messageType, f.messageId, f.destUserId]);
  assert.deepEqual(answers.sort((a, b) => a[1] - b[1]), [
    [MT.ACK, 7, "bob#5"], [MT.RESPONSE, 8, "bob#5"], [MT.PING_ACK, 9, "bob#5"], [MT.ERROR, 10, "bob#5"], [MT.ERROR, 11, "bob#5"],
  ]);
  // A user ID that leaves no room for "#5" in the 11-byte slot: the user.
  socket().deliver({ messageType: MT.PING_BY_SERVER, messageId: 13, userId: "bobbobbobbo", clientType: 5 });
  assert.deepEqual(socket().take().map((f) => [f.messageType, f.messageId, f.destUserId]), [[MT.PING_ACK, 13, "bobbobbobbo"]]);
  // The server's own queries are answered to "_0".
  socket().deliver({ messageType: MT.REQUEST, messageId: 12, clientType: 0 }, "Information", { informationType: 3, payload: new Uint8Array(0) });
  await flush();
  assert.deepEqual(socket().take().map((f) => [f.messageType, f.messageId, f.destUserId]), [[MT.RESPONSE, 12, "_0"]]);
});

test("a malformed Send, SendCertainly or Request from a user gets BadRequest, and nothing is left rejected", async () => {
  // The server relays users' bodies unread: a body too short for its
  // InformationType must not become a rejected promise nobody handles
  // (node ends the process on one).
  const { socket, events } = await loggedOn({ handler: { handleQuery: async () => "answer" } });
  for (const [messageType, messageId, size] of [[MT.SEND, 0, 2], [MT.SEND_CERTAINLY, 7, 2], [MT.REQUEST, 8, 1]]) {
    const bytes = esf.encodeFrame(wire, { messageType, messageId, userId: "bob", clientType: 5, destUserId: "alice", body: new Uint8Array(size) });
    socket().onmessage({ data: bytes.buffer });
  }
  await flush();
  const answers = socket().take().map((f) => [f.messageType, f.messageId, esf.decodeBody("Error", f.body).code]);
  assert.deepEqual(answers, [[MT.ERROR, 7, ErrorCode.BAD_REQUEST], [MT.ERROR, 8, ErrorCode.BAD_REQUEST]]);
  assert.deepEqual(kinds(events), ["logon"]);
});

test("a ping that arrives once the client is no longer logged on goes unanswered", () => {
  const s = setup();
  s.client.logon().catch(() => {});
  s.socket().open();
  // Before the logon reply, and after a push-out notice before the close.
  s.socket().deliver({ messageType: MT.PING_BY_SERVER, messageId: 9, userId: "bob" });
  assert.deepEqual(s.socket().sent.map((f) => f.messageType), [MT.LOGON]);
  s.socket().acceptLogon();
  s.socket().deliver({ messageType: MT.BEING_PUSHED_OUT_NOTIFY }, "BeingPushedOutNotify", { cause: "elsewhere" });
  s.socket().deliver({ messageType: MT.PING_BY_SERVER, messageId: 10, userId: "bob" });
  assert.deepEqual(s.socket().take(), []);
});

test("no PingAck while the server does not read; past maxBufferedAmount of answers the connection is given up and rebuilt", async () => {
  const { client, clock, socket, events } = await loggedOn({ maxBufferedAmount: 200_000 });
  const ws = socket();
  ws.stalled = true;
  ws.bufferedAmount = 100_000; // above 64 KiB: the server is not reading
  for (let id = 1; id <= 1000; id++) ws.deliver({ messageType: MT.PING_BY_SERVER, messageId: id, userId: "bob" });
  assert.deepEqual(ws.take(), []);
  assert.equal(client.pingsUnanswered, 1000);
  assert.equal(ws.bufferedAmount, 100_000);

  // What the application sends is not counted: it paces itself.
  for (let n = 0; n < 3; n++) client.send("bob", 1, new Uint8Array(100_000));
  assert.ok(ws.bufferedAmount > 300_000);
  assert.equal(client.state, "loggedon");
  const waiting = client.getMyIPE();
  // A flood of messages to acknowledge: each Ack is written, counted, until the bound.
  let delivered = 0;
  while (client.state === "loggedon" && delivered < 10_000) {
    delivered += 1;
    ws.deliver({ messageType: MT.SEND_CERTAINLY, messageId: delivered, userId: "bob" }, "Information",
               { informationType: 1, payload: esf.toBytes("ack me") });
  }
  assert.equal(client.state, "reconnecting");
  assert.ok(delivered > 3000 && delivered < 6000, `${delivered} messages`); // ~46-byte Acks
  assert.equal(ws.closedWith.code, esf.CLOSE_BACKED_UP);
  await assert.rejects(waiting, (e) => e instanceof esf.NotConnected &&
    e.message.startsWith("this client closed the connection: the server read nothing while"));
  const [, disconnected] = events.find(([type]) => type === "disconnected");
  assert.equal(disconnected.reason, DT.CHANNEL_CACHE_OVERFLOW);
  const [, interrupted] = events.find(([type]) => type === "interrupted");
  assert.match(interrupted.why, /maxBufferedAmount is 200000/);
  clock.advance(1000);
  assert.notEqual(socket(), ws); // rebuilt
});

test("a query to a client without a handler gets HandlerError", async () => {
  const { socket } = await loggedOn();
  socket().deliver({ messageType: MT.REQUEST, messageId: 8, userId: "bob" }, "Information", { informationType: 3, payload: new Uint8Array(0) });
  await flush();
  const [error] = socket().take();
  assert.equal(error.messageType, MT.ERROR);
  assert.equal(esf.decodeBody("Error", error.body).code, ErrorCode.HANDLER_ERROR);
});

test("a frame that is not one valid frame: the connection is left and rebuilt", async () => {
  const { socket, clock } = await loggedOn();
  const ws = socket();
  ws.onmessage({ data: new Uint8Array([0xff, 0, 1]).buffer });
  assert.equal(ws.closedWith.code, esf.CLOSE_PROTOCOL_ERROR);
  clock.advance(1000);
  assert.equal(FakeWebSocket.made.length, 2);
});

test("logoff: a Logoff frame, a normal close, no reconnect", async () => {
  const { client, socket, clock, events } = await loggedOn();
  client.logoff();
  assert.deepEqual(socket().take().map((f) => f.messageType), [MT.LOGOFF]);
  assert.equal(socket().closedWith.code, 1000);
  assert.equal(events.at(-1)[0], "closed");
  clock.advance(600_000);
  assert.equal(FakeWebSocket.made.length, 1);
});

test("a message larger than the server's maximum is refused before it is sent", async () => {
  const { client, socket } = await loggedOn();
  await assert.rejects(client.query("bob", 1, new Uint8Array(2 << 20)), (e) => e.code === ErrorCode.TOO_LARGE);
  assert.throws(() => client.send("bob", 1, new Uint8Array(2 << 20)), RangeError);
  assert.equal(socket().take().length, 0);
});

test("an unanswered logon: the first rejects, a re-logon tries another connection", async () => {
  let s = setup();
  const logon = s.client.logon();
  s.socket().open();
  s.clock.advance(5000);
  await assert.rejects(logon, /no logon reply/);
  assert.equal(s.socket().closedWith.code, esf.CLOSE_NO_ANSWER);

  s = await loggedOn();
  s.socket().serverClose(1006);
  s.clock.advance(1000);
  s.socket().open();
  s.clock.advance(5000);
  assert.equal(s.socket().closedWith.code, esf.CLOSE_NO_ANSWER);
  assert.equal(s.events.at(-1)[0], "reconnecting");
});

// -- the server's offline store (protocol.md 8.7) ---------------------------------------

/** A delivery from the offline store: the sender's frame with DestUserID "_0" and the stored ID. */
function storedFrame(ws, id, text, { type = MT.SEND_CERTAINLY, sender = "bob" } = {}) {
  ws.deliver({ messageType: type, messageId: id, userId: sender, destUserId: "_0", clientType: 5 }, "Information",
             { informationType: 6, payload: esf.toBytes(text) });
}

const settle = async (clock) => {
  for (let i = 0; i < 5; i++) await flush();
  clock.advance(0);
};

test("sendCertainly to an offline user: the server's Ack means stored", async () => {
  const { client, socket } = await loggedOn();
  const sent = client.sendCertainly("bob", 6, "while you were away");
  const [request] = socket().take();
  socket().deliver({ messageType: MT.ACK, messageId: request.messageId, userId: "_0" }, "Ack", { informationType: 6 });
  assert.equal(await sent, "stored");
  assert.equal(client.refusedAnswers, 0);
  // To the server itself, the server's Ack means done.
  const joined = client.sendCertainly("_0", 1, "lobby");
  const [join] = socket().take();
  socket().deliver({ messageType: MT.ACK, messageId: join.messageId, userId: "_0" }, "Ack", { informationType: 1 });
  assert.equal(await joined, "delivered");
});

test("stored messages: handled once each, in order, one cumulative Ack to _0, none to the sender", async () => {
  const seen = [];
  const { client, socket, clock, events } = await loggedOn({
    handler: { handleInformation: async (sender, kind, type, payload) => { await flush(); seen.push(esf.toText(payload)); } },
  });
  const ws = socket();
  storedFrame(ws, 3, "one");
  storedFrame(ws, 4, "two", { type: MT.SEND });
  storedFrame(ws, 5, "three");
  await settle(clock);
  assert.deepEqual(seen, ["one", "two", "three"]);
  const info = events.filter(([type]) => type === "information").map(([, d]) => [d.sender, d.clientType, esf.toText(d.payload), d.stored]);
  assert.deepEqual(info, [["bob", 5, "one", true], ["bob", 5, "two", true], ["bob", 5, "three", true]]);
  const acks = ws.take();
  assert.deepEqual(acks.map((f) => [f.messageType, f.messageId, f.destUserId]), [[MT.ACK, 5, "_0"]]);
  assert.equal(client.offlineMark, 5);
  // The same IDs again (a redelivery) are acknowledged, not handled twice.
  storedFrame(ws, 4, "two");
  storedFrame(ws, 5, "three");
  storedFrame(ws, 6, "four");
  await settle(clock);
  assert.deepEqual(seen, ["one", "two", "three", "four"]);
  assert.deepEqual(ws.take().map((f) => [f.messageType, f.messageId, f.destUserId]), [[MT.ACK, 6, "_0"]]);
});

test("stored messages come again after a lost connection and are acknowledged there, once handled", async () => {
  const { client, socket, clock, events } = await loggedOn();
  storedFrame(socket(), 1, "kept");
  socket().serverClose(1006); // lost before the Ack went out
  await settle(clock);
  clock.advance(1000);
  socket().open();
  socket().acceptLogon();
  storedFrame(socket(), 1, "kept");
  await settle(clock);
  assert.deepEqual(socket().take().map((f) => [f.messageType, f.messageId, f.destUserId]), [[MT.ACK, 1, "_0"]]);
  assert.equal(events.filter(([type]) => type === "information").length, 1);
  assert.equal(client.offlineMark, 1);
});

test("a stored blob or a malformed stored message is acknowledged and dropped", async () => {
  const { socket, clock, events } = await loggedOn();
  socket().deliver({ messageType: MT.BLOB, messageId: 7, userId: "bob", destUserId: "_0" }, "BlobFragment",
                   { informationType: 1, blobId: 1, fragmentIndex: 0, isLast: true, payload: esf.toBytes("x") });
  const bytes = esf.encodeFrame(wire, { messageType: MT.SEND, messageId: 8, userId: "bob", destUserId: "_0", body: new Uint8Array([1]) });
  socket().onmessage({ data: bytes.buffer });
  await settle(clock);
  assert.deepEqual(socket().take().map((f) => [f.messageType, f.messageId]), [[MT.ACK, 8]]);
  assert.equal(events.filter(([type]) => type === "information").length, 0);
});

// -- the connection's state ---------------------------------------------------------------

test("state and statechange follow the connection's life", async () => {
  const s = setup();
  assert.equal(s.client.state, "idle");
  const logon = s.client.logon();
  assert.equal(s.client.state, "connecting");
  s.socket().open();
  s.socket().acceptLogon();
  await logon;
  assert.equal(s.client.state, "loggedon");
  s.socket().serverClose(1006);
  assert.equal(s.client.state, "reconnecting");
  s.clock.advance(1000);
  s.socket().open();
  s.socket().acceptLogon();
  assert.equal(s.client.state, "loggedon");
  s.client.close();
  assert.equal(s.client.state, "closed");
  assert.deepEqual(s.states, ["connecting", "loggedon", "reconnecting", "loggedon", "closed"]);
});

// -- sending while reconnecting -------------------------------------------------------------

test("sending while reconnecting without a queue is refused at once, saying so", async () => {
  const { client, socket } = await loggedOn();
  socket().serverClose(1006);
  assert.throws(() => client.send("bob", 6, "hi"), (e) => e instanceof esf.NotConnected && /reconnecting/.test(e.message) && e.state === "reconnecting");
  await assert.rejects(client.broadcast("lobby", 3, "hi"), (e) => e instanceof esf.NotConnected && /reconnecting/.test(e.message));
  assert.equal(client.queued, 0);
});

test("with a queue: sends made while reconnecting go out after the relogon listeners, in order", async () => {
  const { client, socket, clock } = await loggedOn({ queue: { maxMessages: 3 } });
  socket().serverClose(1006);
  assert.equal(client.send("bob", 6, "one"), "queued");
  const said = client.broadcast("lobby", 3, "two");
  const asked = client.sendCertainly("carol", 6, "three");
  assert.equal(client.queued, 3);
  // A fourth is refused: the queue is bounded.
  assert.throws(() => client.send("bob", 6, "four"), (e) => e instanceof esf.NotConnected && /at most 3 messages/.test(e.message));
  client.addEventListener("relogon", () => client.send("_0", 1, "lobby")); // e.g. join the room again
  clock.advance(1000);
  socket().open();
  socket().acceptLogon();
  const frames = socket().take();
  assert.deepEqual(frames.map((f) => [f.messageType, esf.toText(esf.decodeBody("Information", f.body).payload)]),
                   [[MT.SEND, "lobby"], [MT.SEND, "one"], [MT.BROADCAST, "two"], [MT.SEND_CERTAINLY, "three"]]);
  assert.equal(client.queued, 0);
  socket().deliver({ messageType: MT.ACK, messageId: frames[2].messageId }, "Ack", { informationType: 3 });
  socket().deliver({ messageType: MT.ACK, messageId: frames[3].messageId, userId: "carol" }, "Ack", { informationType: 6 });
  await said;
  assert.equal(await asked, "delivered");
  assert.equal(client.send("bob", 6, "now"), "sent");
});

test("the queue is bounded in bytes too; queued calls time out; closing fails what waits", async () => {
  const { client, socket, clock } = await loggedOn({ queue: { maxMessages: 10, maxBytes: 100 } });
  socket().serverClose(1006);
  assert.throws(() => client.send("bob", 6, "x".repeat(200)), /100 bytes/);
  const late = client.query("bob", 1, "q", { timeout: 500 });
  clock.advance(500);
  await assert.rejects(late, (e) => e instanceof esf.RequestError && e.code === ErrorCode.TIMEOUT);
  assert.equal(client.queued, 0);
  const waiting = client.broadcast("lobby", 3, "hi");
  client.close();
  await assert.rejects(waiting, (e) => e instanceof esf.NotConnected && e.state === "closed");
  assert.throws(() => client.send("bob", 6, "x"), (e) => e instanceof esf.NotConnected && /closed by the application/.test(e.message));
});

// -- a connection refused before its handshake ------------------------------------------------

test("a close before the handshake says where to look", async () => {
  const { client, socket } = setup();
  const logon = client.logon();
  socket().serverClose(1006); // a refused origin: HTTP 403, which the page cannot see
  await assert.rejects(logon, (e) => e instanceof esf.NotConnected && e.beforeHandshake === true && e.closeCode === 1006
    && /before the WebSocket handshake completed/.test(e.message) && /403/.test(e.message) && /--websocket-origin/.test(e.message));
  assert.equal(client.state, "closed");
});

test("a close after the handshake carries no such hint", async () => {
  const { client, socket } = setup();
  const logon = client.logon();
  socket().open();
  socket().serverClose(1006);
  await assert.rejects(logon, (e) => e instanceof esf.NotConnected && e.beforeHandshake === false && !/403/.test(e.message));
});
