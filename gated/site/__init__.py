"""The running daemon's own parts: the entry store, the gatekeeper, logs, metrics,
sensors, alarms, and the ports its adapters fill. Imports ``gated.book`` and below.
"""
