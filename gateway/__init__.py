"""The roomcast WebSocket gateway: sockets, rooms, Redis fan-out, Kafka relay."""
