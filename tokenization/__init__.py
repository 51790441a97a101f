"""kompakt.tokenization."""
