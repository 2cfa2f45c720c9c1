"""Engines: what turns a neutral generation request into text."""
