"""The broker: the connection, the site's bridge (events, opens), its channels for codes,
code sets and routes, and Home Assistant discovery. Imports ``gated.site`` and below.
"""
