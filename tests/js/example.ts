// A page's code in TypeScript, against the esf package's declarations
// (esf.d.ts): `tsc --noEmit` must accept it as it is, and refuse each line
// marked @ts-expect-error (declarations that let anything through would
// make those lines "unused" errors).  tests/test_websocket_js.py runs it.
import {
  EsfClient, NotConnected, RequestError, LogonFailed, ErrorCode, DisconnectedType, nameOf, toText,
  type ClientState, type LogonResponse,
} from "esf";

const client = new EsfClient("wss://chat.example.com/esf", {
  userId: "alice",
  password: "secret",
  queue: { maxMessages: 20 },
  handler: {
    handleQuery: (sender, clientType, informationType, payload) => `${sender} asked ${toText(payload)}`,
  },
});

client.addEventListener("statechange", ({ detail }) => {
  const now: ClientState = detail.state;
  console.log(`${detail.previous} -> ${now}`);
});
client.addEventListener("information", ({ detail }) => {
  const text: string = toText(detail.payload);
  console.log(detail.stored ? `(while you were away) ${detail.sender}: ${text}` : `${detail.sender}: ${text}`);
});
client.addEventListener("disconnected", ({ detail }) => {
  console.log(nameOf(DisconnectedType, detail.reason), detail.text);
});

async function main(): Promise<void> {
  let response: LogonResponse;
  try {
    response = await client.logon();
  } catch (error) {
    if (error instanceof LogonFailed) console.log("refused:", error.cause);
    else if (error instanceof NotConnected && error.beforeHandshake) console.log("check the origin:", error.message);
    return;
  }
  console.log(response.heartbeatInterval, client.state === "loggedon");
  const outcome: "delivered" | "stored" = await client.sendCertainly("bob", 6, "hi");
  const sent: "sent" | "queued" = client.send("bob", 6, new Uint8Array([1, 2]));
  const online: Map<string, boolean> = await client.queryOnlines(["bob"]);
  try {
    await client.query("_0", 4, "ping", { timeout: 1000 });
  } catch (error) {
    if (error instanceof RequestError && error.code === ErrorCode.TIMEOUT) console.log("slow");
  }
  console.log(outcome, sent, online, client.queued, client.offlineMark);

  // @ts-expect-error: the state is one of five names
  const wrong: number = client.state;
  // @ts-expect-error: a payload is bytes or text
  client.send("bob", 6, 42);
  // @ts-expect-error: an information event has no "reason"
  client.addEventListener("information", ({ detail }) => detail.reason);
  // @ts-expect-error: userId is required
  new EsfClient("ws://localhost/esf", {});
  console.log(wrong);
}

void main();
