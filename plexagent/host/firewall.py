"""
The host firewall (seed "Firewall (UFW)") through the real ``ufw`` CLI, run
with ``programs`` (never a shell): ``ufw status`` parsed into
``{status, rules: [{action, port, protocol, from_ip}]}`` and validated
``allow`` rules.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Sequence

import attrs

from plexagent import errors
from plexagent.host import processes
from plexagent.host.programs import Programs
from plexagent.strictparse import parse_int

UFW_UNAVAILABLE = "ufw not available"

_PORT = re.compile(r"([0-9]{1,5})(?:[:-]([0-9]{1,5}))?")
_COLUMNS = re.compile(r"\s{2,}")


@attrs.frozen
class AllowRule:
    port: str  # "8080" or "9000:9010"
    protocol: str  # "tcp", "udp" or "both"
    from_ip: str | None  # None = anywhere

    def argv(self) -> list[str]:
        args = ["allow", "from", self.from_ip or "any", "to", "any", "port", self.port]
        if self.protocol != "both":
            args += ["proto", self.protocol]
        return args

    def document(self) -> dict[str, Any]:
        return {
            "action": "ALLOW",
            "port": int(self.port) if self.port.isdigit() else self.port,
            "protocol": self.protocol,
            "from_ip": self.from_ip or "0.0.0.0/0",
        }


def _port_number(text: str) -> int:
    value = parse_int(text)
    if not 1 <= value <= 65535:
        raise ValueError(text)
    return value


def parse_allow(body: Any) -> AllowRule:
    """The ``/firewall/allow`` body; 400 naming the bad field."""
    if not isinstance(body, dict):
        raise errors.InvalidInput("invalid body", "the body must be a JSON object")
    raw_port = body.get("port")
    if raw_port is None:
        raise errors.InvalidInput("port is required", "port must be 1-65535 or a range such as 9000:9010")
    port_error = errors.InvalidInput("invalid port", "port must be 1-65535 or a range such as 9000:9010")
    if isinstance(raw_port, bool):
        raise port_error
    if isinstance(raw_port, int):
        text = str(raw_port)
    elif isinstance(raw_port, str):
        text = raw_port
    else:
        raise port_error
    m = _PORT.fullmatch(text)
    if m is None:
        raise port_error
    try:
        low = _port_number(m.group(1))
        high = _port_number(m.group(2)) if m.group(2) is not None else None
    except ValueError:
        raise port_error from None
    if high is not None and high <= low:
        raise errors.InvalidInput("invalid port", "a port range must go from a lower to a higher port")
    port = f"{low}:{high}" if high is not None else str(low)

    protocol = body.get("protocol")
    if protocol is None or protocol == "":
        protocol = "both"
    if not isinstance(protocol, str) or protocol.lower() not in ("tcp", "udp", "both", "any"):
        raise errors.InvalidInput("invalid protocol", "protocol must be tcp, udp or both")
    protocol = protocol.lower()
    if protocol == "any":
        protocol = "both"
    if high is not None and protocol == "both":
        raise errors.InvalidInput("invalid protocol", "a port range needs protocol tcp or udp")

    from_ip = body.get("from_ip")
    if from_ip in (None, "", "any", "anywhere"):
        source = None
    elif not isinstance(from_ip, str):
        raise errors.InvalidInput("invalid from_ip", "from_ip must be an IP address or a CIDR network")
    else:
        try:
            if "/" in from_ip:
                source = str(ipaddress.ip_network(from_ip.strip(), strict=False))
            else:
                source = str(ipaddress.ip_address(from_ip.strip()))
        except ValueError:
            raise errors.InvalidInput(
                "invalid from_ip", f"from_ip: {from_ip!r} is not an IP address or a CIDR network"
            ) from None
    return AllowRule(port=port, protocol=protocol, from_ip=source)


def _parse_to(text: str) -> tuple[Any, str, str | None]:
    """``To`` column -> (port, protocol, destination address or None)."""
    parts = text.split(None, 1)
    destination = None
    if len(parts) == 2 and _is_address(parts[0]):
        destination, text = parts
    elif text in ("Anywhere",):
        return None, "both", None
    if "/" in text:
        port, _, proto = text.rpartition("/")
        # "10.0.0.0/8" (an address as the only To) is not a port/proto pair.
        if proto not in ("tcp", "udp"):
            return None, "both", text
    else:
        port, proto = text, "both"
    if port.isdigit():
        return int(port), proto, destination
    if _PORT.fullmatch(port) or "," in port:
        return port, proto, destination
    # An application profile (e.g. "Nginx Full") or an address.
    return port, proto, destination


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def _parse_from(text: str, v6: bool) -> str:
    if text.startswith("Anywhere"):
        return "::/0" if v6 else "0.0.0.0/0"
    address = text.split()[0]
    return address


def parse_status(output: str) -> dict[str, Any]:
    """``ufw status`` text -> the seed's document."""
    status = "inactive"
    rules: list[dict[str, Any]] = []
    in_table = False
    for line in output.splitlines():
        stripped = line.strip()
        if stripped.startswith("Status:"):
            status = stripped.split(":", 1)[1].strip()
            continue
        if stripped.startswith("--"):
            in_table = True
            continue
        if not in_table or not stripped:
            continue
        comment = None
        if " # " in stripped:
            stripped, _, comment = stripped.partition(" # ")
        columns = _COLUMNS.split(stripped.strip())
        if len(columns) < 3:
            continue
        to, action, source = columns[0], columns[1], " ".join(columns[2:])
        v6 = "(v6)" in to or "(v6)" in source
        to = to.replace("(v6)", "").strip()
        port, protocol, destination = _parse_to(to)
        words = action.split()
        rule: dict[str, Any] = {
            "action": words[0],
            "port": port,
            "protocol": protocol,
            "from_ip": _parse_from(source.replace("(v6)", "").strip(), v6),
            "direction": words[1].lower() if len(words) > 1 else "in",
            "ipv6": v6,
        }
        if destination is not None:
            rule["to_ip"] = destination
        if comment:
            rule["comment"] = comment.strip()
        rules.append(rule)
    return {"status": status, "rules": rules}


class Firewall:
    """``ufw`` status and allow rules."""

    def __init__(self, programs: Programs, command: Sequence[str] = ("ufw",)) -> None:
        self.programs = programs
        self.command = tuple(command)

    async def _ufw(self, *args: str) -> processes.ProcessResult:
        try:
            result = await self.programs.run([*self.command, *args])
        except processes.ProcessTimedOut as e:
            raise errors.Unavailable(UFW_UNAVAILABLE, f"ufw did not answer: {e.details}") from None
        except errors.Unavailable:
            raise errors.Unavailable(
                UFW_UNAVAILABLE, f"{self.command[0]} is not installed or not on the agent's PATH; install ufw"
            ) from None
        if result.exit_code != 0:
            said = (result.stderr or result.stdout).decode("utf-8", "replace").strip()
            raise errors.UpstreamFailed("ufw failed", said.splitlines()[-1][:500] if said else f"exit code {result.exit_code}")
        return result

    async def status(self) -> dict[str, Any]:
        result = await self._ufw("status")
        return parse_status(result.stdout.decode("utf-8", "replace"))

    async def allow(self, rule: AllowRule) -> dict[str, Any]:
        result = await self._ufw(*rule.argv())
        output = result.stdout.decode("utf-8", "replace").strip()
        return {"success": True, "rule": rule.document(), "output": output}
