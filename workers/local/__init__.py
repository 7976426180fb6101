"""What runs on one machine with nothing but Python: the embedded Redis and the local model."""
