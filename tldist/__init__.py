"""tldist: distributed transfer learning for vision models."""

__version__ = "0.1.0"
