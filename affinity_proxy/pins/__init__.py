"""Pin stores: the user key -> instance mapping shared by every worker (memory or Redis)."""
