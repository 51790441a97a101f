"""kompakt.compress."""
