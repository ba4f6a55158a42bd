"""The cross-process contract: the shared-memory area, what is published in it and what is handed back."""
