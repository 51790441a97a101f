"""Model definitions: torch only; transformers only inside kompakt/hf.py."""
