"""The aiohttp engine (``engine: aiohttp``): request handler, connection guards, upstream client."""
