"""The security headers on every answer of the gateway: page, API, files and errors.

The Content-Security-Policy lets the page and `/docs` load scripts, styles, images and data
from this gateway only, and nothing frame them. Two exceptions, each as narrow as it can be:
the drawn graph's SVG carries its own `<style>` (allowed by its hash, not by
`'unsafe-inline'`), and images may be `data:` URLs (the page's empty favicon, the icons in
Swagger UI's stylesheet; an image runs no code).
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.observe.drawing import render_graph

__all__ = ["SecurityHeaders", "content_security_policy"]


@cache
def content_security_policy() -> str:
    """Return the gateway's Content-Security-Policy."""
    return "; ".join(
        [
            "default-src 'self'",
            "script-src 'self'",
            f"style-src 'self' {_svg_style_source()}",
            "img-src 'self' data:",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )


def _svg_style_source() -> str:
    """Return the CSP source of the drawn graph's `<style>`: the hash of what is served."""
    found = re.search(r"<style>(.*?)</style>", render_graph("svg"), re.DOTALL)
    assert found is not None, "the drawn graph has no <style>"
    digest = hashlib.sha256(found.group(1).encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


class SecurityHeaders:
    """ASGI middleware: add the security headers to every HTTP answer that lacks them."""

    def __init__(self, app: ASGIApp) -> None:
        """Wrap `app`."""
        self.app = app
        self.headers = {
            "Content-Security-Policy": content_security_policy(),
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            # The stream's URL may carry ?access_token=: never send it anywhere.
            "Referrer-Policy": "no-referrer",
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; add the headers when the answer starts."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.headers.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
