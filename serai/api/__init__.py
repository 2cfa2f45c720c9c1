"""Wire protocols: parse requests into neutral types, render neutral results back."""
