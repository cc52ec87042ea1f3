"""roomcast: real-time chat fan-out over Kafka and Redis pub/sub."""

__version__ = "0.1.0"
