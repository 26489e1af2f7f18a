"""
The dashboard in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium) against a real C{twistd esf}: the
token asked once, the online count, the sessions table and its search, and
a kick whose reason reaches the client; without a token, the same page
only reading.  And what a page on another site, or under a rebound name,
gets from the API in that browser: nothing.

Skipped with a loud reason where Chromium is missing; under CI it fails
instead (L{_real_parts.missing}).  C{ESF_DASHBOARD_SCREENSHOT=PATH} saves the
screenshot shown in docs/operations.md.
"""

from __future__ import annotations

import http.server
import os
import re
import struct
import threading
import time
import zlib

import pytest
import rawclient as rc
from _real_parts import missing, need_program
from test_admin_e2e import TOKEN, Ops, token_file
from test_e2e import start_server

pytestmark = pytest.mark.e2e

INSTALL = ".ci/run installs it: apt-get install chromium chromium-driver"
REBOUND = "rebind.evil.example"


@pytest.fixture
def browser(tmp_path):
    chromium = need_program("chromium", f"the dashboard test cannot run ({INSTALL})")
    chromedriver = need_program("chromedriver", f"the dashboard test cannot run ({INSTALL})")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:  # pragma: no cover - a test extra
        missing("the selenium package is not installed (pip install '.[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1200,900", f"--user-data-dir={tmp_path / 'profile'}",
        # DNS rebinding without DNS: the attacker's name resolves to loopback.
        f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


@pytest.fixture
def ops(tmp_path):
    server = start_server(
        tmp_path / "server.log",
        [
            "--auth", "memory:alice:pa:bob:pb:<b>x</b>:px:carol:pc:dave:pd:erin:pe",
            "--admin-api", "tcp:0:interface=127.0.0.1",
            "--admin-token-file", str(token_file(tmp_path)),
        ],
    )  # fmt: skip
    yield Ops(server, None)
    server.stop()


@pytest.fixture
def open_ops(tmp_path):
    """The documented default: loopback, no token."""
    server = start_server(
        tmp_path / "server.log",
        ["--auth", "memory:alice:pa:bob:pb", "--admin-api", "tcp:0:interface=127.0.0.1"],
    )
    yield Ops(server, None)
    server.stop()


def wait(driver, condition, timeout=10.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = condition(driver)
        except Exception:  # the page is still changing
            result = None
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def rows(driver):
    from selenium.webdriver.common.by import By

    return [
        [cell.text for cell in row.find_elements(By.CSS_SELECTOR, "td")[:3]]
        for row in driver.find_elements(By.CSS_SELECTOR, "#sessions tbody tr")
    ]


def test_dashboard(browser, ops):
    from selenium.webdriver.common.by import By

    made = []
    try:
        for user, password, kind in [
            ("alice", "pa", 5),
            ("alice", "pa", 0),
            ("bob", "pb", 4),
            ("<b>x</b>", "px", 0),
        ]:
            client = rc.connect(ops.server.port)
            made.append(client)
            assert client.logon(user, password, kind)["result"] == 0
        alice_phone = made[0]

        browser.get(ops.admin + "/dashboard")
        # No token yet: the API answers 401 and the page asks for one.
        token = wait(
            browser,
            lambda d: (
                d.find_element(By.ID, "token").is_displayed() and d.find_element(By.ID, "token")
            ),
            what="the token form",
        )
        assert not browser.find_element(By.ID, "main").is_displayed()
        # The header says why nothing shows, not that it is connecting.
        server = browser.find_element(By.ID, "server").text
        assert "connecting" not in server and "signed out" in server, server
        token.send_keys("wrong-token-wrong-token")
        browser.find_element(By.ID, "login-button").click()
        wait(
            browser,
            lambda d: "refused" in d.find_element(By.ID, "login-error").text,
            what="the refusal",
        )
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "login-button").click()

        wait(
            browser,
            lambda d: d.find_element(By.ID, "users-online").text == "3",
            what="3 users online",
        )
        assert browser.find_element(By.ID, "devices-online").text == "4"
        wait(browser, lambda d: len(rows(d)) == 4, what="4 sessions")
        table = rows(browser)
        assert table[0][:2] == ["<b>x</b>", "dotnet"]  # shown as text, not markup
        assert browser.find_elements(By.CSS_SELECTOR, "#sessions tbody b") == []
        assert [r[:2] for r in table[1:]] == [
            ["alice", "android"],
            ["alice", "dotnet"],
            ["bob", "ios"],
        ]
        wait(browser, lambda d: len(d.find_element(By.ID, "chart-users").get_attribute("points").split()) >= 2,
             what="two points on the chart")  # fmt: skip
        check_axes(browser, peak=4)

        # The chart follows the count as users come (one poll every 2 s).
        for count, user in enumerate(["carol", "dave", "erin"], start=4):
            client = rc.connect(ops.server.port)
            made.append(client)
            assert client.logon(user, "p" + user[0], 4)["result"] == 0
            wait(
                browser,
                lambda d, count=count: d.find_element(By.ID, "users-online").text == str(count),
                what=f"{count} users",
            )
        wait(browser, lambda d: len(rows(d)) == 7, what="7 sessions")
        if os.environ.get("ESF_DASHBOARD_SCREENSHOT"):
            browser.save_screenshot(os.environ["ESF_DASHBOARD_SCREENSHOT"])
        for client in made[4:]:
            client.close()
        wait(
            browser,
            lambda d: d.find_element(By.ID, "users-online").text == "3",
            what="3 users again",
        )

        # The token was asked once: a reload keeps it (sessionStorage), and
        # the chart starts from the server's history.
        browser.refresh()
        wait(browser, lambda d: len(rows(d)) == 4, what="the table after a reload")
        assert not browser.find_element(By.ID, "login").is_displayed()
        assert len(browser.find_element(By.ID, "chart-users").get_attribute("points").split()) >= 1

        browser.find_element(By.ID, "search").send_keys("ali")
        wait(browser, lambda d: [r[0] for r in rows(d)] == ["alice", "alice"], what="the search")

        (phone_row,) = [
            row for row in browser.find_elements(By.CSS_SELECTOR, "#sessions tbody tr")
            if row.get_attribute("data-kind") == "5"
        ]  # fmt: skip
        phone_row.find_element(By.CSS_SELECTOR, "button.kick").click()
        reason = wait(
            browser,
            lambda d: (
                d.find_element(By.ID, "kick-reason").is_displayed()
                and d.find_element(By.ID, "kick-reason")
            ),
            what="the kick dialog",
        )
        assert "alice (android)" in browser.find_element(By.ID, "kick-target").text
        reason.send_keys("kicked from the dashboard")
        browser.find_element(By.ID, "kick-confirm").click()

        _header, body = alice_phone.recv_until(rc.KICKED_OUT, timeout=10)
        assert rc.parse_kicked_out(body) == {
            "operator": "#admin",
            "reason": "kicked from the dashboard",
        }
        wait(
            browser,
            lambda d: "kicked alice: 1 device" in d.find_element(By.ID, "status").text,
            what="the kick's result",
        )
        wait(
            browser,
            lambda d: [r[:2] for r in rows(d)] == [["alice", "dotnet"]],
            what="the table without the phone",
        )
        _status, user = ops.call("GET", "/api/users/alice")
        assert [d["kind"] for d in user["devices"]] == ["dotnet"]
    finally:
        for client in made:
            client.close()


def check_axes(browser, peak):
    """
    The chart has axes: counts from 0 at its bottom edge to a top above
    C{peak} at its top edge, and clock times under it from left to right.
    """
    from selenium.webdriver.common.by import By

    chart = browser.find_element(By.ID, "chart").rect
    ys = [(float(e.text), e.rect) for e in browser.find_elements(By.CSS_SELECTOR, "#y-axis span")]
    assert next(v for v, _ in ys) == 0 and ys[-1][0] >= peak and len(ys) >= 2, ys
    for value, rect in ys:
        assert rect["width"] > 0 and rect["x"] + rect["width"] <= chart["x"] + 1, (
            value,
            rect,
            chart,
        )
        middle = rect["y"] + rect["height"] / 2
        expected = chart["y"] + chart["height"] * (1 - value / ys[-1][0])
        assert abs(middle - expected) < 8, (value, middle, expected)
    xs = browser.find_elements(By.CSS_SELECTOR, "#x-axis span")
    assert len(xs) >= 2 and all(re.search(r"\d{1,2}:\d{2}:\d{2}", e.text) for e in xs), [
        e.text for e in xs
    ]
    lefts = [e.rect["x"] for e in xs]
    assert lefts == sorted(lefts) and lefts[0] >= chart["x"] - 1
    assert all(e.rect["y"] >= chart["y"] + chart["height"] - 1 for e in xs)


def png_pixels(png):
    """
    The (r, g, b) of every pixel of an 8-bit RGB or RGBA PNG, as Chromium's
    screenshots are (decoded here: no imaging library is needed).
    """
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    offset, idat = 8, b""
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        kind, body = png[offset + 4 : offset + 8], png[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
        elif kind == b"IDAT":
            idat += body
        offset += 12 + length
    bpp = 4 if color == 6 else 3
    raw, stride = zlib.decompress(idat), width * bpp
    previous, pixels = bytearray(stride), []
    for row in range(height):
        kind, line = (
            raw[row * (stride + 1)],
            bytearray(raw[row * (stride + 1) + 1 : (row + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = previous[i], previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        pixels += [tuple(line[i : i + 3]) for i in range(0, stride, bpp)]
        previous = line
    return pixels


USERS_COLOR, DEVICES_COLOR = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)


def near(pixel, color):
    return sum((p - c) ** 2 for p, c in zip(pixel, color)) < 40**2


def test_equal_counts_show_both_lines(browser, open_ops):
    """
    One user on one device: the users' and the devices' counts are equal
    all along, and both lines show (neither hides the other).
    """
    from selenium.webdriver.common.by import By

    alice = rc.connect(open_ops.server.port)
    try:
        assert alice.logon("alice", "pa", 5)["result"] == 0
        browser.get(open_ops.admin + "/dashboard")
        wait(
            browser,
            lambda d: d.find_element(By.ID, "users-online").text == "1",
            what="1 user online",
        )
        wait(browser, lambda d: len(d.find_element(By.ID, "chart-users").get_attribute("points").split()) >= 4,
             what="points on the chart")  # fmt: skip
        users = browser.find_element(By.ID, "chart-users").get_attribute("points")
        assert users == browser.find_element(By.ID, "chart-devices").get_attribute(
            "points"
        )  # equal
        pixels = png_pixels(browser.find_element(By.ID, "chart").screenshot_as_png)
        blue = sum(near(p, USERS_COLOR) for p in pixels)
        orange = sum(near(p, DEVICES_COLOR) for p in pixels)
        assert blue > 200 and orange > 200, (blue, orange)
        check_axes(browser, peak=1)
    finally:
        alice.close()


def test_dashboard_without_a_token_only_reads(browser, open_ops):
    from selenium.webdriver.common.by import By

    alice = rc.connect(open_ops.server.port)
    try:
        assert alice.logon("alice", "pa", 5)["result"] == 0
        browser.get(open_ops.admin + "/dashboard")
        wait(browser, lambda d: len(rows(d)) == 1, what="the session, without a token asked")
        assert not browser.find_element(By.ID, "login").is_displayed()
        wait(
            browser,
            lambda d: d.find_element(By.ID, "read-only").is_displayed(),
            what="the read-only note",
        )
        button = browser.find_element(By.CSS_SELECTOR, "#sessions tbody button.kick")
        wait(browser, lambda d: not button.is_enabled(), what="the Kick button disabled")
        assert "--admin-token-file" in button.get_attribute("title")
    finally:
        alice.close()


class _EvilPages(http.server.BaseHTTPRequestHandler):
    """Another site: one page that tries the API on C{self.server.admin}."""

    def do_GET(self):
        admin = self.server.admin
        page = f"""<!doctype html><title>cute cats</title>
<iframe name="sink"></iframe>
<form id="form" method="post" enctype="text/plain" target="sink" action="{admin}/api/broadcast">
<input name='{{"text": "Your password expired: evil.example/login ' value='"}}'></form>
<script>
fetch("{admin}/api/users/alice/kick", {{method: "POST", mode: "no-cors",
  headers: {{"Content-Type": "text/plain"}}, body: '{{"reason": "you were hacked"}}'}})
  .finally(() => {{ document.getElementById("form").submit(); document.title = "sent"; }});
</script>""".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *args):
        pass


@pytest.fixture
def evil_site(open_ops):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EvilPages)
    server.admin = open_ops.admin
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def refusals(ops, check, count, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [
            line for line in ops.server.log().splitlines()
            if "admin API: refused" in line and f"({check}: " in line
        ]  # fmt: skip
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"{count} refusals were not logged:\n{ops.server.log()}")


def test_a_page_on_another_site_cannot_kick_or_forge_a_notice(browser, open_ops, evil_site):
    alice, bob = rc.connect(open_ops.server.port), rc.connect(open_ops.server.port)
    try:
        assert alice.logon("alice", "pa", 5)["result"] == 0
        assert bob.logon("bob", "pb", 0)["result"] == 0
        browser.get(evil_site + "/")
        wait(browser, lambda d: d.title == "sent", what="the page's requests")
        with pytest.raises(TimeoutError):  # no notice, no kick
            bob.recv_until(202, timeout=2)
        with pytest.raises(TimeoutError):
            alice.recv_until(rc.KICKED_OUT, timeout=0.1)
        status, user = open_ops.call("GET", "/api/users/alice", token=None)
        assert status == 200 and [d["kind"] for d in user["devices"]] == ["android"]
        # Both requests reached the server, and were refused for their origin.
        found = refusals(open_ops, "origin", 2)
        assert all(f"(origin: {evil_site})" in line for line in found), found
        assert {"POST /api/users/alice/kick", "POST /api/broadcast"} == {
            line.split("refused ")[1].split(" from")[0] for line in found
        }
    finally:
        alice.close()
        bob.close()


def test_a_rebound_name_cannot_read_the_api(browser, open_ops):
    alice = rc.connect(open_ops.server.port)
    try:
        assert alice.logon("alice", "pa", 5)["result"] == 0
        port = open_ops.admin.rsplit(":", 1)[1]
        browser.get(f"http://{REBOUND}:{port}/api/sessions")
        text = browser.find_element("tag name", "body").text
        assert "host_not_allowed" in text and "alice" not in text
        (line,) = refusals(open_ops, "host", 1)
        assert f"(host: {REBOUND}:{port})" in line
        # The same browser at the same port by its own name reads.
        browser.get(open_ops.admin + "/api/sessions")
        assert '"user_id":"alice"' in browser.find_element("tag name", "body").text
    finally:
        alice.close()
