"""Primitives shared below ``train``, ``eval`` and ``mitigation``: the collectives, the loss, a worker's place.

``core`` imports only ``data`` (``IGNORE``) and ``errors`` from Keel, so any layer above it may use it.
"""
