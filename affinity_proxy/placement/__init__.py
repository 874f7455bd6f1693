"""Placement at run time (issue #14): the live-session snapshot bounded-load placement reads, and the
leader-only rebalancer. The decisions themselves are pure, in ``routing.placement`` and
``routing.rebalance``."""
