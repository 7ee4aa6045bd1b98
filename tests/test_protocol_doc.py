"""PROTOCOL.md cites the code that implements each rule as ``[module:name]`` (its §0): every citation must name a
module of deca_p2p and something defined in it, so that moving code cannot leave the document pointing nowhere."""
import importlib
import re
from pathlib import Path

PROTOCOL = Path(__file__).resolve().parents[1] / "PROTOCOL.md"
CITE = re.compile(r"\[([^\[\]]*?)\]")
ONE = re.compile(r"^([a-z_]+):([A-Za-z_][A-Za-z_0-9.]*)$")


def citations() -> list[tuple[str, str]]:
    out = []
    for group in CITE.findall(PROTOCOL.read_text()):
        parts = [p.strip() for p in group.replace("\n", " ").split(",")]
        # a group may mix citations with a bare module or prose ("[delay_line, transport:Transport._read]")
        out += [(m.group(1), m.group(2)) for m in map(ONE.match, parts) if m]
    return out


def test_protocol_md_cites_the_code_and_every_citation_resolves():
    cites = citations()
    assert len(cites) > 40  # the document cites the code throughout; a parser that finds none proves nothing
    missing = []
    for module, name in cites:
        if module == "file":  # the document's own example of the notation
            continue
        obj = importlib.import_module(f"deca_p2p.{module}")
        for attr in name.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is None:
            missing.append(f"{module}:{name}")
    assert not missing, f"PROTOCOL.md cites what the code no longer has: {missing}"
