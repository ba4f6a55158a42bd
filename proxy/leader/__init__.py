"""The leader process and what it runs: polling, discovery, refreshes, snapshots, forwarding counts upstream."""
