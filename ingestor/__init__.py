"""ingestor: deliver usage events from Kafka to Stripe's meter event stream, exactly once."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ingestor")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]
