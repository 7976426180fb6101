"""Calling the model: the OpenAI-compatible client, the global limiter, headers, backoff."""
