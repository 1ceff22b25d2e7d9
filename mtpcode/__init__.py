"""mtpcode: fast local code completion with multi-token-prediction heads."""

__version__ = "0.1.0"
