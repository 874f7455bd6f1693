"""Pure routing core: stdlib and uhashring only. No aiohttp, redis, asyncio or other I/O.

A test imports this package in a subprocess and checks that nothing else was loaded.
"""
