"""Adapters that let other agent frameworks run their commands on arservice (see each module)."""
