"""The validated settings, handed by the main process to the leader and the workers as a private file in
the area (`settings.json`, mode 0600 from its creation).

Not an environment variable: Linux refuses one past 128 KiB (about 1,400 key pairs: the leader's exec failed
with E2BIG, forever), and every child's environment would carry the keys. Read back with
`model_validate_json`, which checks the values again but reads no environment variable or config file:
every process runs exactly what the main process validated. JSON, not pickle: readable, and no code.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from proxy.area.control import AreaError, full_message
from proxy.area.names import SETTINGS, temporary
from proxy.config.settings import Settings


def write_settings(area: Path, settings: Settings) -> None:
    tmp = temporary(area / SETTINGS)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the umask can only narrow it
        with os.fdopen(fd, "wb") as out:
            out.write(settings.model_dump_json().encode())
        os.replace(tmp, area / SETTINGS)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise AreaError(full_message(area)) from None
        raise AreaError(f"cannot write the settings to {area}: {exc}") from None


def read_settings(area: Path) -> Settings:
    return Settings.model_validate_json((area / SETTINGS).read_bytes())
