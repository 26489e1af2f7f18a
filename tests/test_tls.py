"""
TLS: an esf server on an C{ssl:} endpoint, with a self-signed certificate
made at test time, and clients that trust it (or do not).

The in-process tests run the server (L{ServerService}) and L{ClientEngine}s
on the real reactor; the last one runs C{twistd esf --port ssl:...} and
logs on with the raw-socket client over Python's C{ssl} module.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl

import pytest
import pytest_twisted
import rawclient as rc
from _helpers import LogCapture
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    quoteStringArgument,
    wrapClientTLS,
)
from twisted.internet.ssl import Certificate, CertificateOptions, optionsForClientTLS

from esf import ClientEngine, ServerConfig, ServerEngine, ServerService

# A deprecation warning from the TLS stack fails these tests rather than
# scroll by.
pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning")


def make_certificate(directory, hostname="localhost"):
    """
    A self-signed certificate for C{hostname} and 127.0.0.1, and its key,
    written as PEM files; return C{(cert_path, key_path, cert_pem)}.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return cert_path, key_path, cert_pem


def ssl_endpoint_string(cert_path, key_path, port=0):
    return (
        f"ssl:{port}:interface=127.0.0.1"
        f":privateKey={quoteStringArgument(str(key_path))}"
        f":certKey={quoteStringArgument(str(cert_path))}"
    )


@pytest.fixture
def certificate(tmp_path):
    return make_certificate(tmp_path)


@pytest.fixture
def tls_server(certificate):
    """
    An engine listening on TLS in this process: C{(engine, port)}.
    """
    from twisted.internet import reactor

    cert_path, key_path, _ = certificate
    engine = ServerEngine(ServerConfig(logon_timeout=2), clock=reactor)
    # The key and certificate go to Twisted as cryptography objects: the
    # ssl: endpoint string would hand pyOpenSSL its own (deprecated) ones.
    options = CertificateOptions(
        privateKey=serialization.load_pem_private_key(key_path.read_bytes(), None),
        certificate=x509.load_pem_x509_certificate(cert_path.read_bytes()),
    )
    service = ServerService(engine, SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1"))
    service.startService()
    yield engine, service.port.getHost().port
    pytest_twisted.blockon(service.stopService())
    assert service.port is None


def tls_client(port, cert_pem, user, trust=True, **kwargs):
    from twisted.internet import reactor

    if trust:
        options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(cert_pem))
    else:
        options = optionsForClientTLS("localhost")  # the platform's roots only
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5))
    return ClientEngine(
        endpoint,
        user,
        "pw",
        clock=reactor,
        request_timeout=5,
        retry_policy=lambda n: 0.2,
        **kwargs,
    )


def with_timeout(d, seconds=10):
    from twisted.internet import reactor

    return d.addTimeout(seconds, reactor)


@pytest_twisted.inlineCallbacks
def test_logon_and_relay_over_tls(tls_server, certificate):
    engine, port = tls_server
    alice = tls_client(port, certificate[2], "alice")
    bob = tls_client(port, certificate[2], "bob")
    received = defer.Deferred()
    bob.information_received.subscribe(lambda *args: received.called or received.callback(args))
    try:
        response = yield with_timeout(alice.logon())
        assert response.succeeded
        yield with_timeout(bob.logon())
        assert engine.user_manager.get_online_user_list() == ["alice", "bob"]
        assert (yield with_timeout(alice.is_user_online("bob"))) is True
        rtt = yield with_timeout(alice.ping())
        assert rtt >= 0
        alice.send("bob", 42, b"over TLS")
        sender, _, information_type, payload = yield with_timeout(received)
        assert (sender, information_type, payload) == ("alice", 42, b"over TLS")
        address = yield with_timeout(alice.get_my_ipe())
        assert address.startswith("127.0.0.1:")
    finally:
        # logoff(), not close(): see test_close_over_tls_is_prompt.
        yield with_timeout(alice.logoff())
        yield with_timeout(bob.logoff())
    assert engine.user_manager.get_online_user_list() == []


@pytest_twisted.inlineCallbacks
def test_close_over_tls_is_prompt(tls_server, certificate):
    engine, port = tls_server
    alice = tls_client(port, certificate[2], "alice")
    yield with_timeout(alice.logon())
    try:
        yield with_timeout(alice.close(), 3)
    finally:
        online = engine.user_manager.is_user_online("alice")
        # Let the server end the connection so that the fixture stops fast.
        engine.kick_out("alice", "test over")
    assert not online


@pytest_twisted.inlineCallbacks
def test_a_client_that_does_not_trust_the_certificate_cannot_log_on(tls_server, certificate):
    engine, port = tls_server
    logs = LogCapture().start()
    mallory = tls_client(port, certificate[2], "mallory", trust=False)
    try:
        # The logon fails, and the error says the connection was lost and why.
        with pytest.raises(Exception) as info:
            yield with_timeout(mallory.logon())
        assert "certificate verify failed" in str(info.value)
        assert not engine.user_manager.is_user_online("mallory")
        # The server logs no failure for a failed handshake.
        assert not logs.failures()
    finally:
        logs.stop()
        yield mallory.close()


@pytest_twisted.inlineCallbacks
def test_plaintext_on_the_tls_port_goes_nowhere(tls_server, certificate):
    """
    A client speaking plain ESF to the TLS port: the handshake fails, the
    connection closes, the server logs no failure and keeps serving.
    """
    from twisted.internet import reactor, threads

    engine, port = tls_server
    logs = LogCapture().start()

    def plain():
        client = rc.connect(port)
        try:
            client.logon("eve", "pw")
        except (AssertionError, TimeoutError, OSError):
            return "refused"
        finally:
            client.close()
        return "logged on"

    try:
        outcome = yield with_timeout(threads.deferToThread(plain))
        assert outcome == "refused"
        assert not engine.user_manager.is_user_online("eve")
        alice = tls_client(port, certificate[2], "alice")
        yield with_timeout(alice.logon())
        yield with_timeout(alice.logoff())
        assert not logs.failures()
    finally:
        logs.stop()
    del reactor


@pytest.mark.e2e
def test_twistd_on_an_ssl_port(tmp_path, certificate):
    from test_e2e import ServerProcess

    cert_path, key_path, cert_pem = certificate
    server = ServerProcess(
        tmp_path / "tls.log",
        ["--auth", "memory:alice:pa"],
        port=ssl_endpoint_string(cert_path, key_path),
    )
    try:
        server.wait_listening()
        context = ssl.create_default_context(cadata=cert_pem.decode("ascii"))
        sock = context.wrap_socket(
            socket.create_connection(("127.0.0.1", server.port), timeout=5),
            server_hostname="localhost",
        )
        client = rc.Client(sock)
        try:
            assert client.logon("alice", "pa")["result"] == 0
            client.send(rc.PING, dest=rc.SERVER, msg_id=3)
            header, _ = client.recv_until(rc.PING_ACK)
            assert header["message_id"] == 3
        finally:
            client.close()
    finally:
        server.stop()
    assert "Traceback" not in server.log()
