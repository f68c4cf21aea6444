"""The command line's commands (``gated codes``, ``routes``, ``forward``, ``doctor``):
each floor below may serve them; ``gated.cli`` builds the parser.
"""
