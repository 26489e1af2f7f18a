"""
The chat example's web page in real headless Chromium (driven by Selenium
through Debian's chromedriver) against a real C{twistd esf --websocket ...
--web-demo} process on 127.0.0.1: two pages chat, a page and a desktop
client (an L{esf.ClientEngine} over TCP, through the blocking facade, in a
subprocess) exchange messages, and a third page that logs on as the first
page's user pushes it out, with the notice on screen.  A page lives through
an operator's notice, messages kept for it while it was offline, a shutdown
and a crash of the server (a server of its own, on fixed ports, restarted);
a page of another origin imports esf.js and is refused, and sees why; the
first page of docs/websocket.md is installed with npm and runs as written.

They need C{chromium}, C{chromedriver} and the C{selenium} package; without
them they skip, loudly, except under CI, where they fail (L{_real_parts.missing}).

The last test saves a screenshot of the chat; to refresh the one in the
docs run C{ESF_SCREENSHOT=docs/websocket-chat.png python -m pytest
tests/test_websocket_browser.py}.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from _real_parts import missing, need_program
from test_admin_e2e import TOKEN, token_file
from test_e2e import REPO, ServerProcess, server_env

pytestmark = pytest.mark.e2e

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1000,700",
]
WAIT = 10  # seconds any one thing may take to show


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """
    C{twistd esf} with the chat handler, TCP and WebSocket with the web demo:
    C{(server, tcp_port, web_port)}.
    """
    log = tmp_path_factory.mktemp("browser") / "server.log"
    # The origin of the first page of docs/websocket.md, served by a test.
    allowed = _free_port()
    server = ServerProcess(
        log,
        [
            "--handler",
            "esf.examples.chat:handler",
            "--websocket",
            "tcp:0:interface=127.0.0.1",
            "--web-demo",
            "--websocket-origin",
            f"http://127.0.0.1:{allowed}",
        ],
    )
    server.allowed_port = allowed
    try:
        server.wait_listening()
        server.wait_for_log(r"Site starting on \d+")
        web_port = int(re.search(r"Site starting on (\d+)", server.log()).group(1))
        yield server, server.port, web_port
    finally:
        server.stop()
    assert "Traceback" not in server.log()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = need_program("chromium", "the browser tests cannot run ('.ci/run' installs it)")
    chromedriver = need_program(
        "chromedriver", "the browser tests cannot run ('.ci/run' installs it)"
    )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("the selenium package is not installed (pip install '.[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


class Page:
    """
    One tab of the browser, on the chat page.
    """

    def __init__(self, driver, url):
        from selenium.webdriver.common.by import By

        self.driver = driver
        self.by = By
        driver.switch_to.new_window("tab")
        self.handle = driver.current_window_handle
        driver.get(url)

    def _find(self, element_id):
        self.driver.switch_to.window(self.handle)
        return self.driver.find_element(self.by.ID, element_id)

    def wait(self, condition, what, timeout=WAIT):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver.switch_to.window(self.handle)
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
                lambda _: condition()
            )
        except Exception as e:
            body = self.script("return document.body ? document.body.innerText : ''")
            raise AssertionError(f"{what} within {timeout} s; the page says: {body!r}") from e

    def text(self, element_id):
        return self._find(element_id).text

    def logon(self, user):
        self._find("user").clear()
        self._find("user").send_keys(user)
        self._find("password").clear()
        self._find("password").send_keys("pw")
        self._find("logon").click()
        self.wait(
            lambda: self._find("status").get_attribute("data-state") == "online",
            f"{user} logged on",
        )
        self.wait(lambda: "you are in lobby" in self.text("log"), f"{user} joined the lobby")
        return self

    def script(self, source):
        self.driver.switch_to.window(self.handle)
        return self.driver.execute_script(source)

    def online(self):
        # Read in one go: the page rebuilds the list every few seconds.
        return sorted(
            self.script(
                "return [...document.querySelectorAll('#online li')].map((li) => li.dataset.user)"
            )
        )

    def say(self, text, to="lobby"):
        # Scripted rather than through element handles: the page rebuilds
        # the online list and the menu when someone comes or goes.
        if to != "lobby":
            # Click the name in the online list, as a person does.
            self.wait(lambda: to in self.online(), f"{to} shown online")
            self.script(f"document.querySelector('#online li[data-user=\"{to}\"]').click()")
        else:
            self.script("document.getElementById('to').value = 'lobby'")
        chosen = "return document.getElementById('to').value"
        self.wait(lambda: self.script(chosen) == to, f"{to} chosen")
        self._find("text").send_keys(text)
        self._find("send").click()
        self.wait(lambda: text in self.text("log"), f"my own {text!r} shown")

    def lines(self):
        """
        The chat lines: C{(kind, from, text)}.
        """
        items = self.script(
            "return [...document.querySelectorAll('#log li')].map("
            "(li) => [li.dataset.kind, li.dataset.from || '', li.lastChild.textContent])"
        )
        return [tuple(item) for item in items]

    def wait_line(self, kind, sender, text, timeout=WAIT):
        return self.wait(
            lambda: (kind, sender, text) in self.lines(),
            f"{sender}'s {text!r} ({kind}) shown",
            timeout,
        )

    def tags(self):
        """
        The remarks shown on chat lines, by the line's text.
        """
        items = self.script(
            "return [...document.querySelectorAll('#log li')].map((li) => "
            "[li.lastChild.textContent, (li.querySelector('.tag') || {}).textContent || ''])"
        )
        return dict(items)

    def color(self, kind, text):
        return self.script(
            "return getComputedStyle([...document.querySelectorAll('#log li')].find((li) => "
            f"li.dataset.kind === {json.dumps(kind)} && li.lastChild.textContent === {json.dumps(text)}"
            ")).color"
        )

    def close(self):
        self.driver.switch_to.window(self.handle)
        self.driver.close()
        # The first, blank tab stays open: new tabs are opened from it.
        self.driver.switch_to.window(self.driver.window_handles[0])


@pytest.fixture
def pages(browser, demo):
    made = []

    def page():
        made.append(Page(browser, f"http://127.0.0.1:{demo[2]}/"))
        return made[-1]

    yield page
    for p in made:
        p.close()


DESKTOP = r"""
import json, sys
from esf.client.blocking import BlockingClient

JOIN, SAY, TELL = 1, 3, 6


def out(**fields):
    print(json.dumps(fields), flush=True)


client = BlockingClient("127.0.0.1", int(sys.argv[1]), sys.argv[2], "pw", timeout=10)
client.subscribe(
    "information_received",
    lambda sender, kind, t, payload: out(event="information", sender=sender, client_type=int(kind),
                                         type=t, text=payload.decode()),
)
client.subscribe(
    "broadcast_received",
    lambda sender, group, t, payload: out(event="broadcast", sender=sender, group=group, type=t,
                                          text=payload.decode()),
)
client.logon()
client.send_certainly("_0", JOIN, b"lobby")
out(event="ready")
for line in sys.stdin:
    command = json.loads(line)
    if command["do"] == "tell":
        client.send(command["to"], TELL, command["text"].encode())
    elif command["do"] == "say":
        client.broadcast("lobby", SAY, command["text"].encode())
    else:
        break
    out(event="done", do=command["do"])
client.logoff()
out(event="bye")
"""


class Desktop:
    """
    The desktop user: a L{esf.ClientEngine} over TCP in a subprocess, told
    what to do on its standard input; what it receives comes back as JSON
    lines.
    """

    def __init__(self, port, user):
        self.process = subprocess.Popen(
            [sys.executable, "-c", DESKTOP, str(port), user],
            cwd=REPO,
            env=server_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.events = queue.Queue()
        self.seen = []
        threading.Thread(target=self._read, daemon=True).start()
        self.expect(event="ready")

    def _read(self):
        for line in self.process.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"event": "output", "text": line})

    def expect(self, timeout=WAIT, **fields):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.seen:
                if fields.items() <= event.items():
                    self.seen.remove(event)
                    return event
            try:
                self.seen.append(self.events.get(timeout=max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                pass
        raise AssertionError(f"the desktop client saw no {fields} within {timeout} s: {self.seen}")

    def do(self, **command):
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        self.expect(event="done")

    def stop(self):
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"do": "quit"}) + "\n")
                self.process.stdin.close()
                self.process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(10)
        self.process.stdout.close()


def test_two_pages_chat(pages):
    ann = pages().logon("ann")
    ben = pages().logon("ben")
    ann.wait(lambda: {"ann", "ben"} <= set(ann.online()), "ben shown online to ann")
    ann.say("hello, lobby")
    ben.wait_line("room", "ann", "hello, lobby")
    ben.say("hi ann, just you", to="ann")
    ann.wait_line("private", "ben", "hi ann, just you")
    # The private line went to ann alone, and the room line not back to ann.
    assert ("room", "ann", "hello, lobby") not in ann.lines()
    assert ("room mine", "ann", "hello, lobby") in ann.lines()
    # What ben sent ann alone does not look like what he said to the room.
    ben.wait_line("private mine", "ben", "(to ann) hi ann, just you")
    assert ben.color("private mine", "(to ann) hi ann, just you") != ben.color(
        "room", "hello, lobby"
    ) and ben.color("private mine", "(to ann) hi ann, just you") != ann.color(
        "room mine", "hello, lobby"
    )


def test_a_page_and_a_desktop_client(pages, demo):
    _, tcp_port, _ = demo
    desk = Desktop(tcp_port, "desk")
    try:
        cat = pages().logon("cat")
        cat.wait(lambda: "desk" in cat.online(), "the desktop user shown online")
        # page -> desktop: the room, then a private message
        cat.say("hello from the browser")
        event = desk.expect(event="broadcast", sender="cat")
        assert (event["group"], event["type"], event["text"]) == (
            "lobby",
            3,
            "hello from the browser",
        )
        cat.say("psst, desk", to="desk")
        event = desk.expect(event="information", sender="cat")
        assert (event["type"], event["text"], event["client_type"]) == (6, "psst, desk", 3)
        # desktop -> page
        desk.do(do="tell", to="cat", text="hello cat, from a desktop")
        cat.wait_line("private", "desk", "hello cat, from a desktop")
        desk.do(do="say", text="desk says hi to the room")
        cat.wait_line("room", "desk", "desk says hi to the room")
    finally:
        desk.stop()


def test_a_third_page_pushes_the_first_out(pages, demo, tmp_path):
    server, tcp_port, _ = demo
    desk = Desktop(tcp_port, "dora")
    try:
        dan = pages().logon("dan")
        eve = pages().logon("eve")
        dan.wait(lambda: {"dan", "dora", "eve"} <= set(dan.online()), "everyone shown online")
        dan.say("anyone up for lunch?")
        eve.wait_line("room", "dan", "anyone up for lunch?")
        eve.say("me! noon?")
        desk.do(do="say", text="count me in (from my desktop)")
        dan.wait_line("room", "dora", "count me in (from my desktop)")
        eve.say("see you there, dan", to="dan")
        dan.wait_line("private", "eve", "see you there, dan")

        # A third page logs on as dan: the first is pushed out, and says so.
        again = pages().logon("dan")
        dan.wait(lambda: "pushed out" in dan.text("notice"), "the push-out notice")
        notice = dan.text("notice")
        assert notice.startswith("You were pushed out: ")
        assert "127.0.0.1" in notice  # the cause names where the new logon came from
        dan.wait(lambda: dan.text("status") == "not logged on", "the first page logged off")
        assert not dan._find("send").is_enabled()
        # Nothing stale is left: no online list, and no filled-in form that
        # one click would use to push the other page out in turn.
        assert dan.online() == []
        assert dan._find("user").get_attribute("value") == ""
        assert dan._find("password").get_attribute("value") == ""
        # The new page carries on; the old one stays out (it does not reconnect).
        again.say("back, in a new tab")
        eve.wait_line("room", "dan", "back, in a new tab")
        assert dan._find("notice").is_displayed()

        shot = tmp_path / "websocket-chat.png"
        dan.driver.switch_to.window(dan.handle)
        dan.driver.save_screenshot(str(shot))
        data = shot.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
        target = os.environ.get("ESF_SCREENSHOT")
        if target:
            shutil.copyfile(shot, REPO / target if not Path(target).is_absolute() else target)
    finally:
        desk.stop()
    server.wait_for_log(r"session ended: dan/3 .* BEING_PUSHED_OUT")


_DOC_EXAMPLE = re.compile(r'```html\n<script type="module">\n(.*?)</script>\n```', re.DOTALL)


def test_the_documented_example_runs(browser, demo):
    """
    The JavaScript example of docs/websocket.md, as it is written, against
    the chat server: only its import and its URL are adapted.
    """
    [example] = _DOC_EXAMPLE.findall((REPO / "docs" / "websocket.md").read_text(encoding="utf-8"))
    server, _, web_port = demo
    assert 'import { EsfClient, toText } from "./esf.js";' in example
    assert '"ws://localhost:4531/esf"' in example
    body = (
        example.replace(
            'import { EsfClient, toText } from "./esf.js";',
            'const { EsfClient, toText } = await import("/esf.js");',
        )
        .replace('"ws://localhost:4531/esf"', f'"ws://127.0.0.1:{web_port}/esf"')
        .replace("console.log(", "log(")
    )
    script = (
        "const done = arguments[arguments.length - 1];\n"
        "const lines = [];\n"
        "const log = (...args) => lines.push(args.map(String).join(' '));\n"
        f"(async () => {{\n{body}\n}})().then(() => done({{lines}}), (e) => done({{lines, error: String(e)}}));"
    )
    page = Page(browser, f"http://127.0.0.1:{web_port}/")
    try:
        page.driver.set_script_timeout(WAIT)
        outcome = page.driver.execute_async_script(script)
    finally:
        page.close()
    assert "error" not in outcome, outcome
    lines = outcome["lines"]
    assert lines[0] == "heartbeat every 10 s"
    assert lines[1].startswith("online: ") and "alice" in lines[1].split(" ", 1)[1].split(",")
    assert lines[2] == "echo: ping"
    server.wait_for_log(r"session ended: alice/3 .*LOGGED_OFF")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post_json(url, body, token):
    request = urllib.request.Request(
        url,
        json.dumps(body).encode(),
        {"content-type": "application/json", "authorization": f"Bearer {token}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        return json.loads(response.read())


class Restartable:
    """
    C{twistd esf} with the chat, the web demo, an offline store and the
    admin API, on fixed ports, so that it can be stopped (or killed) and
    started again where the pages look for it.
    """

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.tcp, self.web, self.admin = _free_port(), _free_port(), _free_port()
        self.runs = 0
        self.server = None

    def start(self):
        self.runs += 1
        self.server = ServerProcess(
            self.tmp_path / f"server-{self.runs}.log",
            [
                "--handler",
                "esf.examples.chat:handler",
                "--websocket",
                f"tcp:{self.web}:interface=127.0.0.1",
                "--web-demo",
                "--offline",
                f"sqlite:{self.tmp_path / 'offline.db'}",
                "--admin-api",
                f"tcp:{self.admin}:interface=127.0.0.1",
                # Without a token the admin API only reads.
                "--admin-token-file",
                str(token_file(self.tmp_path)),
            ],
            port=f"tcp:{self.tcp}:interface=127.0.0.1",
        )
        self.server.wait_listening()
        self.server.wait_for_log(rf"Site starting on {self.web}")
        self.server.wait_for_log(rf"starting on {self.admin}")
        return self

    def stop(self):
        self.server.stop()
        assert "Traceback" not in self.server.log()

    def crash(self):
        self.server.process.kill()
        self.server.process.wait(10)
        self.server.log_file.close()

    def notice(self, user, text, **more):
        return _post_json(
            f"http://127.0.0.1:{self.admin}/api/users/{user}/notice",
            {"text": text, **more},
            TOKEN,
        )


def test_the_chat_through_notices_an_offline_user_a_shutdown_and_a_crash(browser, tmp_path):
    """
    What the chat shows of what happens to a session: an operator's notice,
    private messages kept while the receiver was offline, a server that
    shuts down (in words, not SERVER_SHUTDOWN) or crashes (a line too),
    coming back ("reconnected"), and a message written while reconnecting,
    which waits and then goes out.
    """
    server = Restartable(tmp_path).start()
    url = f"http://127.0.0.1:{server.web}/"
    fay = gus = None
    try:
        fay = Page(browser, url).logon("fay")
        gus = Page(browser, url).logon("gus")

        # An operator's notice, with the admin API's default information type (0).
        assert server.notice("fay", "maintenance at noon") == {"user_id": "fay", "devices": 1}
        fay.wait_line("notice", "", "Notice from the server: maintenance at noon")
        # One with an information type of the operator's own: a notice all the same.
        assert server.notice("fay", "back at one", information_type=42)["devices"] == 1
        fay.wait_line("notice", "", "Notice from the server: back at one")

        # fay leaves; gus's private message is kept for her, and he is told so.
        fay.script("document.getElementById('logoff').click()")
        fay.wait(lambda: fay.text("status") == "not logged on", "fay logged off")
        gus.say("see this when you are back", to="fay")
        gus.wait(
            lambda: "fay is offline" in gus.tags().get("(to fay) see this when you are back", ""),
            "gus told the message is kept",
        )
        fay.logon("fay")
        fay.wait_line("private", "gus", "see this when you are back")
        assert "while you were away" in fay.tags()["see this when you are back"]
        # Acknowledged at once: a live message is not held by the server
        # (for its 10 s ack timeout).
        gus.say("and this one live", to="fay")
        fay.wait_line("private", "gus", "and this one live", timeout=3)
        assert fay.tags()["and this one live"] == ""

        # The server shuts down: said in words; then it comes back.
        server.stop()
        fay.wait(lambda: "the server is shutting down" in fay.text("log"), "the shutdown line")
        assert "SERVER_SHUTDOWN" not in fay.text("log")
        fay.wait(lambda: fay.text("status") == "reconnecting as fay…", "reconnecting shown")
        # Written while reconnecting: shown as waiting, sent once back.
        fay.say("written while the server was away")
        assert ("queued", "fay", "written while the server was away") in fay.lines()
        server.start()
        fay.wait(lambda: "Reconnected as fay." in fay.text("log"), "the reconnected line", 20)
        # Sent after the page joined the room again (the server answered the
        # broadcast, which only members may make).
        fay.wait_line("room mine", "fay", "written while the server was away")

        # A crash: no notice, but the page says the connection was lost.
        server.crash()
        fay.wait(lambda: "Lost the connection to the server" in fay.text("log"), "the lost line")
        server.start()
        fay.wait(
            lambda: fay.text("log").count("Reconnected as fay.") == 2, "reconnected again", 20
        )
    finally:
        for page in (fay, gus):
            if page is not None:
                page.close()
        server.stop()


FOREIGN_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>another origin</title></head>
<body><p>A page of another origin.</p></body></html>
"""


def test_a_page_of_another_origin_imports_esf_js_and_sees_why_it_is_refused(browser, demo):
    """
    A page served from another origin imports esf.js from the server (CORS)
    and connects to a server that does not allow its origin: the error it
    gets says the handshake was refused or unreachable, and where to look.
    """
    server, _, web_port = demo
    site = tempfile.mkdtemp()
    Path(site, "index.html").write_text(FOREIGN_PAGE, encoding="utf-8")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=site)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    script = (
        "const done = arguments[arguments.length - 1];\n"
        f"import('http://127.0.0.1:{web_port}/esf.js').then(async (esf) => {{\n"
        f"  const client = new esf.EsfClient('ws://127.0.0.1:{web_port}/esf', {{ userId: 'zed' }});\n"
        "  try { await client.logon(); done({ error: 'logged on' }); }\n"
        "  catch (e) { done({ name: e.name, message: e.message, before: e.beforeHandshake,\n"
        "                     code: e.closeCode, state: client.state }); }\n"
        "}, (e) => done({ error: `import failed: ${e}` }));"
    )
    page = Page(browser, f"http://127.0.0.1:{httpd.server_address[1]}/index.html")
    try:
        page.driver.set_script_timeout(WAIT)
        outcome = page.driver.execute_async_script(script)
    finally:
        page.close()
        httpd.shutdown()
        httpd.server_close()
    assert "error" not in outcome, outcome
    assert outcome["name"] == "NotConnected"
    assert outcome["before"] is True and outcome["code"] == 1006 and outcome["state"] == "closed"
    assert "before the WebSocket handshake completed" in outcome["message"]
    assert "403" in outcome["message"] and "--websocket-origin" in outcome["message"]
    foreign = f"http://127.0.0.1:{httpd.server_address[1]}"
    server.wait_for_log(rf"refused a WebSocket handshake from .*origin '{foreign}' is not allowed")


_FIRST_PAGE = re.compile(r"\n   ```html\n(   <!doctype html>\n.*?)\n   ```\n", re.DOTALL)


def test_the_first_page_of_the_docs_step_by_step(browser, demo, tmp_path):
    """
    docs/websocket.md's "A first page, step by step": the package installed
    with npm into a folder, the page as written (only its server's address
    changed), served from an origin the server allows; a second tab pushes
    the first out.
    """
    npm = need_program("npm", "the first page of the docs is installed with npm")
    server, _, web_port = demo
    [page_html] = _FIRST_PAGE.findall((REPO / "docs" / "websocket.md").read_text(encoding="utf-8"))
    page_html = textwrap.dedent(page_html)
    assert '"ws://localhost:4531/esf"' in page_html
    folder = tmp_path / "mypage"
    folder.mkdir()
    installed = subprocess.run(
        [
            npm,
            "install",
            "--no-audit",
            "--no-fund",
            "--no-package-lock",
            str(REPO / "esf" / "web"),
        ],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert installed.returncode == 0, installed.stderr
    (folder / "index.html").write_text(
        page_html.replace('"ws://localhost:4531/esf"', f'"ws://127.0.0.1:{web_port}/esf"'),
        encoding="utf-8",
    )
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", server.allowed_port), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.allowed_port}/"
    first = second = None
    try:
        first = Page(browser, url)
        first.wait(lambda: first.text("state") == "loggedon", "the page logged on")
        first.wait(lambda: "online: " in first.text("out"), "the online list")
        assert "alice" in first.text("out").split("online: ", 1)[1].split(", ")
        second = Page(browser, url)
        second.wait(lambda: second.text("state") == "loggedon", "the second tab logged on")
        first.wait(lambda: first.text("state") == "closed", "the first tab pushed out")
    finally:
        for page in (first, second):
            if page is not None:
                page.close()
        httpd.shutdown()
        httpd.server_close()
