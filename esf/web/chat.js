// The chat example's web page (esf/examples/chat.py): log on, join the
// "lobby" room, see who is online, talk to the room or to one user, and
// show why the session ended (pushed out by another tab, kicked...).
import { EsfClient, DisconnectedType, nameOf, toText } from "./esf.js";

// The chat application's information types (esf/examples/chat.py).
const JOIN = 1;
const SAY = 3;
const TELL = 6;
const ROOM = "lobby";
const ONLINE_POLL_MS = 3000;

const $ = (id) => document.getElementById(id);
let client = null;
let pollTimer = null;
let lastShown = null; // the online list as last shown

/** ws(s)://this-host/esf, or the page's ?server= parameter. */
function serverUrl() {
  const asked = new URLSearchParams(location.search).get("server");
  if (asked) return asked;
  const url = new URL("esf", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

function status(text, state) {
  $("status").textContent = text;
  $("status").dataset.state = state;
}

function notice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

/** Add a line to the log; every piece of text goes in as text, never HTML. */
function line(kind, from, text) {
  const item = document.createElement("li");
  item.className = kind;
  item.dataset.kind = kind;
  if (from) {
    item.dataset.from = from;
    const who = document.createElement("span");
    who.className = "from";
    who.textContent = `${from}: `;
    item.append(who);
  }
  item.append(document.createTextNode(text));
  $("log").append(item);
  $("log").scrollTop = $("log").scrollHeight;
}

async function refreshOnline() {
  if (!client || !client.loggedOn) return;
  let users;
  try {
    users = await client.getAllOnlineUsers();
  } catch {
    return; // the next poll tries again
  }
  const shown = users.join("\n");
  if (shown === lastShown) return; // unchanged: leave the list and the menu alone
  lastShown = shown;
  $("online").replaceChildren(...users.map((user) => {
    const item = document.createElement("li");
    item.textContent = user;
    item.dataset.user = user;
    if (user === client.userId) item.className = "me";
    else item.addEventListener("click", () => choose(user));
    return item;
  }));
  const to = $("to");
  const chosen = to.value;
  to.replaceChildren(new Option(`everyone in ${ROOM}`, ROOM),
    ...users.filter((u) => u !== client.userId).map((u) => new Option(u, u)));
  to.value = [...to.options].some((o) => o.value === chosen) ? chosen : ROOM;
}

/** Enable or disable the message form (after the session ended for good). */
function composing(on) {
  for (const id of ["to", "text", "send", "logoff"]) $(id).disabled = !on;
}

function choose(user) {
  const to = $("to");
  if (![...to.options].some((o) => o.value === user)) to.append(new Option(user, user));
  to.value = user;
  $("text").focus();
}

async function join() {
  try {
    await client.sendCertainly("_0", JOIN, ROOM);
    line("system", "", `you are in ${ROOM}`);
  } catch (error) {
    line("system", "", `could not join ${ROOM}: ${error.message}`);
  }
  refreshOnline();
}

async function logon(event) {
  event.preventDefault();
  const userId = $("user").value.trim();
  notice("");
  try {
    client = new EsfClient(serverUrl(), { userId, password: $("password").value });
  } catch (error) {
    notice(error.message);
    return;
  }
  client.addEventListener("information", ({ detail }) => {
    if (detail.informationType === TELL) line("private", detail.sender, toText(detail.payload));
  });
  client.addEventListener("broadcast", ({ detail }) => {
    if (detail.informationType === SAY) line("room", detail.sender, toText(detail.payload));
  });
  client.addEventListener("pushedout", ({ detail }) => {
    notice(`You were pushed out: ${detail.cause || `${userId} logged on somewhere else`}.`);
  });
  client.addEventListener("kickedout", ({ detail }) => {
    notice(`You were kicked out by ${detail.operator}: ${detail.reason || "no reason given"}.`);
  });
  client.addEventListener("disconnected", ({ detail }) => {
    line("system", "", `the server closed the connection: ${detail.reasonName} ${detail.text}`);
  });
  client.addEventListener("interrupted", () => status(`reconnecting as ${userId}…`, "offline"));
  client.addEventListener("relogon", ({ detail }) => {
    if (detail.response.succeeded) {
      status(`logged on as ${userId}`, "online");
      join();
    }
  });
  client.addEventListener("closed", ({ detail }) => {
    status("not logged on", "idle");
    clearInterval(pollTimer);
    composing(false);
    $("logon").disabled = false;
    $("logon-form").hidden = false;
    if ($("notice").hidden) notice(`Disconnected: ${detail.why}`);
  });
  $("logon").disabled = true;
  status("logging on…", "offline");
  try {
    await client.logon();
  } catch (error) {
    status("not logged on", "idle");
    notice(`Could not log on: ${error.message}`);
    $("logon").disabled = false;
    return;
  }
  status(`logged on as ${userId}`, "online");
  lastShown = null;
  $("logon-form").hidden = true;
  $("chat").hidden = false;
  composing(true);
  await join();
  pollTimer = setInterval(refreshOnline, ONLINE_POLL_MS);
}

async function sendMessage(event) {
  event.preventDefault();
  const text = $("text").value;
  const to = $("to").value;
  if (!text || !client || !client.loggedOn) return;
  try {
    if (to === ROOM) {
      await client.broadcast(ROOM, SAY, text);
      line("room mine", client.userId, text);
    } else {
      client.send(to, TELL, text);
      line("private mine", client.userId, `(to ${to}) ${text}`);
    }
    $("text").value = "";
  } catch (error) {
    line("system", "", `not sent: ${error.message}`);
  }
}

$("logon-form").addEventListener("submit", logon);
$("composer").addEventListener("submit", sendMessage);
$("logoff").addEventListener("click", () => client && client.logoff());
// For the tests and the curious: the names the page uses.
window.esfChat = { get client() { return client; }, DisconnectedType, nameOf };
