"""Retrieval ports: the embedder, the Qdrant stores (server and Edge) and document files."""
