"""The dependency direction between the two programs, read from the source.

The device never imports the fleet. The fleet imports the agent only through the wire
contract and the libraries both sides share on purpose:

* ``agent.contract``: topics, messages, the bundle format, the bytes that are signed;
* ``agent.mqtt``: the MQTT link (reconnects, manual acknowledgements) the ingest uses;
* ``agent.runtime``: the inference engine, so a bundle's expected outputs are computed at
  build time with the very code the device will check them with;
* ``agent.drift.summaries``: how a tensor's rows become drift features, so a bundle's
  baseline is computed at build time with the very code the device computes live
  features with;
* ``agent`` itself, for the version.

Anything else (installer, slots, trust client, endpoint) is the device's business; a
fleet module reaching into it would make a device change a fleet change.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_WITH_FLEET = ("agent", "agent.contract", "agent.mqtt", "agent.runtime",
                     "agent.drift.summaries", "agent.enrollment", "agent.private_file")


def _imports(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def _is_shared(module: str) -> bool:
    return any(module == shared or (shared != "agent" and module.startswith(shared + "."))
               for shared in SHARED_WITH_FLEET)


def test_the_agent_never_imports_the_fleet():
    offenders = {path: sorted(n for n in names if n == "fleet" or n.startswith("fleet."))
                 for path, names in _imports("agent").items()}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_fleet_imports_the_agent_only_through_the_contract_and_shared_libraries():
    offenders = {
        path: sorted(n for n in names
                     if (n == "agent" or n.startswith("agent.")) and not _is_shared(n))
        for path, names in _imports("fleet").items()
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_check_sees_imports():
    """Not vacuous: the fleet does import the contract, and the agent modules are read."""
    fleet = _imports("fleet")
    assert any("agent.contract" in names for names in fleet.values())
    assert len(_imports("agent")) > 10
