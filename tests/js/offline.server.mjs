// esf.js against a real `twistd esf --websocket ... --offline sqlite:...`
// (started by tests/test_websocket_js.py, which passes its WebSocket URL in
// ESF_URL): the offline store's semantics, as the Python client has them
// (docs/protocol.md 8.7).  Node has a WebSocket from version 22 on, and
// with --experimental-websocket from 20.10 on.
import { test } from "node:test";
import assert from "node:assert/strict";

import { EsfClient, toText } from "../../esf/web/esf.js";

const URL = process.env.ESF_URL;
const TELL = 6;

/** A logged-on client that collects what it receives. */
async function client(userId) {
  const received = [];
  const waiters = [];
  const c = new EsfClient(URL, { userId, password: "pw", requestTimeout: 5000 });
  c.addEventListener("information", ({ detail }) => {
    received.push({ text: toText(detail.payload), stored: detail.stored, sender: detail.sender, at: Date.now() });
    for (const w of waiters.splice(0)) w();
  });
  await c.logon();
  /** Wait until `count` messages have arrived (at most `ms`). */
  c.received = async (count, ms = 5000) => {
    const deadline = Date.now() + ms;
    while (received.length < count) {
      const left = deadline - Date.now();
      if (left <= 0) assert.fail(`${userId} got ${JSON.stringify(received)}, not ${count} messages, within ${ms} ms`);
      await new Promise((resolve) => {
        waiters.push(resolve);
        setTimeout(resolve, left);
      });
    }
    return received.slice();
  };
  return c;
}

test("an offline user's messages: stored, delivered once at logon, acknowledged, and live ones not held", async () => {
  const alice = await client("alice");
  try {
    // bob is offline: the server stores and says so, as _0.
    assert.equal(await alice.sendCertainly("bob", TELL, "one"), "stored");
    alice.send("bob", TELL, "two");
    assert.equal(await alice.sendCertainly("bob", TELL, "three"), "stored");
    assert.equal(alice.refusedAnswers, 0);

    const bob = await client("bob");
    const stored = await bob.received(3);
    assert.deepEqual(stored.map((m) => [m.sender, m.text, m.stored]),
                     [["alice", "one", true], ["alice", "two", true], ["alice", "three", true]]);
    // Acknowledged: a live message goes through at once, not after the
    // server's ack timeout (10 s).
    const start = Date.now();
    assert.equal(await alice.sendCertainly("bob", TELL, "live", { timeout: 3000 }), "delivered");
    const live = (await bob.received(4))[3];
    assert.deepEqual([live.text, live.stored], ["live", false]);
    assert.ok(Date.now() - start < 3000, `the live message took ${Date.now() - start} ms`);
    assert.equal(bob.offlineMark >= 3, true);
    bob.close(); // no Logoff: the connection just ends

    // The next logon gets only what came since: the first three were
    // acknowledged and forgotten.
    for (let i = 0; await alice.isUserOnline("bob"); i++) {
      assert.ok(i < 100, "bob is still online 5 s after closing");
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    assert.equal(await alice.sendCertainly("bob", TELL, "later"), "stored");
    const again = await client("bob");
    const [first] = await again.received(1);
    assert.deepEqual([first.text, first.stored], ["later", true]);
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal((await again.received(1)).length, 1, "nothing acknowledged came again");
    again.logoff();
  } finally {
    alice.logoff();
  }
});
