"""Who may ask the UI anything: the checks every request passes before it reaches an endpoint (docs/ui.md, Security).

A loopback port is reachable by every page the browser runs, and cookies are shared by every port of a host: a page
on http://127.0.0.1:7999 sends the UI's cookie with its requests. So a cookie proves nothing about who asks. These
checks do, each against a known attack on local web UIs:
- DNS rebinding: a foreign name made to resolve to 127.0.0.1 arrives with its own name as Host; only this server's
  own names and addresses are answered.
- Cross-site requests: a request that changes anything must carry the token in the X-Token header, which only the
  UI's own script sets (a form or an image of another page cannot), and come from the UI's own origin (Origin and
  Sec-Fetch-Site, where the browser sends them; `Origin: null` is foreign too). Another page may link to the UI,
  but not embed its images, frames or data.
"""

from __future__ import annotations

import ipaddress
import secrets

from starlette.requests import Request

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARDS = frozenset({"", "0.0.0.0", "::"})
SAFE_METHODS = frozenset({"GET", "HEAD"})
SECURITY_HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'",
                    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"}
"""Sent with every answer: no other page may frame the UI (and trick a click), nothing served is sniffed into HTML,
and the token in a page's URL goes to no other site as a Referer (same-origin, not no-referrer, which would make
the page's own requests say `Origin: null`)."""


class Guard:
    """The checks for a UI bound to `host`, with `token` (None only for an app built without one, as in tests)."""

    def __init__(self, host: str = "127.0.0.1", token: str | None = None):
        self.host = host.strip("[]").lower()
        self.token = token

    def host_allowed(self, name: str) -> bool:
        """This machine's loopback names and the address it was bound to; bound to every interface, any IP
        address (an address cannot be rebound to another machine, a name can)."""
        name = name.strip("[]").lower()
        if name in LOOPBACK_NAMES or name == self.host:
            return True
        return self.host in WILDCARDS and _is_address(name)

    def refusal(self, request: Request) -> str | None:
        """Why this request is refused, or None."""
        name = request.url.hostname or ""
        if not self.host_allowed(name):
            return (f"refused Host {name!r}: this UI answers only to its own address "
                    f"({', '.join(sorted(LOOPBACK_NAMES | {self.host} - WILDCARDS))})")
        foreign = self._foreign_page(request)
        if foreign:
            return foreign
        if self.token and not secrets.compare_digest(self._given_token(request).encode(), self.token.encode()):
            # as bytes: compare_digest refuses str with non-ASCII characters (a 500 for any ?token=é)
            if request.method not in SAFE_METHODS and request.headers.get("x-token") is None:
                return "refused: a change needs the token in the X-Token header, which only the UI's own page sends"
            return "a token is needed: open the URL the UI printed"
        return None

    def _foreign_page(self, request: Request) -> str | None:
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
        if origin is not None and origin.lower() != own:
            return f"refused a request from {origin}: only the UI's own page may use it"
        site = request.headers.get("sec-fetch-site")
        if request.method not in SAFE_METHODS:
            if site not in (None, "same-origin"):
                return f"refused a {site} request: only the UI's own page may change anything"
        elif site in ("same-site", "cross-site") and not _navigation(request):
            return f"refused a {site} request: only the UI's own page may load its data and images"
        return None

    def _given_token(self, request: Request) -> str:
        """A change proves itself with the header alone; a page load, an image or a download also with the URL's
        ?token= or the cookie the printed URL set."""
        if request.method not in SAFE_METHODS:
            return request.headers.get("x-token") or ""
        return (request.headers.get("x-token") or request.query_params.get("token")
                or request.cookies.get(cookie_name(request)) or "")


def _navigation(request: Request) -> bool:
    """A link followed to the UI from elsewhere: allowed, as a page of its own (not a frame)."""
    return request.headers.get("sec-fetch-mode") == "navigate" and \
        request.headers.get("sec-fetch-dest") in (None, "document")


def cookie_name(request: Request) -> str:
    """One per port: two UIs on one host (7860 and 7861) would otherwise overwrite each other's cookie."""
    return f"dreambooth_moslora_token_{request.url.port or 80}"


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    return host == "localhost" or (_is_address(host) and ipaddress.ip_address(host).is_loopback)


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
