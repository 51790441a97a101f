"""kompakt: pretraining compact, language-specific encoder models."""
__version__ = "0.1.0"


def _register_lattice_bert() -> None:
    """Register Lattice-BERT with transformers' Auto classes (kompakt/hf_lattice.py)."""
    try:
        from kompakt import hf_lattice
    except ImportError:  # transformers or torch missing: nothing to register with
        return
    hf_lattice.register()


def _register_when_transformers_loads() -> None:
    """Make `import kompakt` register "lattice-bert" with AutoConfig/AutoModel/AutoModelForMaskedLM.

    Importing transformers' model classes takes seconds, which every `kompakt` command would pay; so
    when transformers is not loaded yet, registration runs right after its first import instead.
    A missing transformers leaves `import kompakt` working.
    """
    import importlib.abc
    import importlib.machinery
    import sys

    if "transformers" in sys.modules:
        _register_lattice_bert()
        return

    class _AfterTransformers(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "transformers":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                _register_lattice_bert()

            spec.loader.exec_module = exec_then_register
            return spec

    sys.meta_path.insert(0, _AfterTransformers())


_register_when_transformers_loads()
