"""Accept-Encoding read as RFC 9110 §12.5.3 says (before: `gzip;q=0.5` and `gzip; q=0.8` were refusals,
`GZIP;q=0` an acceptance)."""

from __future__ import annotations

import pytest

from proxy.http.responses import gzip_acceptable


@pytest.mark.parametrize(
    ("header", "gzip"),
    [
        (b"gzip", True),
        (b"gzip, deflate, br", True),
        (b"gzip, deflate, br, zstd", True),
        (b"GZIP", True),
        (b"x-gzip", True),
        (b"gzip;q=0.5", True),
        (b"gzip; q=0.8", True),
        (b"gzip ; Q=1.000", True),
        (b"deflate, gzip;q=1.0, *;q=0.5", True),
        (b"br;q=1.0, gzip;q=0.8, *;q=0.1", True),
        (b"*", True),
        (b"*;q=0.1", True),
        (b"identity;q=0.5, gzip", True),
        (b"", False),
        (b"identity", False),
        (b"br, deflate", False),
        (b"gzip;q=0", False),
        (b"gzip; q=0.000", False),
        (b"GZIP;q=0", False),
        (b"Gzip; Q=0", False),
        (b"*;q=0", False),
        (b"gzip;q=0, *", False),  # gzip's own weight wins over `*`
        (b"*, gzip;q=0", False),
        (b"gzip;q=0.5, identity", False),  # identity preferred
        (b"gzip;q=0.5, *", False),  # identity through `*`, preferred
        (b"gzip;q=1.5", False),  # a malformed weight: the element is ignored
        (b"gzip;q=abc", False),
        (b"gzip;q=0.5000", False),
        (b"gzipx, xgzip", False),
        (b"gzip;q=0.5, gzip;q=0", True),  # the first element for a coding counts
    ],
)
def test_accept_encoding(header: bytes, gzip: bool) -> None:
    assert gzip_acceptable(header) is gzip
