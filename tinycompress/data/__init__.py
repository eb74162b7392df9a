"""Task data: the GLUE task table, reading the splits (TSV files or the hub), and turning text rows
into token ids and padded batches."""
