"""Engine-neutral request handling both engines use: the shared context, route input, fly signals,
session-check, header and forwarding rules, connection caps, error bodies."""
