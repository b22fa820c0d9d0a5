"""Primitives shared below ``train``, ``eval`` and ``mitigation``: the collectives and the loss.

``core`` imports only ``data`` (``IGNORE``) from Keel, so any layer above it may use it.
"""
