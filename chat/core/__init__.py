"""The pure core of the chat service: no asyncio, Kafka, database or socket imports.

Time is always an argument (`now_ms`), never read here.
"""
