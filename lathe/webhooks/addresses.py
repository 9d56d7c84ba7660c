"""Where a webhook may be sent. A target that resolves to a loopback, private, link-local (cloud
metadata), shared, reserved or multicast address is refused, at create/update and again at every
delivery (DNS can change): `resolve` is what the delivery connects to, so the address checked is
the address used. `LATHE_WEBHOOK_ALLOW_PRIVATE=true` lifts the check and allows plain http."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from lathe.errors import BadRequest


class UnsafeTarget(Exception):
    """A target the server must not send to (or can't resolve)."""


def _kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    for name in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    return "non-public"


def resolve(host: str, port: int, *, allow_private: bool) -> list[str]:
    """The addresses `host` resolves to, each checked.

    Raises:
        UnsafeTarget: it does not resolve, or one of its addresses is not a public one (a name that
            resolves to both is refused too: which one a connection gets is not ours to choose).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeTarget(f"{host} does not resolve ({exc}).") from None
    addresses: list[str] = []
    for *_, sockaddr in infos:
        text = str(sockaddr[0]).split("%", 1)[0]
        ip = ipaddress.ip_address(text)
        mapped = getattr(ip, "ipv4_mapped", None)
        checked = mapped or ip
        if not allow_private and (not checked.is_global or checked.is_multicast):
            raise UnsafeTarget(f"{host} resolves to {checked}, a {_kind(checked)} address.")
        if text not in addresses:
            addresses.append(text)
    return addresses


def check_url(url: str, *, allow_private: bool, param: str = "url") -> str:
    """A webhook URL as given, once it is https (http too when private targets are allowed), has a
    host, and resolves only to public addresses.

    Raises:
        BadRequest: naming `param`.
    """
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise BadRequest(f"Invalid webhook URL: {exc}.", param=param) from None
    schemes = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in schemes:
        raise BadRequest(f"A webhook URL must be {' or '.join(schemes)}, not {parts.scheme or 'schemeless'}.",
                         param=param, code="invalid_url")
    if not parts.hostname:
        raise BadRequest("A webhook URL needs a host.", param=param, code="invalid_url")
    try:
        resolve(parts.hostname, port, allow_private=allow_private)
    except UnsafeTarget as exc:
        raise BadRequest(f"Webhook URL refused: {exc}", param=param, code="invalid_url") from None
    return url
