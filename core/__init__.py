"""What every part of dyn shares: dataset I/O, text extraction, run records, embeddings, progress."""
