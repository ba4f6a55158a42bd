"""Which address a request comes from, and whether an address is in a list of networks.

Framework-free (raw ASGI values in, strings out), so BlackSheep's middleware and a raw-ASGI fast path share it.

The client address is the socket's peer unless the peer is a trusted proxy (`trusted_proxies`); then it is
the rightmost hop of `forwarded_header` (`X-Forwarded-For` or `Forwarded`) that is not itself a trusted
proxy. Rightmost, because each proxy appends the address it saw: everything left of the hop our own
proxies wrote was written by the client and may be anything. Only the configured header is read: a proxy
appends to one of them, and a client can put any address in the other. A hop that is not an address
(`unknown`, an obfuscated `_name`, garbage) ends the walk at the last trusted hop, so a client can never
choose the string its limits are counted under.

Addresses are answered in canonical form (`::ffff:10.1.2.3` is `10.1.2.3`, ports and brackets dropped),
so one client has one name whatever way a proxy wrote it. Answers are cached per address string in
bounded dicts (cleared when full): a few distinct peers (the load balancers) cost a dict lookup each.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
CACHE_MAX = 16_384  # entries per cache; cleared when full, so memory stays bounded whatever the traffic
UNKNOWN = "unknown"  # no peer address (a Unix socket)


def parse_address(text: str) -> IPAddress | None:
    """An address as a peer or a proxy writes it (`1.2.3.4`, `1.2.3.4:80`, `[::1]:80`, `::1`), or None."""
    text = text.strip().strip('"')
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # IPv4 with a port (IPv6 without brackets has two or more colons)
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class Networks:
    """A list of CIDRs and a membership test with a bounded per-address cache."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]
        self._cache: dict[str, bool] = {}

    def __contains__(self, address: str) -> bool:
        found = self._cache.get(address)
        if found is None:
            found = self.contains(parse_address(address))
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            self._cache[address] = found
        return found

    def contains(self, address: IPAddress | None) -> bool:
        if address is None:
            return False
        return any(address.version == network.version and address in network for network in self.networks)


def forwarded_for(value: bytes) -> list[str]:
    """The `for=` values of a `Forwarded` header (RFC 7239), leftmost first; `unknown` for elements without one."""
    hops = []
    for element in value.decode("latin-1").split(","):
        found = UNKNOWN
        for pair in element.split(";"):
            name, _, token = pair.strip().partition("=")
            if name.lower() == "for":
                found = token.strip().strip('"')
        hops.append(found)
    return hops


class ClientAddresses:
    """The client address of a request from its peer and, behind trusted proxies, its forwarding header."""

    def __init__(self, trusted_proxies: Iterable[str], forwarded_header: str = "x-forwarded-for") -> None:
        cidrs = list(trusted_proxies)
        self.trusted = Networks(cidrs) if cidrs else None
        self.header = forwarded_header.encode()
        self._canonical: dict[str, str] = {}

    def resolve(self, client: tuple[str, int] | list[object] | None, headers: Iterable[tuple[bytes, bytes]]) -> str:
        """`client` is the ASGI scope's `client` (host, port) or None; `headers` its raw (name, value) pairs."""
        if not client:
            return UNKNOWN
        peer = self.canonical(str(client[0]))
        trusted = self.trusted
        if trusted is None or peer not in trusted:
            return peer
        return self.walk(peer, self.hops(headers))

    def hops(self, headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
        """The forwarding header's hops, leftmost first (repeated header lines in order)."""
        wanted = self.header
        hops: list[str] = []
        for name, value in headers:
            if name.lower() == wanted:
                if wanted == b"forwarded":
                    hops.extend(forwarded_for(value))
                else:
                    hops.extend(hop.strip() for hop in value.decode("latin-1").split(","))
        return hops

    def walk(self, peer: str, hops: list[str]) -> str:
        """From the right: the first hop that is not a trusted proxy (all trusted: the leftmost one)."""
        assert self.trusted is not None
        current = peer
        for hop in reversed(hops):
            address = parse_address(hop)
            if address is None:
                return current  # not an address: stop at the last hop we trust
            current = str(address)
            if not self.trusted.contains(address):
                return current
        return current

    def canonical(self, address: str) -> str:
        found = self._canonical.get(address)
        if found is None:
            parsed = parse_address(address)
            found = str(parsed) if parsed is not None else address
            if len(self._canonical) >= CACHE_MAX:
                self._canonical.clear()
            self._canonical[address] = found
        return found
