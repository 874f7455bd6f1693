"""The admin listener's application: the token-guarded JSON API (``api``) and the dashboard (``dashboard``).

Served by aiohttp on ``admin_listen`` whichever engine runs the main listener."""
