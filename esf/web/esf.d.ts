// TypeScript declarations of esf.js, the esf client for browsers (and node
// 22 or later, which has a WebSocket).  docs/websocket.md is the reference;
// tests/js/example.ts is checked against this file with `tsc --noEmit`.

/** The protocol version sent in every Logon (1). */
export declare const PROTOCOL_VERSION: 1;
/** The WebSocket subprotocol the server speaks ("esf.v1"). */
export declare const SUBPROTOCOL: "esf.v1";
/** The server's own ID: the destination of requests to the server, the sender of its answers. */
export declare const SERVER_ID: "_0";
/** The group ID of a broadcast to every online user. */
export declare const EVERYONE_ID: "*";
/** What separates a user ID from a device kind in an address: "bob#5". */
export declare const DEVICE_MARK: "#";
/** The first byte of every frame (0xff). */
export declare const START_TOKEN: 255;

/** Device kinds (ESFramework's numbering). */
export declare const ClientType: Readonly<{
  DOTNET: 0; SILVERLIGHT: 1; WINDOWS_PHONE: 2; WEBSOCKET: 3; IOS: 4;
  ANDROID: 5; XAMARIN: 6; WEBSOCKET_SSL: 7; OTHERS: 8;
}>;

/** Message types (docs/protocol.md). */
export declare const MessageType: Readonly<{
  GET_MY_IPE: 101; PING_BY_SERVER: 102; PING_ACK: 103; HEARTBEAT: 104;
  BEING_PUSHED_OUT_NOTIFY: 105; DISCONNECT_NOTICE: 106; LOGOFF: 107; KICK_OUT: 108;
  BEING_KICKED_OUT_NOTIFY: 109; GET_ALL_ONLINE_USERS: 110; QUERY_ONLINE: 111; LOGON: 112;
  QUERY_ONLINES: 114; GET_MY_DEVICES: 116; MY_DEVICE_ONLINE: 117; MY_DEVICE_OFFLINE: 118;
  ERROR: 120; SEND: 202; REQUEST: 203; RESPONSE: 204; SEND_CERTAINLY: 205; ACK: 206;
  BLOB: 207; BROADCAST: 601;
}>;

/** The result of a Logon. */
export declare const LogonResult: Readonly<{
  SUCCEED: 0; FAILED: 1; HAD_LOGGED_ON: 2; VERSION_MISMATCHED: 3; CLIENT_TYPE_REJECTED: 4; BUSY: 5;
}>;

/** Why the server ended a session (a DisconnectNotice's reason). */
export declare const DisconnectedType: Readonly<{
  NETWORK_INTERRUPTED: 0; INVALID_MESSAGE: 1; MESSAGE_WITH_WRONG_USER_ID: 2;
  HEARTBEAT_TIMEOUT: 3; BEING_PUSHED_OUT: 4; NEW_CONNECTION_IGNORED: 5;
  CHANNEL_CACHE_OVERFLOW: 6; UNAUTHORIZED_CLIENT_TYPE: 7; MAX_CONNECTION_COUNT_LIMITTED: 8;
  BEING_KICKED_OUT: 9; LOGGED_OFF: 10; SERVER_SHUTDOWN: 11; LOGON_TIMEOUT: 12;
  LOGON_FAILED: 13; NOT_LOGGED_ON: 14; MESSAGE_TOO_LARGE: 15;
}>;

/** The code of an Error answer (and of a timeout: TIMEOUT). */
export declare const ErrorCode: Readonly<{
  NOT_LOGGED_ON: 1; USER_OFFLINE: 2; NOT_AUTHORIZED: 3; UNKNOWN_MESSAGE_TYPE: 4;
  HANDLER_ERROR: 5; BAD_REQUEST: 6; TOO_LARGE: 7; RATE_LIMITED: 8; TIMEOUT: 9;
}>;

/** The name of `value` in one of the tables above (`nameOf(DisconnectedType, 11)` is "SERVER_SHUTDOWN"), or the number as text. */
export declare function nameOf(table: Readonly<Record<string, number>>, value: number): string;

/** The close codes this client sends: normal, no answer from the server, not one ESF frame per message, the server reads nothing. */
export declare const CLOSE_NORMAL: 1000;
export declare const CLOSE_NO_ANSWER: 4000;
export declare const CLOSE_PROTOCOL_ERROR: 4002;
export declare const CLOSE_BACKED_UP: 4003;

// -- errors ---------------------------------------------------------------------

/** Bytes that are not one valid frame; `reason` is the DisconnectedType it deserves. */
export declare class FrameError extends Error {
  constructor(message: string, reason?: number);
  readonly reason: number;
}

/** A body too short, too long or malformed for its message type. */
export declare class BadRequest extends Error {
  constructor(message: string);
}

/** A request answered with an Error, or not answered in time (`code` is ErrorCode.TIMEOUT). */
export declare class RequestError extends Error {
  constructor(code: number, text: string);
  readonly code: number;
  readonly text: string;
}

/** The call needs a logged-on session and there is none, or the connection was lost. */
export declare class NotConnected extends Error {
  constructor(message?: string, details?: { state?: ClientState | null; closeCode?: number | null; beforeHandshake?: boolean });
  /** The client's state when it happened (null when not known). */
  readonly state: ClientState | null;
  /** The WebSocket close code, when a close caused it. */
  readonly closeCode: number | null;
  /** The connection closed before its WebSocket handshake completed: unreachable, or refused (an origin the server does not allow). */
  readonly beforeHandshake: boolean;
}

/** The server refused the logon. */
export declare class LogonFailed extends Error {
  constructor(response: LogonResponse);
  readonly response: LogonResponse;
  /** A LogonResult. */
  readonly result: number;
  readonly cause: string;
}

// -- the codec --------------------------------------------------------------------

/** Bytes, or text sent as UTF-8. */
export type Payload = string | Uint8Array | ArrayBuffer | ArrayBufferView;

/** Text as UTF-8 bytes; bytes as they are. */
export declare function toBytes(data: Payload | null | undefined): Uint8Array;
/** UTF-8 bytes as text (throws on invalid UTF-8). */
export declare function toText(bytes: Uint8Array): string;

/** The two settings both ends must agree on, and the header layout they give. */
export declare class WireConfig {
  constructor(options?: { maxUserIdLength?: number; maxMessageSize?: number });
  readonly maxUserIdLength: number;
  readonly maxMessageSize: number;
  /** 36 bytes for the default maxUserIdLength of 11. */
  readonly headerLength: number;
  /** The bytes an ID may take in the header. */
  readonly idSlot: number;
}

/** One frame, decoded. */
export interface Frame {
  clientType: number;
  messageType: number;
  messageId: number;
  userId: string;
  destUserId: string;
  body: Uint8Array;
}

/** An ID's UTF-8 bytes for a header slot; throws RangeError when it does not fit or holds control characters. */
export declare function encodeId(id: string, config: WireConfig): Uint8Array;
/** One frame's bytes; throws RangeError when an ID or the body does not fit. */
export declare function encodeFrame(config: WireConfig, fields: {
  messageType: number; body?: Uint8Array; clientType?: number; messageId?: number; userId?: string; destUserId?: string;
}): Uint8Array;
/** Decode bytes holding exactly one frame; throws FrameError. */
export declare function decodeFrame(config: WireConfig, data: Uint8Array | ArrayBuffer): Frame;

/** The kinds of body fields: little-endian integers, UTF-8 strings, and lists of them. */
export type FieldKind = "u8" | "u16" | "u32" | "i32" | "bool" | "str" | "rest" | "strs" | "bools32" | "u8s8";
/** Every body, as its fields in wire order: `BODIES.Ack` is `[["informationType", "i32"]]`. */
export declare const BODIES: Readonly<Record<string, ReadonlyArray<readonly [string, FieldKind]>>>;
/** The body (a name in BODIES) of every message a client sends, by MessageType. */
export declare const REQUEST_BODIES: Readonly<Record<number, string>>;
/** The body (a name in BODIES) of every message a server sends, by MessageType. */
export declare const REPLY_BODIES: Readonly<Record<number, string>>;
/** Encode a body: `encodeBody("Information", {informationType: 1, payload})`. */
export declare function encodeBody(name: string, fields?: Record<string, unknown>): Uint8Array;
/** Decode a body; throws BadRequest when it does not parse. */
export declare function decodeBody(name: string, data: Uint8Array | ArrayBuffer): Record<string, any>;

/** `user`, or `user#kind` (one device of the user) when `clientType` is given. */
export declare function deviceAddress(userId: string, clientType?: number | null): string;

// -- the client --------------------------------------------------------------------

/** Where a client is in its life (EsfClient.state). */
export type ClientState = "idle" | "connecting" | "loggedon" | "reconnecting" | "closed";

/** The server's answer to a Logon. */
export interface LogonResponse {
  readonly result: number;
  readonly failureCause: string;
  /** Seconds between heartbeats. */
  readonly heartbeatInterval: number;
  /** Seconds of silence after which either end takes the other as gone. */
  readonly heartbeatTimeout: number;
  /** The largest frame the server takes from this client. */
  readonly maxMessageSize: number;
  readonly succeeded: boolean;
}

/** What handles the messages and queries of other users and the server. */
export interface Handler {
  handleInformation?(sender: string, clientType: number, informationType: number, payload: Uint8Array): void | Promise<void>;
  /** The answer's bytes or text. */
  handleQuery?(sender: string, clientType: number, informationType: number, payload: Uint8Array): Payload | Promise<Payload>;
}

/** A clock: the real one by default; tests pass their own. */
export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export interface EsfClientOptions {
  /** At most the ID slot (11 bytes of UTF-8 by default). */
  userId: string;
  password?: string;
  systemToken?: string;
  /** Default: WEBSOCKET_SSL (7) for wss: URLs, else WEBSOCKET (3). */
  clientType?: number;
  maxUserIdLength?: number;
  maxMessageSize?: number;
  /** Milliseconds a request waits for its answer (30000). */
  requestTimeout?: number;
  /** Bytes of the answers the client writes on its own (Acks, Errors, query answers) while the server reads nothing (more than 64 KiB unsent), past which the connection is closed (4003) and rebuilt (8 MiB); what the application sends is not counted. */
  maxBufferedAmount?: number;
  /** Reconnect backoff, in milliseconds. */
  retry?: { initialDelay?: number; maxDelay?: number; factor?: number; jitter?: boolean };
  /** Application messages sent while reconnecting: at most maxMessages (0, the default: refused at once) and maxBytes (1 MiB) wait for the re-logon. */
  queue?: { maxMessages?: number; maxBytes?: number };
  handler?: Handler | null;
  /** For tests and other runtimes: the WebSocket class (default: the global one), the clock, the random source of the jitter. */
  WebSocket?: unknown;
  clock?: Clock;
  random?: () => number;
}

/** The events of an EsfClient, by name: each is a CustomEvent whose `detail` holds the fields. */
export interface EsfClientEventMap {
  statechange: CustomEvent<{ state: ClientState; previous: ClientState }>;
  logon: CustomEvent<{ response: LogonResponse }>;
  relogon: CustomEvent<{ response: LogonResponse }>;
  interrupted: CustomEvent<{ why: string }>;
  reconnecting: CustomEvent<{ attempt: number; delay: number }>;
  disconnected: CustomEvent<{ reason: number; reasonName: string; text: string }>;
  pushedout: CustomEvent<{ cause: string }>;
  kickedout: CustomEvent<{ operator: string; reason: string }>;
  closed: CustomEvent<{ why: string }>;
  information: CustomEvent<{ sender: string; clientType: number; informationType: number; payload: Uint8Array; stored: boolean }>;
  broadcast: CustomEvent<{ sender: string; groupId: string; informationType: number; payload: Uint8Array }>;
  deviceonline: CustomEvent<{ clientType: number }>;
  deviceoffline: CustomEvent<{ clientType: number }>;
}

/**
 * A logged-on session with an esf server over WebSocket that survives
 * connection loss: it logs on, sends heartbeats, notices a dead server,
 * reconnects with backoff and logs on again.
 */
export declare class EsfClient extends EventTarget {
  constructor(url: string, options: EsfClientOptions);
  readonly url: string;
  readonly userId: string;
  readonly clientType: number;
  readonly wire: WireConfig;
  /** The current LogonResponse, once logged on. */
  readonly logonResponse: LogonResponse | null;
  /** Answers dropped because they came from another party than the one asked. */
  readonly refusedAnswers: number;
  /** Pings from other users left unanswered while the server was not reading. */
  readonly pingsUnanswered: number;
  /** The bound on the answers written while the server reads nothing (the maxBufferedAmount option). */
  readonly maxBufferedAmount: number;
  /** The highest ID of a stored message handled; set it before logon() to skip those handled before a reload. */
  offlineMark: number;
  /** Whether a session is logged on now. */
  readonly loggedOn: boolean;
  /** Where the client is in its life; each change is a "statechange" event. */
  readonly state: ClientState;
  /** How many application messages wait for the re-logon. */
  readonly queued: number;
  /** Bytes queued in the WebSocket, not yet sent. */
  readonly bufferedAmount: number;

  addEventListener<K extends keyof EsfClientEventMap>(
    type: K, listener: (this: EsfClient, event: EsfClientEventMap[K]) => unknown,
    options?: boolean | AddEventListenerOptions): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof EsfClientEventMap>(
    type: K, listener: (this: EsfClient, event: EsfClientEventMap[K]) => unknown,
    options?: boolean | EventListenerOptions): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions): void;

  /** Connect and log on; later reconnects log on again by themselves. Rejects with LogonFailed or NotConnected. */
  logon(): Promise<LogonResponse>;
  /** Leave gracefully (Logoff, then close); no reconnect. */
  logoff(): void;
  /** Close; no reconnect. */
  close(): void;

  /** One-way message to a user (every device, or `clientType`) or to the server ("_0"): "sent", or "queued" while reconnecting with a queue. Throws NotConnected. */
  send(userId: string, informationType: number, payload?: Payload, options?: { clientType?: number }): "sent" | "queued";
  /** Ask a user's client (or the server, "_0"): the answer's payload. */
  query(userId: string, informationType: number, payload?: Payload, options?: { timeout?: number; clientType?: number }): Promise<Uint8Array>;
  /** Resolves with "delivered" once the receiver has handled it, or "stored" once the server has kept it for a receiver who is offline. */
  sendCertainly(userId: string, informationType: number, payload?: Payload, options?: { timeout?: number; clientType?: number }): Promise<"delivered" | "stored">;
  /** Broadcast to a group's online members (or "*"); resolves once the server has fanned it out. */
  broadcast(groupId: string, informationType: number, payload?: Payload, options?: { timeout?: number }): Promise<void>;

  /** At most `limit` IDs (100000); a page that brings no new ID ends the list, whatever total the server claims. */
  getAllOnlineUsers(options?: { limit?: number }): Promise<string[]>;
  isUserOnline(userId: string): Promise<boolean>;
  queryOnlines(userIds: Iterable<string>): Promise<Map<string, boolean>>;
  /** The ClientTypes of this user's devices online now, this one included. */
  getMyDevices(): Promise<number[]>;
  /** This client's address as the server sees it, "host:port". */
  getMyIPE(): Promise<string>;
  /** Round trip to the server, in ms. */
  ping(options?: { timeout?: number }): Promise<number>;
  /** Round trip to another user's client, in ms. */
  pingUser(userId: string, options?: { timeout?: number }): Promise<number>;
  /** Rejects with RequestError(NOT_AUTHORIZED) when refused. */
  kickOut(userId: string, reason?: string): Promise<void>;
}
