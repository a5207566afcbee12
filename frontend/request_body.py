"""A request's JSON body, decoded into its msgspec struct: media type, Content-Encoding, size."""

from __future__ import annotations

import zlib
from typing import TypeVar

import msgspec
from aiohttp import hdrs, web

from frontend.errors import (
    APIError,
    from_decode_error,
    undecodable_body,
    unsupported_content_encoding,
    unsupported_media_type,
)

T = TypeVar("T")

# The Content-Encodings a request body may have, with their zlib window bits (None: as is).
# aiohttp's own decoding is off (api_server.build_app): its errors bypass the middlewares, in plain text.
BODY_ENCODINGS: dict[str, int | None] = {"identity": None, "gzip": 16 + zlib.MAX_WBITS,
                                         "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


async def decode_body(request: web.Request, type_: type[T]) -> T:
    """The body as a `type_`; a 4xx naming what is wrong with it otherwise."""
    # JSON bodies only: a web page can make a browser POST a text/plain, form or multipart
    # body to a server on localhost without a CORS preflight, but never an application/json one.
    if request.content_type != "application/json":
        raise unsupported_media_type(request.headers.get(hdrs.CONTENT_TYPE))
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
    if encoding not in BODY_ENCODINGS:
        raise unsupported_content_encoding(encoding, list(BODY_ENCODINGS))
    body = await request.read()  # raises 413 beyond the app's client_max_size
    wbits = BODY_ENCODINGS[encoding]
    if wbits is not None:
        body = _decompress(body, wbits, encoding, request.client_max_size)
    try:
        return msgspec.json.decode(body, type=type_)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        raise from_decode_error(e, body) from None


def _decompress(body: bytes, wbits: int, encoding: str, max_size: int) -> bytes:
    # Bounded: a few kilobytes of a compressed body can inflate to gigabytes.
    decompressor = zlib.decompressobj(wbits)
    try:
        data = decompressor.decompress(body, max_size + 1)
    except zlib.error as e:
        raise undecodable_body(encoding, str(e)) from None
    if len(data) > max_size:
        raise APIError(413, f"The request body is larger than {max_size} bytes once decompressed.")
    if not decompressor.eof or decompressor.unused_data:
        raise undecodable_body(encoding, "it does not end where the body ends")
    return data
