"""Credentials from files: the config, the compiled code book, codes, routes, keys and
code sets. Imports only ``gated.core``.
"""
