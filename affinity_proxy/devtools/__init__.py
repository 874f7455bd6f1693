"""Development and test tooling, not part of the proxy's request path: the Fly edge stand-in
(``fly``) and the demo instances (``demo``)."""
