"""What Serai tells its operators: metrics, traces, request logs, live traffic, and the redaction
that keeps keys out of them."""
