"""PROTOCOL.md cites the code that implements each rule as ``[module:name]`` (its §0) and lists its constants with
the module that holds them (Appendix A): every citation must name the module that defines what it cites, and every
constant must be where the appendix says, with the value it gives, so that moving code cannot leave the document
pointing nowhere, or at a re-export."""
import importlib
import inspect
import re
from pathlib import Path

PROTOCOL = Path(__file__).resolve().parents[1] / "PROTOCOL.md"
CITE = re.compile(r"\[([^\[\]]*?)\]")
ONE = re.compile(r"^([a-z_]+):([A-Za-z_][A-Za-z_0-9.]*)$")
BARE = re.compile(r"^[a-z_]+$")


def citations() -> tuple[list[tuple[str, str]], set[str]]:
    """([(module, name)], {bare module names}) of every bracketed citation group."""
    cites, bare = [], set()
    for group in CITE.findall(PROTOCOL.read_text()):
        parts = [p.strip() for p in group.replace("\n", " ").split(",")]
        found = [(p, ONE.match(p)) for p in parts]
        if not any(m for _, m in found):
            continue  # not a citation group
        # a group may mix citations with a bare module or prose ("[delay_line, transport:Transport._recv_raw]")
        cites += [(m.group(1), m.group(2)) for _, m in found if m]
        bare |= {p for p, m in found if not m and BARE.match(p)}
    return cites, bare


def _resolve(module: str, name: str):
    obj = importlib.import_module(f"deca_p2p.{module}")
    for attr in name.split("."):
        obj = getattr(obj, attr, None)
        if obj is None:
            return None
    return obj


def test_protocol_md_cites_the_code_and_every_citation_resolves_in_its_own_module():
    cites, bare = citations()
    assert len(cites) > 40  # the document cites the code throughout; a parser that finds none proves nothing
    missing, elsewhere = [], []
    for module, name in cites:
        if module == "file":  # the document's own example of the notation
            continue
        obj = _resolve(module, name)
        if obj is None:
            missing.append(f"{module}:{name}")
        elif (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ != f"deca_p2p.{module}":
            elsewhere.append(f"{module}:{name} (defined in {obj.__module__})")  # a re-export, not its home
    for module in sorted(bare):
        try:
            importlib.import_module(f"deca_p2p.{module}")
        except ModuleNotFoundError:
            missing.append(module)
    assert not missing, f"PROTOCOL.md cites what the code no longer has: {missing}"
    assert not elsewhere, f"PROTOCOL.md cites these where they are only re-exported: {elsewhere}"


def appendix_a() -> list[tuple[list[str], str, str]]:
    """([constant names], value cell, module) of Appendix A's rows that name constants (`UPPER_CASE`)."""
    text = PROTOCOL.read_text()
    table = text[text.index("## Appendix A."):text.index("## Appendix B.")]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3:
            continue
        names = re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0])
        if names and re.fullmatch(r"[a-z_]+", cells[2]):
            rows.append((names, cells[1], cells[2]))
    return rows


def test_appendix_a_names_each_constants_module_and_value():
    rows = appendix_a()
    assert len(rows) > 15
    wrong = []
    for names, value, module in rows:
        mod = importlib.import_module(f"deca_p2p.{module}")
        for name in names:
            if not hasattr(mod, name):
                wrong.append(f"{name} is not in {module}")
        if len(names) == 1 and re.fullmatch(r"[0-9 ]+", value):  # a plain integer: it must be the code's
            actual = getattr(mod, names[0], None)
            if actual != int(value.replace(" ", "")):
                wrong.append(f"{names[0]} is {actual}, the appendix says {value}")
    assert not wrong, wrong


def test_every_header_the_document_shows_has_the_codes_version():
    """The `v` of every example header, the rule for `v` and the §13 limitation name the version the code speaks."""
    from deca_p2p.wire import VERSION

    text = PROTOCOL.read_text()
    shown = [int(v) for v in re.findall(r"\{v: ?(\d+)\b", text)]
    assert len(shown) >= 5  # hello, resync, bye and the worked example's headers
    rule = re.search(r"\| `v` \| int \| Protocol version, MUST be `(\d+)`", text)
    limit = re.search(r"A header with `v` ≠ (\d+) is dropped", text)
    assert rule and limit
    wrong = [v for v in shown + [int(rule.group(1)), int(limit.group(1))] if v != VERSION]
    assert not wrong, f"PROTOCOL.md shows version(s) {sorted(set(wrong))}; the code speaks {VERSION}"
