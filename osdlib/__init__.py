"""osdlib: the small library behind the runnable book on one-step generative models."""

__version__ = "0.1.0"
