"""A Granian worker: the app factory, its view of the environments, its caches and counters."""
