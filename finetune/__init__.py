"""kompakt.finetune."""
