"""Reading and cutting documents: sources, token-aware chunking, batching."""
