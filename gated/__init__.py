"""gated: a gate controller for VoIPGRID/Voys phone webhooks."""

__version__ = "0.1.0"
