"""
The logon pipeline: from a Logon frame to a bound session or a refusal::

    Logon arrives -> policy.admit -> handler.verify_user -> relogon mode
      -> policy.settle -> presence.claim -> push the old holder out
      -> bind (Logon reply)

The decisions are the policy's (L{esf.server._policy}); this part carries them
out: it answers, fires the user manager's events and binds or ends the
session.
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any, Protocol

from twisted.logger import Logger
from twisted.python.failure import Failure

from esf.wire import _messages as m
from esf.wire._events import Event, call_then
from esf.wire._frames import (
    ClientType,
    DisconnectedType,
    Frame,
    LogonResult,
    MessageType,
    as_client_type,
)

from ._config import EngineBasics, RelogonMode, SessionPhase, UserData
from ._counters import Count
from ._policy import (
    HolderUnconfirmed,
    Ignore,
    LogonPolicy,
    LogonRefused,
    PresenceUnavailable,
    Refuse,
    TakeoverRefused,
)
from ._presence import Claim

if TYPE_CHECKING:
    from esf.interfaces import IBasicHandler, IPresence, IRelogonPolicy

    from ._presence import UserManager
    from ._session import Session

__all__ = ["Logons", "LogonEngine", "LogonRecord"]

log = Logger(namespace="esf.server")


class LogonRecord:
    """
    A record of every logon that stays cheap in a logon storm.

    A logon is logged at once when the last event is C{interval} seconds
    old; otherwise it waits with the others that come meanwhile, and they
    are logged together when the interval is up or C{limit} of them wait,
    whichever comes first.  Each event is C{esf_event="logged_on"} with
    C{logons}, a list of C{(user_id, client_type, address, time)}, and
    C{count}.  (Formatting a log line costs more than the rest of a logon;
    one line per batch keeps the record of every logon at a fraction of
    that cost.)

    The log stays in causal order: whatever is logged about a user whose
    logon waits (its session's end, a push-out, a kick by or of it) calls
    L{flush_for} first, which logs the waiting logons before it.

    C{logged_on} fires for each logon at once, as it is added (the audit
    log writes its record from it before the Logon reply goes out).
    """

    def __init__(self, clock: Any, interval: float = 1.0, limit: int = 100):
        self.clock = clock
        self.interval = interval
        self.limit = limit
        #: Fires with C{(user_id, client_type, address, time)} for each logon.
        self.logged_on = Event("logged_on")
        self._logons: list[tuple[str, int, str, float]] = []
        self._waiting: set[str] = set()  # the user IDs in _logons
        self._flushed = -interval  # when the last event was logged
        self._timer: Any = None  # armed only while logons wait

    def add(self, user_id: str, client_type: int, address: str, at: float) -> None:
        self.logged_on.fire(user_id, client_type, address, at)
        logons = self._logons
        logons.append((user_id, client_type, address, at))
        self._waiting.add(user_id)
        if self._timer is not None:
            if len(logons) >= self.limit:
                self.flush()
            return
        now = self.clock.seconds()
        wait = self._flushed + self.interval - now
        if wait <= 0:
            self.flush()
        else:
            self._timer = self.clock.callLater(wait, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.flush()

    def flush_for(self, *user_ids: str | None) -> None:
        """
        Something is about to be logged about C{user_ids}: first log the
        waiting logons if one of them is among them.
        """
        waiting = self._waiting
        if waiting and any(u in waiting for u in user_ids):
            self.flush()

    def flush(self) -> None:
        """
        Log the logons gathered so far (the engine calls this as it stops).
        """
        logons, self._logons = self._logons, []
        if not logons:
            return
        self._waiting.clear()
        self._flushed = self.clock.seconds()
        devices = ", ".join(f"{u}/{c} from {a}" for u, c, a, _ in logons)
        text = "logged on: {devices}" if len(logons) == 1 else "logged on ({count}): {devices}"
        log.info(text, esf_event="logged_on", logons=logons, count=len(logons), devices=devices)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()


def kind_name(client_type: int) -> str:
    """
    C{"ANDROID (5)"}, or C{"42"} for a kind without a name.
    """
    kind = as_client_type(client_type)
    return f"{kind.name} ({int(kind)})" if isinstance(kind, ClientType) else str(kind)


class _Delivery(Protocol):
    def logged_on(self, session: Session) -> None: ...


class LogonEngine(EngineBasics, Protocol):
    """
    What the logon pipeline needs of the engine: the settings, the clock
    and counters, the application's handler and relogon policy, presence
    (to claim and release devices), the user manager's events, the offline
    part (stored messages go out first at a logon) and whether the server
    is stopping.
    """

    @property
    def node_id(self) -> str: ...

    @property
    def handler(self) -> IBasicHandler: ...

    @property
    def relogon_policy(self) -> IRelogonPolicy | None: ...

    @property
    def presence(self) -> IPresence: ...

    @property
    def user_manager(self) -> UserManager: ...

    @property
    def offline(self) -> _Delivery | None: ...

    @property
    def stopping(self) -> bool: ...


def relogon_mode_of(engine: LogonEngine, user_id: str, client_type: int) -> RelogonMode | None:
    """
    The relogon mode of C{user_id}'s device C{client_type}: the
    application's L{esf.interfaces.IRelogonPolicy} decides, or else the
    server's C{relogon_mode}.  C{None} when the application's answer is
    an exception or not a L{RelogonMode} (logged): the logon is refused,
    as when C{verify_user} raises.
    """
    policy = engine.relogon_policy
    if policy is None:
        return engine.config.relogon_mode
    kind = as_client_type(client_type)
    try:
        mode = policy.relogon_mode(user_id, kind)
        if not isinstance(mode, RelogonMode):
            raise TypeError(f"relogon_mode answered {mode!r}, not a RelogonMode")
    except Exception:
        log.failure(
            "relogon_mode failed for {user_id}/{client_type}",
            user_id=user_id, client_type=client_type, esf_event="relogon_mode_failed",
        )  # fmt: skip
        return None
    return mode


class Logons:
    """
    Carries Logons through for C{engine} (L{LogonEngine}).
    """

    def __init__(self, engine: LogonEngine):
        self.engine = engine
        self.policy = LogonPolicy(engine.config)
        self.record = LogonRecord(engine.clock)
        #: The reply to every successful Logon (the engine's configuration
        #: does not change), encoded once.
        self._succeeded = self._encode_reply(LogonResult.SUCCEED, "")
        # (Session IDs, node/order, are never used twice: not even by a process
        # started again with the same --node-id, counting from its start in µs.)
        self._order = itertools.count(time.time_ns() // 1000)

    # -- before logon ----------------------------------------------------------

    def frame_received(self, session: Session, frame: Frame) -> None:
        """
        A frame from a session that has not logged on.
        """
        if frame.message_type != MessageType.LOGON:
            session.end(
                DisconnectedType.NOT_LOGGED_ON,
                f"message type {frame.message_type} before logon; log on first",
            )
            return
        if session.state is not SessionPhase.AWAITING_LOGON:
            session.end(
                DisconnectedType.INVALID_MESSAGE, "a second Logon while the first is verified"
            )
            return
        try:
            logon = m.Logon.decode(frame.body)
        except m.BadRequest as e:
            # Before logon a Logon body that does not parse is far more
            # likely a header of another length than a client bug: say so.
            wire = self.engine.config.wire
            session.end(
                DisconnectedType.INVALID_MESSAGE,
                f"malformed Logon body ({e}); this server expects "
                f"{wire.header_length}-byte headers, max UserID length "
                f"{wire.max_userid_length}: do both sides agree?",
            )
            return
        self._admit(session, frame, logon)

    def timed_out(self, session: Session) -> None:
        """
        C{session} has not logged on within the logon timeout: end it.
        """
        session.logon_timer = None
        config = self.engine.config
        text = f"no logon within {config.logon_timeout:g} s"
        if session.decoder.buffered:
            # Bytes that never made a whole frame: most likely a client whose
            # header is shorter than this server's.  Say which one we expect.
            wire = config.wire
            text += (
                f"; {session.decoder.buffered} bytes arrived that are not a whole frame "
                f"(this server expects {wire.header_length}-byte headers, max UserID "
                f"length {wire.max_userid_length})"
            )
        session.end(DisconnectedType.LOGON_TIMEOUT, text)

    def _admit(self, session: Session, frame: Frame, logon: m.Logon) -> None:
        engine = self.engine
        session.user_id = frame.user_id
        session.client_type = frame.client_type
        session.logon_order = next(self._order)
        host = session.address.rpartition(":")[0]
        decision = self.policy.admit(
            frame.user_id, frame.client_type, logon, host, engine.clock.seconds()
        )
        if isinstance(decision, Refuse):
            self._refuse(session, frame, decision)
            return
        session.state = SessionPhase.LOGGING_ON
        call_then(
            engine.handler.verify_user,
            (
                logon.system_token,
                frame.user_id,
                logon.password,
                as_client_type(frame.client_type),
                session.address,
            ),
            self._verified,
            session,
            frame,
        )

    def _verified(self, outcome: Any, session: Session, frame: Frame) -> None:
        if session.state is not SessionPhase.LOGGING_ON:
            return  # the connection went away meanwhile
        if isinstance(outcome, Failure):
            refused = outcome.value
            if isinstance(refused, LogonRefused):
                cause = refused.cause
            else:
                log.failure("verify_user raised for {user_id}", outcome, user_id=session.user_id)
                cause = "logon verification failed"
            self._refuse(session, frame, Refuse(LogonResult.FAILED, cause))
            return
        if not outcome:
            self._refuse(session, frame, Refuse(LogonResult.FAILED, "invalid user ID or password"))
            return
        engine = self.engine
        user_id, client_type = session.user_id, session.client_type
        assert user_id is not None and client_type is not None  # set by _admit
        mode = relogon_mode_of(engine, user_id, client_type)
        if mode is None:
            self._refuse(session, frame, Refuse(LogonResult.FAILED, "logon verification failed"))
            return
        holder = engine.presence.get(user_id, client_type)
        decision = self.policy.settle(
            user_id,
            client_type,
            session.logon_order,
            holder,
            engine.clock.seconds(),
            mode,
        )
        if isinstance(decision, Refuse):
            self._refuse(session, frame, decision)
            return
        if isinstance(decision, Ignore) and decision.holder.node == engine.node_id:
            self._ignore(session, frame, decision.holder)
            return
        # (A holder on another node is Redis's to judge: its node may be
        # dead or paused, its lease expired, and then the new logon takes
        # the device even with IGNORE_NEW rather than wait for the reap.)
        # The mode travels with the claim: a registry shared by nodes
        # settles a holder its mirror did not show yet by it.
        d = engine.presence.claim(session, mode is RelogonMode.REPLACE_OLD)
        d.addCallback(self._claimed, session, frame)
        d.addErrback(self._claim_failed, session, frame)

    def _claimed(self, claim: Claim, session: Session, frame: Frame) -> None:
        if not claim.won:
            self._ignore(session, frame, claim.previous)
            return
        if session.state is not SessionPhase.LOGGING_ON:
            # Gone while the claim was made: give the device back.
            self.engine.presence.release(session)
            return
        if claim.previous is not None:
            self._push_out(claim.previous, session)
        self._bind(session, frame, handover=claim.previous is not None)

    def _claim_failed(self, failure: Failure, session: Session, frame: Frame) -> None:
        counter = None
        if failure.check(TakeoverRefused):
            # The presence's own, cluster-wide flapping guard.
            cause, counter = str(failure.value), Count.TAKEOVERS_REFUSED
        elif failure.check(HolderUnconfirmed):
            cause = str(failure.value)
        elif failure.check(PresenceUnavailable):
            cause = "the cluster cannot register logons now (its Redis did not answer); try later"
        else:
            log.failure("claiming {session!r} failed", failure, session=session)
            cause = "the server cannot register logons now; try later"
        self._refuse(session, frame, Refuse(LogonResult.BUSY, cause, counter=counter))

    # -- outcomes ----------------------------------------------------------------

    def _refuse(self, session: Session, frame: Frame, refusal: Refuse) -> None:
        engine = self.engine
        if refusal.counter is not None:
            engine.counters[refusal.counter] += 1
            if refusal.counter == "takeovers_refused":
                log.warn(
                    "{user_id}/{client_type} flaps between connections: refused for {cooldown} s",
                    esf_event="takeover_flapping",
                    user_id=session.user_id,
                    client_type=session.client_type,
                    cooldown=engine.config.takeover_cooldown,
                )
        session.reply(frame, self.reply(refusal.result, refusal.cause))
        session.end(refusal.reason, f"logon refused ({refusal.result.name}): {refusal.cause}")

    def _ignore(self, session: Session, frame: Frame, holder: Any) -> None:
        assert session.client_type is not None  # set by _admit
        self.engine.user_manager.new_connection_ignored.fire(
            session.user_id, as_client_type(session.client_type), session.address
        )
        address = holder.user_data.address if holder.user_data is not None else "elsewhere"
        self._refuse(
            session,
            frame,
            Refuse(
                LogonResult.HAD_LOGGED_ON,
                f"{session.user_id} is already logged on with this device from {address}",
                DisconnectedType.NEW_CONNECTION_IGNORED,
            ),
        )

    def reply(self, result: LogonResult, cause: str = "") -> bytes:
        """
        A Logon reply body.
        """
        if result is LogonResult.SUCCEED and not cause:
            return self._succeeded
        return self._encode_reply(result, cause)

    def _encode_reply(self, result: LogonResult, cause: str) -> bytes:
        config = self.engine.config
        return m.LogonReply(
            result,
            cause[:1000],
            config.heartbeat_interval,
            config.heartbeat_timeout,
            config.wire.max_message_size,
        ).encode()

    def _push_out(self, old: Any, new: Session) -> None:
        assert new.client_type is not None  # set by _admit
        self.record.flush_for(old.user_id)
        cause = (
            f"{old.user_id} logged on again with the same device "
            f"({kind_name(new.client_type)}) from {new.address}"
        )
        old.push_out(new.address, cause)

    def _bind(self, session: Session, frame: Frame, handover: bool) -> None:
        engine = self.engine
        config = engine.config
        assert session.user_id is not None and session.client_type is not None  # set by _admit
        session.state = SessionPhase.LOGGED_ON
        if session.logon_timer is not None:
            session.logon_timer.cancel()
            session.logon_timer = None
        session.decoder.max_message_size = config.wire.max_message_size
        session.last_active = engine.clock.seconds()
        session.active = False
        session.user_data = UserData(
            session.user_id,
            as_client_type(session.client_type),
            session.address,
            session.last_active,
        )
        # Recorded (and audited, on disk) before the reply makes it visible.
        self.record.add(session.user_id, session.client_type, session.address, session.last_active)
        session.reply(frame, self.reply(LogonResult.SUCCEED))
        if engine.offline is not None:
            # Stored messages first, then what was relayed meanwhile.
            engine.offline.logged_on(session)
        else:
            session.release_held()
        um = engine.user_manager
        devices = engine.presence.devices(session.user_id)
        if not handover:
            self._tell_other_devices(session, MessageType.MY_DEVICE_ONLINE)
        um.device_connected.fire(session.user_data)
        # A subscriber may end the session at once (a kick, say); its end has
        # then been reported, and reporting it online now would be false.
        first = len(devices) == 1
        if first and not handover and session.logged_on:
            um.user_connected.fire(session.user_data)
            if session.logged_on:
                um.user_count_changed.fire(um.user_count)

    def unbind(self, session: Session, reason: DisconnectedType) -> None:
        """
        A logged-on session ended: release its device and tell who needs to
        know.
        """
        engine = self.engine
        d = engine.presence.release(session)
        d.addCallback(self._released, session, reason)
        d.addErrback(lambda f: log.failure("releasing {session!r} failed", f, session=session))

    def _released(self, last: bool, session: Session, reason: DisconnectedType) -> None:
        engine = self.engine
        um = engine.user_manager
        um.device_disconnected.fire(session.user_data, reason)
        if reason is DisconnectedType.BEING_PUSHED_OUT:
            # The same device of the same user logs on at once: the user
            # never goes offline and the other devices see no change.
            return
        if last:
            um.user_disconnected.fire(session.user_data, reason)
            um.user_count_changed.fire(um.user_count)
        elif not engine.stopping:
            # (When the server stops, every device gets ServerShutdown.)
            self._tell_other_devices(session, MessageType.MY_DEVICE_OFFLINE)

    def _tell_other_devices(self, session: Session, message_type: MessageType) -> None:
        """
        Send C{session}'s user's other devices a MyDeviceOnline/Offline.  A
        session of the same device kind is that device, logged on again (in
        a cluster, briefly listed with it until one of the two is pushed
        out or refused): not another device.
        """
        kind = session.client_type
        assert session.user_id is not None and kind is not None  # logged on
        for other in self.engine.presence.devices(session.user_id):
            if other is not session and other.client_type != kind:
                other.notify(message_type, client_type=kind)
