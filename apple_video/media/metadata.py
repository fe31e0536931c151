"""The synthetic-media tag written into every output."""

from __future__ import annotations

from apple_video import __version__

SYNTHETIC_KEY = "comment"


def synthetic_tag() -> str:
    return f"SYNTHETIC MEDIA: face swapped with AI by apple-video {__version__}"


def is_synthetic_tag(text: str | None) -> bool:
    return bool(text) and text.startswith("SYNTHETIC MEDIA")


def comment_of(metadata: dict[str, str]) -> str | None:
    """The comment tag of a container's metadata, whatever case the container uses for keys (mkv: COMMENT)."""
    for key, value in metadata.items():
        if key.lower() == SYNTHETIC_KEY:
            return value
    return None
