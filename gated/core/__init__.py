"""Pure rules: decide() and what it decides with. Imports nothing of gated's but itself,
and neither aiohttp, gpiozero nor paho.
"""
