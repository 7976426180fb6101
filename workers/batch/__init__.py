"""One batch delivery: processing under chunk leases, the result writer, the cache, the guard."""
