"""Who is calling: page events only from pages a browser loaded, and the client's address
for the per-client limits.

Gradio's `api_visibility="private"` hides an event from /info and from gradio_client, but the
server still runs it for anyone who posts its fn_index to /gradio_api/queue/join (or its name
to /gradio_api/run, /call): the whole event table is in every visitor's /config. So the app
sets a signed, HttpOnly cookie whenever it serves a page's HTML, and `PageOnlyEvents` refuses a
private event without it (403). The public API endpoints (pages/api.py) need no cookie.

This stops scripts that call the page events as an API, not visitors: a script that loads a
page like a browser gets the cookie too. Page events therefore stay untrusted input (every value
they bring, the browser session included, is checked as a config is).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets

import gradio as gr
from gradio.context import LocalContext
from starlette.requests import cookie_parser

PAGE_COOKIE = "iet-page"
# Where Gradio runs events: the queue (by fn_index) and the direct routes (by name; /run and
# /api also accept an fn_index in the body, which then wins).
QUEUE_JOIN = re.compile(r"/gradio_api/queue/join/?$")
CALL_BY_NAME = re.compile(r"/gradio_api/(?:run|api|call|call/v2)/(?P<name>[^/]+)/?$")
MAX_EVENT_BODY = 1 << 20  # bytes read from a cookie-less call before deciding; an API call's JSON is far smaller
REFUSAL = json.dumps({"detail": "this event belongs to the app's pages and runs only from a page loaded in a "
                                "browser; scripts use the API endpoints listed under 'Use via API'."}).encode()


class PageOnlyEvents:
    """ASGI middleware in front of Gradio: signs a per-page-load cookie onto every HTML page it
    serves, and refuses (403) any call of an event that is not public unless it carries a valid
    one. `cross_site` (a Hugging Face Space, shown inside an iframe of huggingface.co): the cookie
    is `SameSite=None; Secure; Partitioned`, which browsers send from such an iframe; otherwise
    `SameSite=Strict`."""

    def __init__(self, app, blocks: gr.Blocks, key: str, cross_site: bool = False):
        self.app, self.blocks, self.key = app, blocks, key.encode()
        self.attributes = "Path=/; HttpOnly; " + ("SameSite=None; Secure; Partitioned" if cross_site
                                                  else "SameSite=Strict")

    def _sign(self, nonce: str) -> str:
        return hmac.new(self.key, nonce.encode(), hashlib.sha256).hexdigest()

    def _page_loaded(self, headers: list[tuple[bytes, bytes]]) -> bool:
        cookies = b"; ".join(value for name, value in headers if name == b"cookie").decode("latin-1")
        value = cookie_parser(cookies).get(PAGE_COOKIE, "")
        nonce, _, signature = value.partition(".")
        return bool(nonce) and hmac.compare_digest(signature, self._sign(nonce))

    def _public(self, path: str, body: bytes) -> bool:
        """Whether every function this call could run is a public API endpoint; anything
        that cannot be read as such counts as a page event."""
        try:
            fn_index = json.loads(body).get("fn_index")
        except (ValueError, AttributeError, RecursionError):  # not a JSON object
            return False
        fns = self.blocks.fns
        called = []
        if fn_index is not None:
            called.append(fns.get(fn_index) if isinstance(fn_index, int) else None)
        if (match := CALL_BY_NAME.search(path)) is not None:
            called.append(next((fn for fn in fns.values() if fn.api_name == match["name"]), None))
        return bool(called) and all(fn is not None and fn.api_visibility == "public" for fn in called)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if scope["method"] == "GET":
            return await self.app(scope, receive, self._with_cookie(send))
        is_event = scope["method"] == "POST" and (QUEUE_JOIN.search(path) or CALL_BY_NAME.search(path))
        if not is_event or self._page_loaded(scope["headers"]):
            return await self.app(scope, receive, send)
        messages, more, size = [], True, 0
        while more and size <= MAX_EVENT_BODY:  # read the body to see which event is called, then hand it on unchanged
            messages.append(await receive())
            size += len(messages[-1].get("body", b""))
            more = messages[-1]["type"] == "http.request" and messages[-1].get("more_body", False)
        # A body too large to be an event call is not buffered further: it counts as a page event.
        if size > MAX_EVENT_BODY or not self._public(path, b"".join(message.get("body", b"") for message in messages)):
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(REFUSAL)).encode())]})
            return await send({"type": "http.response.body", "body": REFUSAL})

        async def replay():
            return messages.pop(0) if messages else await receive()
        return await self.app(scope, replay, send)

    def _with_cookie(self, send):
        async def send_page(message):
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if headers.get(b"content-type", b"").startswith(b"text/html"):
                    nonce = secrets.token_urlsafe(16)
                    cookie = f"{PAGE_COOKIE}={nonce}.{self._sign(nonce)}; {self.attributes}"
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"set-cookie", cookie.encode("latin-1"))]}
            await send(message)
        return send_page


def client_address(request: gr.Request | None, proxy_hops: int = 0) -> str | None:
    """The address a request came from. Behind `proxy_hops` proxies (a Hugging Face Space: 1),
    each appends the address it saw to X-Forwarded-For, so the client is the one `proxy_hops`
    from the right (those further left are whatever the client sent); with fewer entries than
    that, the request did not come through the proxies and the connection's own address counts.
    None outside a request."""
    if request is None:
        return None
    if proxy_hops:
        forwarded = [part.strip() for part in ",".join(request.headers.getlist("x-forwarded-for")).split(",")
                     if part.strip()]
        if len(forwarded) >= proxy_hops:
            return forwarded[-proxy_hops]
    return request.client.host if request.client else None


def current_client(proxy_hops: int = 0) -> str | None:
    """The address of the client whose event is being handled (None outside an event)."""
    return client_address(LocalContext.request.get(None), proxy_hops)
