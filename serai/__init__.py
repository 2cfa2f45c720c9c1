"""Serai: a self-hosted Model-as-a-Service platform."""

__version__ = "0.1.0"
