"""The OpenAI-compatible HTTP gateway: app, routes, reply router, live streams, keys,
dashboard."""
