"""An OpenAI `image_url` -> a PIL image, refusing what a server must not fetch or decode.

  data:image/...;base64,...   decoded (strict base64), at most `max_bytes`
  http(s)://host/...          only when host is in --allowed-media-domains (exact names), and only
                              when every address the name resolves to is public: loopback, private,
                              link-local, multicast and reserved addresses are refused, and the
                              connection goes to the address that was checked (no DNS rebinding
                              between the check and the fetch). Redirects are not followed.
  anything else (file://, ftp://, a bare path)  refused

Every refusal is a MediaError carrying the HTTP status the server answers with (400, or 413 over
a size limit) and a message naming the URL's field."""
from __future__ import annotations

import base64
import binascii
import dataclasses
import http.client
import io
import ipaddress
import socket
import ssl
import urllib.parse

from PIL import Image, UnidentifiedImageError

from mmjax.errors import InputError

__all__ = ["MediaError", "MediaLimits", "load_image"]


class MediaError(InputError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class MediaLimits:
    max_bytes: int = 20 * 2**20  # encoded image size (vLLM's default fetch limit is similar)
    max_pixels: int = 64_000_000  # width * height, checked from the header before decoding
    timeout_s: float = 10.0  # connect + read, for http(s)
    allowed_domains: tuple[str, ...] = ()  # exact host names; empty = data: URLs only


def load_image(url: str, limits: MediaLimits, field: str = "image_url") -> Image.Image:
    """Decode (data:) or fetch (http/https from an allowed host) one image, fully loaded, RGB or as stored."""
    if not isinstance(url, str) or not url:
        raise MediaError(f"{field}: expected a non-empty URL string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _data_url(url, limits, field)
    elif scheme in ("http", "https"):
        data = _fetch(url, limits, field)
    else:
        raise MediaError(f"{field}: scheme {scheme or '(none)'!r} is not served; use a data: URL or http(s) "
                         "from an allowed domain")
    return _decode(data, limits, field)


def _data_url(url: str, limits: MediaLimits, field: str) -> bytes:
    head, sep, payload = url[5:].partition(",")
    if not sep:
        raise MediaError(f"{field}: a data: URL needs a ',' before its payload")
    parts = head.split(";")
    if parts[0] and not parts[0].lower().startswith("image/"):
        raise MediaError(f"{field}: data: URL has media type {parts[0]!r}, not image/*")
    if "base64" not in (p.lower() for p in parts[1:]):
        raise MediaError(f"{field}: data: URL must be base64-encoded (data:image/png;base64,...)")
    if len(payload) * 3 // 4 > limits.max_bytes:  # before decoding: do not allocate an oversized image
        raise MediaError(f"{field}: image of about {len(payload) * 3 // 4} bytes is over the limit of "
                         f"{limits.max_bytes} bytes", status=413)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"{field}: bad base64 in data: URL ({e})") from None


def _public_address(host: str, port: int, field: str) -> str:
    """The first address of `host`, after checking that every address it resolves to is public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise MediaError(f"{field}: cannot resolve host {host!r} ({e})") from None
    addrs = [info[4][0] for info in infos]
    for a in addrs:
        ip = ipaddress.ip_address(a.split("%", 1)[0])
        if not ip.is_global or ip.is_multicast:  # loopback, private, link-local, reserved, unspecified
            raise MediaError(f"{field}: host {host!r} resolves to {a}, a non-public address; refused")
    return addrs[0]


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address, with the host name still used for SNI and the certificate."""

    def __init__(self, host: str, address: str, **kw):
        super().__init__(host, **kw)
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, address: str, **kw):
        super().__init__(host, **kw)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


def _fetch(url: str, limits: MediaLimits, field: str) -> bytes:
    u = urllib.parse.urlsplit(url)
    host = (u.hostname or "").lower()
    if not host:
        raise MediaError(f"{field}: URL has no host")
    if host not in limits.allowed_domains:
        raise MediaError(f"{field}: host {host!r} is not in --allowed-media-domains "
                         f"({', '.join(limits.allowed_domains) or 'none: only data: URLs are served'})")
    https = u.scheme.lower() == "https"
    port = u.port or (443 if https else 80)
    address = _public_address(host, port, field)
    kw = {"port": port, "timeout": limits.timeout_s}
    conn = (_PinnedHTTPS(host, address, context=ssl.create_default_context(), **kw) if https
            else _PinnedHTTP(host, address, **kw))
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    try:
        conn.request("GET", path, headers={"User-Agent": "mmjax-serve", "Accept": "image/*"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise MediaError(f"{field}: {host} answered HTTP {resp.status} (redirects are not followed)")
        length = resp.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > limits.max_bytes:
            raise MediaError(f"{field}: image of {length} bytes is over the limit of {limits.max_bytes} bytes",
                             status=413)
        data = resp.read(limits.max_bytes + 1)
    except (OSError, http.client.HTTPException) as e:
        raise MediaError(f"{field}: fetching from {host} failed ({type(e).__name__}: {e})") from None
    finally:
        conn.close()
    if len(data) > limits.max_bytes:
        raise MediaError(f"{field}: image is over the limit of {limits.max_bytes} bytes", status=413)
    return data


def _decode(data: bytes, limits: MediaLimits, field: str) -> Image.Image:
    if len(data) > limits.max_bytes:
        raise MediaError(f"{field}: image of {len(data)} bytes is over the limit of {limits.max_bytes} bytes",
                         status=413)
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > limits.max_pixels:  # from the header: refuse before decoding a pixel bomb
            raise MediaError(f"{field}: image of {w}x{h} pixels is over the limit of {limits.max_pixels} pixels",
                             status=413)
        img.load()
    except MediaError:
        raise
    except UnidentifiedImageError:
        raise MediaError(f"{field}: not an image (no format PIL reads: PNG, JPEG, WebP, GIF, ...)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"{field}: not a readable image ({type(e).__name__}: {e})") from None
    return img
