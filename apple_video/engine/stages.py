"""The job folder's JSON writes (manifest, analysis records), atomic."""

from __future__ import annotations

import json
from pathlib import Path

from apple_video.media.paths import atomic_write


def write_json(path: Path, data: object) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data))
