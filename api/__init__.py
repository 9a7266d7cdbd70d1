"""The payments-report HTTP API (Falcon, ASGI)."""
