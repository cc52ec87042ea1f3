"""The gateway's sans-I/O core: no asyncio, picows, redis or aiokafka imports.

Every input is a method call with the time passed in; every output is a value
the adapters turn into writes, SUBSCRIBEs and produces.
"""
