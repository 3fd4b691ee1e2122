"""Text that is safe to show: file names on a terminal, URLs without their secrets."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
#: Query parameters that carry a secret (``?password=...`` is how libpq and redis-py take one).
_SECRET_KEYS = re.compile(r"pass|pwd|secret|token|key|auth|credential", re.IGNORECASE)


def printable(text: str) -> str:
    """A file name made safe for a terminal: control characters shown as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def agree(n: int, one: str, many: str) -> str:
    """``one`` when ``n`` is 1, else ``many``: a noun or a verb that agrees with a count."""
    return one if n == 1 else many


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``1 image``, ``2 images``, ``1,024 images``: a count and its noun, agreeing."""
    return f"{n:,} {agree(n, noun, nouns or noun + 's')}"


def mask_url(url: object) -> str:
    """The URL with every password replaced by ``***``: the only form ever printed or logged.

    The password is whatever lies between the first ``:`` of the user part and the *last*
    ``@`` before the host, so an unescaped ``@``, ``#`` or ``/`` in it is masked too; query
    parameters that name a secret are masked as well. A URL that cannot be taken apart is not
    echoed at all.
    """
    text = url.render_as_string(hide_password=False) if hasattr(url, "render_as_string") else url
    if not isinstance(text, str):
        return "<not a URL>"
    scheme, sep, rest = text.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        return "<a URL that cannot be parsed: it must start with SCHEME://>"
    # the authority ends at the first '/', '?' or '#' after the last '@' (a password may hold
    # any of them unescaped)
    at = rest.rfind("@")
    tail_start = at + 1 if at >= 0 else 0
    m = re.search(r"[/?#]", rest[tail_start:])
    authority_end = tail_start + m.start() if m else len(rest)
    authority, tail = rest[:authority_end], rest[authority_end:]
    if at >= 0:
        userinfo, host = authority[:at], authority[at + 1 :]
        user, colon, _password = userinfo.partition(":")
        authority = f"{user}:{MASK}@{host}" if colon else f"{user}@{host}"
    try:
        parts = urlsplit(f"{scheme}://x{tail}")
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return f"{scheme}://{authority}<the rest cannot be parsed>"
    if any(_SECRET_KEYS.search(k) for k, _ in query):
        masked = [(k, MASK if _SECRET_KEYS.search(k) else v) for k, v in query]
        tail = urlunsplit(("", "", parts.path, urlencode(masked, safe="*"), parts.fragment))
    return f"{scheme}://{authority}{tail}"


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")


def mask_urls_in(text: str) -> str:
    """``text`` with every URL in it masked by :func:`mask_url`."""
    return _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, any URL in it masked; its type's name when
    the message is empty."""
    lines = str(e).strip().splitlines()
    return mask_urls_in(lines[0]) if lines else type(e).__name__
