"""Adapters from external systems to the small Protocols the processors declare."""
