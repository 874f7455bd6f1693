"""The two data planes of the main listener. Both parse, move bytes and call the engine-neutral
``affinity_proxy.proxy`` and pure ``affinity_proxy.routing`` code; neither imports the other."""
