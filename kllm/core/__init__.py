"""The bottom layer: errors and record references.

schemas/, topics/ and processors/ may import this package and nothing else of
the project's library.
"""
