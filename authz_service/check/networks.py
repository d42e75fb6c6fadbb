"""A key's allowed source networks (`allowed_cidrs`), checked from memory: pure, no I/O.

The networks are kept as integers and masks, and what each source address was told is remembered per
allow-list (a key is used from few addresses), so a check costs a dict look-up, not ipaddress objects per
request.
"""

import functools
import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Source addresses remembered per allow-list (emptied when full: a flood of addresses costs a parse each).
MAX_REMEMBERED_SOURCES = 256


class AllowedNetworks(tuple):
    """((IPv4 network, mask), ...), ((IPv6 network, mask), ...) as integers. A tuple, so that hashing a grant
    that holds one (the context signer's cache key, on every check) and comparing two stay in C."""

    networks: tuple[Network, ...]
    _seen: dict[str, bool]

    def __new__(cls, networks: Iterable[Network]) -> "AllowedNetworks":
        found = tuple(networks)
        v4 = tuple((int(n.network_address), int(n.netmask)) for n in found if n.version == 4)
        v6 = tuple((int(n.network_address), int(n.netmask)) for n in found if n.version == 6)
        self = super().__new__(cls, (v4, v6))
        self.networks = found
        self._seen = {}
        return self

    def allows(self, source: str) -> bool:
        """Whether the address is in one of the networks; an address that does not parse (or none) is not."""
        seen = self._seen.get(source)
        if seen is None:
            if len(self._seen) >= MAX_REMEMBERED_SOURCES:
                self._seen.clear()
            seen = self._seen[source] = self._allows(source)
        return seen

    def _allows(self, source: str) -> bool:
        address = parse_source(source)
        if address is None:
            return False
        version, value = address
        for network, mask in self[0] if version == 4 else self[1]:
            if value & mask == network:
                return True
        return False

    def __repr__(self) -> str:
        return f"AllowedNetworks({', '.join(map(str, self.networks))})"


@functools.lru_cache(maxsize=4096)
def parse_source(source: str) -> tuple[int, int] | None:
    """(IP version, address as an integer), or None. An IPv4 address that reaches Envoy on an IPv6 socket
    (::ffff:203.0.113.9) is the IPv4 address, and an IPv6 zone (%eth0) is ignored."""
    try:
        address = ipaddress.ip_address(source.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.version, int(address)
