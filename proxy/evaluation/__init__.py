"""Flag evaluation without HTTP: the document mapped, segments compiled, flag-engine as the fallback."""
