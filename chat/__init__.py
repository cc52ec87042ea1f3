"""The chat service: consumes posts from Kafka `message.ingest`, stores each with
its per-room seq, and publishes the stored message event to `message.created`.

Layout: `chat.core` is pure (ids, validation), `chat.storage` holds the store
protocol and its backends, `chat.adapters` the Kafka pipeline and the history
HTTP API, `chat.app` wires them together (`run_chat`, `main`).
"""
