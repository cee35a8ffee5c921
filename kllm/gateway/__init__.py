"""The OpenAI-compatible HTTP gateway: config, service (admission, publish, replies,
replay cache), routes and app, server, reply router, live streams, keys, dashboard."""
