"""The chat service's I/O: the Kafka ingest pipeline (kafka.py) and the history HTTP API (http.py)."""
