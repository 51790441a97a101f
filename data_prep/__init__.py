"""kompakt.data_prep."""
