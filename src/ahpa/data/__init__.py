"""Image sources, deterministic data order and (later) prepared caches."""
