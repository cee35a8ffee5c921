"""Test doubles that run for real: the scripted OpenAI-compatible engine and drift streams."""
