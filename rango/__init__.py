"""Rango: a websocket gateway for exchanges (drop-in for Ranger and Go Rango)."""

__version__ = "0.1.0"
