"""How secrets are shown: keys cut to a few characters, URLs with their credentials masked, Granian's
secret options hidden. Used wherever a key or URL reaches a log, /proxy/status, health, metrics or check-config."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from proxy.config.sections import SERVER_KEY_PREFIX


def mask_key(key: str) -> str:
    """Enough of a key to tell keys apart in logs, never enough to use it."""
    prefix = SERVER_KEY_PREFIX if key.startswith(SERVER_KEY_PREFIX) else ""
    rest = key[len(prefix) :]
    if len(rest) <= 6:
        return prefix + "***"
    return f"{prefix}{rest[:2]}…{rest[-2:]}"


# Query or fragment parameters whose value is a credential, by any name a client library uses
# (`password`, `sentinel_password`, `access_token`, `api_key`, `X-Amz-Signature`, `auth`…): over-masking
# a harmless one costs nothing, printing a secret cannot be undone.
_SECRET_PARAMETER = re.compile(r"pass|pwd|token|secret|key|auth|sig|credential", re.IGNORECASE)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*[^\s'\"<>.,;:)]")


def mask_url(url: str) -> str:
    """A URL safe to show: user-info (`user:pw@`, `:pw@`, `token@`) → `***@`, and the value of every
    credential-like query or fragment parameter → `***`. What carries no credential is left as written."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not parseable (e.g. an unclosed IPv6 bracket): show none of it
        return "***"
    netloc = "***@" + parts.netloc.rsplit("@", 1)[1] if "@" in parts.netloc else parts.netloc
    masked = parts._replace(
        netloc=netloc, query=_mask_parameters(parts.query), fragment=_mask_parameters(parts.fragment)
    )
    return url if masked == parts else urlunsplit(masked)


def _mask_parameters(text: str) -> str:
    if "=" not in text:
        return text
    pieces = []
    for piece in text.split("&"):
        name, equals, _ = piece.partition("=")
        pieces.append(f"{name}=***" if equals and _SECRET_PARAMETER.search(unquote_plus(name)) else piece)
    return "&".join(pieces)


def mask_urls_in(text: str) -> str:
    """`text` (an exception's message, say) with every URL in it masked by `mask_url`."""
    return _URL_IN_TEXT.sub(lambda match: mask_url(match.group()), text)


SECRET_GRANIAN_OPTIONS = ("ssl_keyfile_password",)


def masked_options(options: dict[str, Any]) -> dict[str, Any]:
    return {key: ("***" if key in SECRET_GRANIAN_OPTIONS and value else value) for key, value in options.items()}
