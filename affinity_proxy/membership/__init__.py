"""Membership: which instances exist and what state each is in, published as immutable snapshots."""
