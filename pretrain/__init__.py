"""kompakt.pretrain."""
