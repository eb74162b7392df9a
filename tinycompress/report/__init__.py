"""The comparison report of a chain: its rows, measuring their latency, and the table, files and
plots it is shown as."""
