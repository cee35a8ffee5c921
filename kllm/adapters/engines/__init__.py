"""Engines behind ``processors.inference.Engine``: llama.cpp, vLLM, any OpenAI-compatible server."""
