"""
The documentation checked against the code: the options table of
C{docs/server.md} (and the WebSocket options in C{docs/websocket.md})
against C{twistd esf}'s options, the log events named in the docs against
the C{esf_event} names the code logs, the reason and error codes in the
docs against the wire enums, and the module map against the modules.

(The metrics table of C{docs/operations.md} has a test of its own.)
"""

import re
from pathlib import Path

from esf import DisconnectedType, ErrorCode, LogonResult
from esf.tap import Options

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"

#: twistd's and strcred's own options, which docs/server.md points to
#: rather than lists.
NOT_LISTED = {"help", "version", "help-auth", "help-auth-type"}


def _table(text, heading):
    """
    The rows (lists of cells) of the first Markdown table whose header row
    starts with C{heading} (cells joined by C{" | "}).
    """
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {heading} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def _documented_options(path):
    """
    C{{name: (default cell, meaning cell)}} of a doc's options table.
    """
    options = {}
    for name_cell, default, meaning in _table(path.read_text(encoding="utf-8"), "option"):
        name = re.match(r"`--([a-z-]+)`", name_cell).group(1)
        assert name not in options, f"--{name} is listed twice in {path.name}"
        options[name] = (default, meaning)
    return options


def _code_options():
    """
    C{{name: (default, help)}} of C{twistd esf}'s options.
    """
    options = Options()
    flags = {flag[0] for flag in Options.optFlags}
    result = {}
    for name in (name.rstrip("=") for name in options.longOpt):
        if name not in NOT_LISTED:
            default = None if name in flags else options.defaults.get(name)
            result[name] = (default, options.docs.get(name))
    return result


def default_problems(name, code_default, documented):
    """
    What is wrong with the documented default C{documented} (a table cell)
    of option C{name}, whose default in the code is C{code_default}: a
    number is the same number, a string the same string, in backquotes.
    An option without a default in the code (C{None}: a flag, or one whose
    default depends on the machine or other options; an empty string) is
    documented in words, which are not compared.
    """
    if code_default is None or code_default == "":
        return []
    literal = re.fullmatch(r"`([^`]*)`", documented)
    if literal is None:
        return [f"--{name}: documented default {documented!r}, the code's is {code_default!r}"]
    value = literal.group(1)
    if isinstance(code_default, (int, float)):
        try:
            same = float(value) == float(code_default)
        except ValueError:
            same = False
    else:
        same = value == str(code_default)
    return (
        [] if same else [f"--{name}: documented default {value!r}, the code's is {code_default!r}"]
    )


def test_server_options_table_is_the_plugins():
    """
    docs/server.md lists every option of C{twistd esf} once, with the
    code's default, and each has help text in the code and a meaning in
    the table.
    """
    code = _code_options()
    documented = _documented_options(DOCS / "server.md")
    assert sorted(documented) == sorted(code)
    problems = []
    for name, (default, meaning) in documented.items():
        code_default, help_text = code[name]
        problems += default_problems(name, code_default, default)
        if not (help_text or "").strip():
            problems.append(f"--{name}: no help text in esf/tap/__init__.py")
        if not meaning.strip():
            problems.append(f"--{name}: no meaning in docs/server.md")
        problems += help_problems(name, help_text or "", default + " " + meaning)
    assert problems == []


def help_problems(name, help_text, row):
    """
    What C{--name}'s help text says that its row of the table does not: a
    number (a bound, a unit's count; not a port in an endpoint example such
    as C{ssl:4531:...}) or another option it names.  The row explains more
    than the help; it must not say less, nor something else.
    """
    numbers = re.findall(r"(?<![\w.:])\d+(?:\.\d+)?(?![\w.:])", help_text)
    options = re.findall(r"--[a-z][a-z-]+", help_text)
    return [
        f"--{name}: the help says {said!r}, docs/server.md's row does not"
        for said in dict.fromkeys(numbers + options)
        if said not in row
    ]


def test_default_problems_catches():
    """
    The comparison of defaults finds a different number or string, or a
    default in words for one the code has.
    """
    assert default_problems("a", 10, "`10`") == []
    assert default_problems("a", 10.0, "`10`") == []
    assert default_problems("a", 0.05, "`0.05`") == []
    assert default_problems("a", "tcp:4530", "`tcp:4530`") == []
    assert default_problems("a", None, "none") == []
    assert default_problems("a", 0, "`0`") == []
    assert default_problems("a", 10, "`30`") != []
    assert default_problems("a", 0.05, "`0.5`") != []
    assert default_problems("a", "info", "`warn`") != []
    assert default_problems("a", 3, "three") != []


def test_help_problems_catches():
    """
    The comparison of help and table finds a number or an option the row
    leaves out, and passes endpoint examples.
    """
    row = "`10` | Seconds before X; see `--other`."
    assert help_problems("a", "Seconds (10) before X; see --other.", row) == []
    assert help_problems("a", "e.g. tcp:4530 or ssl:4531:...", row) == []
    assert help_problems("a", "Seconds (30) before X.", row) != []
    assert help_problems("a", "Needs --third.", row) != []


def test_websocket_options_agree_with_server_md():
    """
    The WebSocket options docs/websocket.md lists are options, with the
    default docs/server.md gives them.
    """
    server = _documented_options(DOCS / "server.md")
    websocket = _documented_options(DOCS / "websocket.md")
    assert websocket
    for name, (default, _) in websocket.items():
        assert name in server, f"--{name}"
        assert default == server[name][0], (
            f"--{name}: {default} here, {server[name][0]} in server.md"
        )


def _code_events():
    names = set()
    for path in (REPO / "esf").rglob("*.py"):
        names |= set(re.findall(r'esf_event="([a-z_]+)"', path.read_text(encoding="utf-8")))
    return names


def test_log_events_table_is_the_codes():
    """
    The table of log events in docs/server.md names every C{esf_event} the
    code logs, and nothing else.
    """
    rows = _table((DOCS / "server.md").read_text(encoding="utf-8"), "`esf_event` | level")
    documented = [re.fullmatch(r"`([a-z_]+)`", row[0]).group(1) for row in rows]
    assert len(documented) == len(set(documented))
    assert sorted(documented) == sorted(_code_events())


def test_log_events_named_in_docs_exist():
    """
    Every log event the docs name (C{esf_event="..."}, C{esf_events("...")},
    C{esf_event} C{`name`}) is one the code logs.
    """
    events = _code_events()
    named = []
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        for pattern in (
            r'esf_event="([a-z_]+)"',
            r'esf_events\("([a-z_]+)"\)',
            r"`esf_event` `([a-z_]+)`",
            r'`esf_event` \| `"([a-z_]+)"`',
        ):
            named += [(path.name, name) for name in re.findall(pattern, text)]
    assert named
    assert [(doc, name) for doc, name in named if name not in events] == []


def _enum_table(heading):
    """
    C{{wire name: (value, Python name)}} of a table of docs/protocol.md.
    """
    text = (DOCS / "protocol.md").read_text(encoding="utf-8")
    section = text[text.index(f"### {heading}") :]
    rows = _table(section, "value")
    return {
        name: (int(value), re.fullmatch(r"`([A-Z_]+)`", python).group(1))
        for value, name, python, _ in rows
    }


ENUMS = {
    "5.3 LogonResult": LogonResult,
    "5.4 DisconnectedType": DisconnectedType,
    "5.5 ErrorCode": ErrorCode,
}


def test_protocol_tables_are_the_enums():
    """
    docs/protocol.md's tables of LogonResult, DisconnectedType and ErrorCode
    list every member of the enum, with its value and Python name, and no
    other.
    """
    for heading, enum in ENUMS.items():
        table = _enum_table(heading)
        assert sorted(table.values()) == sorted((m.value, m.name) for m in enum), heading


def reason_problems(text, errors, reasons, all_codes):
    """
    The codes C{text} names wrongly: C{Error(X)} with X not an ErrorCode,
    C{DisconnectNotice(X)} with X not a DisconnectedType, C{`X` (N)} with X
    a code whose value is not N.
    """
    problems = []
    for name in re.findall(r"`Error\(([A-Za-z]+)\)`", text):
        if name not in errors:
            problems.append(f"Error({name})")
    for name in re.findall(r"DisconnectNotice\(([A-Za-z]+)\)", text):
        if name not in reasons:
            problems.append(f"DisconnectNotice({name})")
    for name, value in re.findall(r"`([A-Z][A-Za-z]+)` \((\d+)\)", text):
        if name in all_codes and int(value) not in all_codes[name]:
            problems.append(f"{name} ({value})")
    return problems


def _codes():
    errors = set(_enum_table("5.5 ErrorCode"))
    reasons = set(_enum_table("5.4 DisconnectedType"))
    all_codes = {}
    for heading in ENUMS:
        for name, (value, _) in _enum_table(heading).items():
            all_codes.setdefault(name, set()).add(value)
    return errors, reasons, all_codes


def test_reason_codes_in_docs_exist():
    """
    Every error and disconnect reason the docs name, in C{docs/} and the
    README, is a member of the wire enums, with its value where one is
    given.
    """
    errors, reasons, all_codes = _codes()
    problems = []
    for path in sorted(DOCS.glob("*.md")) + [REPO / "README.md"]:
        text = path.read_text(encoding="utf-8")
        problems += [
            f"{path.name}: {p}" for p in reason_problems(text, errors, reasons, all_codes)
        ]
    assert problems == []


def test_reason_problems_catches():
    errors, reasons, all_codes = _codes()
    text = "`Error(RateLimted)`, `DisconnectNotice(Kicked)`, `InvalidMessage` (2), `Busy` (5)"
    assert reason_problems(text, errors, reasons, all_codes) == [
        "Error(RateLimted)",
        "DisconnectNotice(Kicked)",
        "InvalidMessage (2)",
    ]


def _module_map():
    """
    The modules docs/server.md's map names, as paths under the repository.
    """
    rows = _table((DOCS / "server.md").read_text(encoding="utf-8"), "module")
    named = set()
    for row in rows:
        # `esf/server/`: `_a.py`, `_b.py` or `esf/server/_a.py`, `_b.py`:
        # a bare name is in the folder last given.  Naming a package's
        # folder names its __init__.py.
        folder = ""
        for token in re.findall(r"`([a-z_/.]+)`", row[0]):
            if token.endswith("/"):
                folder = token
                if token.startswith("esf/"):
                    named.add(token + "__init__.py")
            elif token.endswith(".py"):
                if "/" in token:
                    folder = token.rsplit("/", 1)[0] + "/"
                    named.add(token)
                else:
                    named.add(folder + token)
    return named


def test_module_map_names_modules_that_exist():
    """
    Every module docs/server.md's map of the server names is in esf/.
    """
    named = _module_map()
    assert named
    assert sorted(name for name in named if not (REPO / name).is_file()) == []


def test_module_map_names_every_module():
    """
    Every module of esf/ is in docs/server.md's map.
    """
    modules = {str(p.relative_to(REPO)) for p in (REPO / "esf").rglob("*.py")}
    assert sorted(modules - _module_map()) == []
