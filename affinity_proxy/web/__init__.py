"""The aiohttp shell around the pure core: request handlers, admin API, error mapping."""
