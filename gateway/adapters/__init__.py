"""Thin adapters around the gateway core: picows, Redis, Kafka, history HTTP."""
