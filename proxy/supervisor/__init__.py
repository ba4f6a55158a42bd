"""The main process: embeds Granian, owns the shared-memory area, supervises the leader."""
