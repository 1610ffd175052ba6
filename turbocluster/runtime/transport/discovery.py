"""Find nodes on the local network with zeroconf (mDNS/DNS-SD), and advertise one.

A node advertises ``<name>._turbo-node._tcp.local.`` with TXT records: node id,
protocol and codec format versions, backend, memory budget and port. Nothing
secret goes in TXT (anyone on the network can read it); the handshake, not
discovery, decides whether a node is compatible.
"""

import ipaddress
import socket
import time
from dataclasses import dataclass, field

import ifaddr
from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceInfo, Zeroconf

SERVICE_TYPE = "_turbo-node._tcp.local."


class DiscoveryError(RuntimeError):
    """No node answered, or an advertisement could not be registered."""


@dataclass
class Found:
    name: str  # the service instance name, e.g. "node-a"
    address: str  # "host:port" to dial
    properties: dict = field(default_factory=dict)  # TXT records, decoded to str


def _interfaces(host):
    """Loopback-only when serving on loopback (tests), otherwise every interface."""
    if host and ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
        return ["127.0.0.1"]
    return InterfaceChoice.All


def _addresses(host):
    """IPv4 addresses to publish for ``host`` ("0.0.0.0"/"" = every non-loopback IPv4)."""
    if host and host not in ("0.0.0.0", "::"):
        return [socket.inet_aton(socket.gethostbyname(host))]
    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                out.append(socket.inet_aton(ip.ip))
    return out or [socket.inet_aton("127.0.0.1")]


def advertise(name, host, port, properties):
    """Register the node; returns a handle for ``withdraw``. ``properties`` must hold no secrets."""
    zc = Zeroconf(interfaces=_interfaces(host), ip_version=IPVersion.V4Only)
    info = ServiceInfo(
        SERVICE_TYPE,
        f"{name}.{SERVICE_TYPE}",
        addresses=_addresses(host),
        port=port,
        properties={k: str(v) for k, v in properties.items()},
        server=f"{socket.gethostname().split('.')[0]}-{name}.local.",
    )
    zc.register_service(info, allow_name_change=True)
    return zc, info


def withdraw(handle):
    """Unregister and close; safe to call twice."""
    if handle is None:
        return
    zc, info = handle
    try:
        zc.unregister_service(info)
    finally:
        zc.close()


def browse(timeout=2.0, interfaces=InterfaceChoice.All):
    """Every node that answers within ``timeout`` seconds (possibly none)."""
    zc = Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
    names = set()

    def on_change(zeroconf, service_type, name, state_change):
        names.add(name)

    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        time.sleep(timeout)
        browser.cancel()
        found = []
        for name in sorted(names):
            info = zc.get_service_info(SERVICE_TYPE, name, timeout=int(max(timeout, 1) * 1000))
            if info is None or not info.parsed_addresses():
                continue
            props = {k.decode(): (v.decode() if v is not None else "") for k, v in info.properties.items()}
            short = name[: -len(SERVICE_TYPE) - 1] if name.endswith("." + SERVICE_TYPE) else name
            found.append(Found(short, f"{info.parsed_addresses()[0]}:{info.port}", props))
        return found
    finally:
        zc.close()


def discover(timeout=2.0, interfaces=InterfaceChoice.All):
    """Like ``browse`` but raise a clear error when nobody answers."""
    found = browse(timeout, interfaces)
    if not found:
        raise DiscoveryError(
            f"no node answered on {SERVICE_TYPE} within {timeout:g} s; start nodes with "
            "`turbo-node serve` on each machine, or pass --nodes host:port,... (or --local N)"
        )
    return found
