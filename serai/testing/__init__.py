"""Tools for testing and benchmarking Serai: a mock OpenAI-compatible upstream."""
