"""A key's allowed source networks (`allowed_cidrs`), checked from memory: pure, no I/O.

The networks are kept as integers and masks, and a source address string parses once (a bounded cache), so a
check costs a dict look-up and a few integer operations per network, not ipaddress objects per request.
"""

import functools
import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AllowedNetworks:
    __slots__ = ("_v4", "_v6", "networks")

    def __init__(self, networks: Iterable[Network]):
        self.networks = tuple(networks)
        self._v4 = tuple((int(n.network_address), int(n.netmask)) for n in self.networks if n.version == 4)
        self._v6 = tuple((int(n.network_address), int(n.netmask)) for n in self.networks if n.version == 6)

    def allows(self, source: str) -> bool:
        """Whether the address is in one of the networks; an address that does not parse (or none) is not."""
        address = parse_source(source)
        if address is None:
            return False
        version, value = address
        for network, mask in self._v4 if version == 4 else self._v6:
            if value & mask == network:
                return True
        return False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AllowedNetworks) and self.networks == other.networks

    def __hash__(self) -> int:
        return hash(self.networks)

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
