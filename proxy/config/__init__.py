"""Settings, server options and logging: read once at start, validated, frozen."""
