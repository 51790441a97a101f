"""kompakt.eval."""
