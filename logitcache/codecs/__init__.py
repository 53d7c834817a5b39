"""Codecs for cached target rows (pure numpy math; the cache format does not use them yet).

``compact``: top-k class ids as an Elias-Fano coded set and quantised values, fixed bytes per row.
"""
