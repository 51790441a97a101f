"""kompakt: pretraining compact, language-specific encoder models."""
__version__ = "0.1.0"


def register_hf() -> None:
    """Register Lattice-BERT ("lattice-bert") with transformers' AutoConfig/AutoModel/AutoModelForMaskedLM.

    Explicit and idempotent: call it once before `AutoModel.from_pretrained` on an exported
    Lattice-BERT folder. The stock families (BERT, ALBERT) need nothing: they are transformers' own.
    kompakt's own loaders and exporters call it themselves.
    """
    from kompakt import hf_lattice

    hf_lattice.register()
