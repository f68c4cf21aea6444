"""The staff page (DESIGN §16): the site from a browser, on its own port.

Server-rendered forms that work without script; a few lines of script for
the live log (Server-Sent Events). Every asset is served from this package.
"""
