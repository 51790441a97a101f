"""kompakt: pretraining compact, language-specific encoder models."""
__version__ = "0.1.0"
