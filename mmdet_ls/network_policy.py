"""Which addresses the image loader may connect to (SSRF protection)."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from .failures import TaskError

# Never fetched unless explicitly allowed: cloud metadata services and
# link-local ranges answer credentials to anyone who asks.
METADATA_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",  # link-local, AWS/GCP/Azure metadata at 169.254.169.254
        "fe80::/10",  # IPv6 link-local
        "fd00:ec2::254/128",  # AWS IMDS over IPv6
        "100.100.100.200/32",  # Alibaba Cloud metadata
        "168.63.129.16/32",  # Azure WireServer (hands VM agents their configuration)
        "192.0.0.192/32",  # Oracle Cloud metadata
    )
)
# Never useful as an image host.
UNROUTABLE_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32", "::/128", "ff00::/8")
)


NAT64_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48"))
# RFC 8215 local-use NAT64: a site's own translator, so at least private
# whatever IPv4 address it carries.
LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")
# Most restrictive first: an address that embeds another gets the stricter class.
_SEVERITY = ("metadata", "unroutable", "loopback", "private", "public")


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address routes to: mapped, NAT64, 6to4, Teredo."""
    found = []
    if addr.ipv4_mapped:
        found.append(addr.ipv4_mapped)
    if any(addr in n for n in NAT64_NETWORKS):
        found.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    if addr.sixtofour:
        found.append(addr.sixtofour)
    if addr.teredo:
        found.extend(addr.teredo)
    return found


def classify_address(ip: str) -> str:
    """'metadata', 'unroutable', 'loopback', 'private' or 'public'.

    IPv6 forms that carry an IPv4 address (::ffff:a.b.c.d, NAT64 64:ff9b::,
    6to4 2002::/16, Teredo) are classed by that address too, strictest wins,
    so [64:ff9b::a9fe:a9fe] is the metadata service, not a public host.
    """
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(addr)
        if addr.ipv4_mapped:
            return _classify(addr.ipv4_mapped)
        if any(addr in n for n in NAT64_NETWORKS):  # DNS64 hosts: what counts is the IPv4 behind it
            kind = _classify(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
            if addr in LOCAL_NAT64:
                kind = min((kind, "private"), key=_SEVERITY.index)
            return kind
        if embedded:
            kinds = [_classify(addr)] + [_classify(a) for a in embedded]
            return min(kinds, key=_SEVERITY.index)
    return _classify(addr)


def _classify(addr) -> str:
    if any(addr in n for n in METADATA_NETWORKS) or addr.is_link_local:
        return "metadata"
    if any(addr in n for n in UNROUTABLE_NETWORKS) or addr.is_multicast or addr.is_unspecified:
        return "unroutable"
    if addr.is_loopback:
        return "loopback"
    if addr.is_private or addr.is_reserved or getattr(addr, "is_site_local", False) or (
        isinstance(addr, ipaddress.IPv4Address) and addr in ipaddress.ip_network("100.64.0.0/10")
    ):
        return "private"
    return "public"


@dataclass(frozen=True)
class NetworkPolicy:
    """Default: public addresses only, plus the Label Studio host.

    `allow_private_networks` opens loopback and private ranges (many Label
    Studio installs keep images there); `allowed_hosts` opens single host
    names, IPs or CIDR networks. Metadata/link-local addresses stay closed
    unless listed in `allowed_hosts` by IP or network.
    """

    allow_private_networks: bool = False
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)

    def _allowed_networks(self):
        nets = []
        for entry in self.allowed_hosts:
            try:
                nets.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                pass
        return nets

    def check_address(self, host: str, ip: str, trusted_host: bool = False) -> None:
        """Raise TaskError when connecting to `ip` (resolved from `host`) is refused."""
        kind = classify_address(ip)
        addr = ipaddress.ip_address(ip)
        if any(addr in n for n in self._allowed_networks()):
            return
        host_listed = host.lower() in {h.lower() for h in self.allowed_hosts}
        if kind == "metadata":
            raise TaskError(
                "forbidden_address",
                f"refused to fetch from {host} ({ip}): link-local/cloud-metadata addresses are "
                "never fetched; list the address in allowed_hosts if this is really an image server",
            )
        if kind == "unroutable":
            raise TaskError("forbidden_address", f"refused to fetch from {host} ({ip}): not a routable address")
        if kind in ("loopback", "private") and not (trusted_host or host_listed or self.allow_private_networks):
            raise TaskError(
                "forbidden_address",
                f"refused to fetch from {host} ({ip}): {kind} addresses are blocked; set "
                "allow_private_networks: true or add the host to allowed_hosts if your images live there",
            )
