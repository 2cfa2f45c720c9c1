"""Metering: what a request may use, what it holds while it runs, and what it is billed (base.py
states the seam)."""
