"""The wire contract in code (docs/PROTOCOL.md). Pure: no I/O imports."""
