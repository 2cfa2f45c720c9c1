"""Test helpers shared across test modules."""
