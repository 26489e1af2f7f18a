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
// Messages written while reconnecting wait for the re-logon (esf.js's queue).
const QUEUE = { maxMessages: 20, maxBytes: 64 * 1024 };

/** Why the server ended a session, in words. */
const REASONS = {
  [DisconnectedType.SERVER_SHUTDOWN]: "the server is shutting down",
  [DisconnectedType.HEARTBEAT_TIMEOUT]: "it heard nothing from this page for too long",
  [DisconnectedType.LOGON_TIMEOUT]: "the logon took too long",
  [DisconnectedType.INVALID_MESSAGE]: "it received something it could not read",
  [DisconnectedType.MESSAGE_TOO_LARGE]: "a message was too large",
  [DisconnectedType.MESSAGE_WITH_WRONG_USER_ID]: "a message carried another user's ID",
  [DisconnectedType.CHANNEL_CACHE_OVERFLOW]: "this page fell too far behind",
  [DisconnectedType.MAX_CONNECTION_COUNT_LIMITTED]: "the server is full",
  [DisconnectedType.UNAUTHORIZED_CLIENT_TYPE]: "it does not take this kind of device",
  [DisconnectedType.BEING_PUSHED_OUT]: "you logged on somewhere else",
  [DisconnectedType.BEING_KICKED_OUT]: "you were kicked out",
  [DisconnectedType.LOGGED_OFF]: "you logged off",
  [DisconnectedType.NEW_CONNECTION_IGNORED]: "it ignored this new connection",
  [DisconnectedType.LOGON_FAILED]: "the logon was refused",
  [DisconnectedType.NOT_LOGGED_ON]: "this page was not logged on",
};

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

/**
 * Add a line to the log; every piece of text goes in as text, never HTML.
 * `tag` is a remark shown before the text ("while you were away").
 */
function line(kind, from, text, tag = "") {
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
  if (tag) item.append(tagged(tag));
  item.append(document.createTextNode(text));
  $("log").append(item);
  $("log").scrollTop = $("log").scrollHeight;
  return item;
}

function tagged(text) {
  const tag = document.createElement("span");
  tag.className = "tag";
  tag.textContent = `(${text}) `;
  return tag;
}

/** Change a line's kind and remark (a queued message went out). */
function relabel(item, kind, tag = "") {
  item.className = kind;
  item.dataset.kind = kind;
  const old = item.querySelector(".tag");
  if (old) old.remove();
  if (tag) item.lastChild.before(tagged(tag));
}

/** A payload as text, or its size when it is not UTF-8. */
function shown(payload) {
  try {
    return toText(payload);
  } catch {
    return `(${payload.length} bytes)`;
  }
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

/** Forget who was online (the session ended: the list would only go stale). */
function clearOnline() {
  lastShown = null;
  $("online").replaceChildren();
  $("to").replaceChildren(new Option(`everyone in ${ROOM}`, ROOM));
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
    client = new EsfClient(serverUrl(), { userId, password: $("password").value, queue: QUEUE });
  } catch (error) {
    notice(error.message);
    return;
  }
  let explained = false; // the server said why this connection ended
  let pushedOut = false;
  client.addEventListener("information", ({ detail }) => {
    const away = detail.stored ? "while you were away" : "";
    if (detail.sender === "_0") {
      // An operator's notice (the admin API's, information type 0 unless it says otherwise).
      line("notice", "", `Notice from the server: ${shown(detail.payload)}`, away);
    } else if (detail.informationType === TELL) {
      line("private", detail.sender, shown(detail.payload), away);
    }
  });
  client.addEventListener("broadcast", ({ detail }) => {
    if (detail.sender === "_0") line("notice", "", `Notice from the server: ${shown(detail.payload)}`);
    else if (detail.informationType === SAY) line("room", detail.sender, shown(detail.payload));
  });
  client.addEventListener("pushedout", ({ detail }) => {
    pushedOut = true;
    notice(`You were pushed out: ${detail.cause || `${userId} logged on somewhere else`}. ` +
           "Logging on again here pushes the other one out.");
  });
  client.addEventListener("kickedout", ({ detail }) => {
    notice(`You were kicked out by ${detail.operator}: ${detail.reason || "no reason given"}.`);
  });
  client.addEventListener("disconnected", ({ detail }) => {
    explained = true;
    const why = REASONS[detail.reason] || detail.reasonName;
    const more = detail.text && detail.text.toLowerCase() !== why ? ` (${detail.text})` : "";
    line("system", "", `The server closed the connection: ${why}${more}.`);
  });
  client.addEventListener("interrupted", ({ detail }) => {
    if (!explained) line("system", "", `Lost the connection to the server (${detail.why}).`);
    explained = false;
    line("system", "", "Reconnecting… messages you send now go out once reconnected.");
    status(`reconnecting as ${userId}…`, "offline");
  });
  client.addEventListener("relogon", ({ detail }) => {
    if (detail.response.succeeded) {
      status(`logged on as ${userId}`, "online");
      line("system", "", `Reconnected as ${userId}.`);
      join();
    }
  });
  client.addEventListener("closed", ({ detail }) => {
    status("not logged on", "idle");
    clearInterval(pollTimer);
    clearOnline();
    composing(false);
    // Nothing filled in: logging on again here is a choice, not one click
    // (after a push-out it pushes the other page out in turn).
    $("password").value = "";
    if (pushedOut) $("user").value = "";
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
  if (!text || !client || client.state === "closed") return;
  const kind = to === ROOM ? "room mine" : "private mine";
  const shownText = to === ROOM ? text : `(to ${to}) ${text}`;
  // While reconnecting the message waits in esf.js's queue: shown as such
  // until it goes out.
  const item = client.state === "reconnecting" ? line("queued", client.userId, shownText, "waiting to reconnect") : null;
  if (item) $("text").value = "";
  try {
    let tag = "";
    if (to === ROOM) {
      await client.broadcast(ROOM, SAY, text);
    } else if ((await client.sendCertainly(to, TELL, text)) === "stored") {
      tag = `${to} is offline: delivered at their next logon`;
    }
    if (item) {
      relabel(item, kind, tag);
    } else {
      line(kind, client.userId, shownText, tag);
      if ($("text").value === text) $("text").value = "";
    }
  } catch (error) {
    if (item) relabel(item, "system", "not sent");
    line("system", "", `not sent: ${error.message}`);
  }
}

$("logon-form").addEventListener("submit", logon);
$("composer").addEventListener("submit", sendMessage);
$("logoff").addEventListener("click", () => client && client.logoff());
// For the tests and the curious: the names the page uses.
window.esfChat = { get client() { return client; }, DisconnectedType, nameOf };
