"""apple-video: APPLE face swapping for video."""

__version__ = "0.1.0"
