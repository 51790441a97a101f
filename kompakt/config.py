"""Typed, strict recipes.

A recipe is one complete YAML file with a section per stage (`data`, `tokenizer`, `model`,
`pretrain`, ...) plus `name` and `run_dir`. Every section is a pydantic model with
`extra="forbid"`: an unknown key or a wrong type stops at start-up with one line that names the
key and, for a misspelt key, the closest valid one. Overrides are dotted `key.sub=value`, their
values parsed as YAML scalars (`data.min_chars=20`, `data.languages=[nb,nn]`).

Each stage receives its own section (`recipe.data`), never the whole recipe.
"""

from __future__ import annotations

import difflib
import glob
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from kompakt.compress_config import CompressConfig
from kompakt.config_base import StrictModel
from kompakt.finetune_config import EvalConfig, FinetuneConfig
from kompakt.errors import ConfigError
from kompakt.languages import check_language
from kompakt.model_config import ModelConfig
from kompakt.pretrain_config import PretrainConfig
from kompakt.train_config import hashed_config, runtime_field


def _yaml_no(v):
    """YAML 1.1 reads an unquoted `no` (Norwegian) as false; turn it back so the error can say nb/nn."""
    return ["no" if x is False else x for x in v] if isinstance(v, list) else v


def _language_codes(v: list[str], key: str) -> list[str]:
    """Lower-cased ISO 639-1 codes; an unknown one fails at start-up (naming `key`), not after reading data."""
    codes = [str(x).strip().lower() for x in v]
    for code in codes:
        check_language(code, key=key)
    return codes


# ---------------------------------------------------------------------------------------------
# data_prep
# ---------------------------------------------------------------------------------------------


class DedupConfig(StrictModel):
    """Exact and MinHash-LSH near-duplicate removal."""

    exact: bool = True
    near: bool = True
    # Jaccard similarity of word shingles above which a later document is dropped as a near duplicate.
    jaccard_threshold: float = Field(0.8, gt=0.0, le=1.0)
    shingle_size: int = Field(5, ge=1, description="words per shingle")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    seed: int = 1


class DataConfig(StrictModel):
    """The `data` section: which raw files to read and how to clean them."""

    inputs: list[str] = Field(min_length=1, description="paths or globs, relative to the working directory")
    # txt: one document per blank-line-separated block ("paragraph") or per line ("line").
    txt_document: Literal["paragraph", "line"] = "paragraph"
    text_field: str = "text"
    id_field: str | None = None
    on_decode_error: Literal["skip", "fail"] = "fail"
    normalization: Literal["NFKC", "NFC", "none"] = "NFKC"
    lowercase: bool = False
    min_chars: int = Field(20, ge=0)
    max_chars: int = Field(1_000_000, ge=1)
    min_words: int = Field(3, ge=0)
    max_words: int = Field(200_000, ge=1)
    # Share of non-space characters that are letters; below it a document is markup or numbers.
    min_alpha_ratio: float = Field(0.6, ge=0.0, le=1.0)
    # Share of a document's lines that are repeats of another of its lines (boilerplate).
    max_repeated_line_ratio: float = Field(0.3, ge=0.0, le=1.0)
    languages: list[str] = Field(default_factory=list, description="ISO 639-1 codes to keep; empty keeps all")
    # Summed lingua confidence of `languages` a document needs (see data_prep/langid.py).
    langid_threshold: float = Field(0.5, ge=0.0, le=1.0)
    # lingua's high-accuracy mode separates Bokmål and Nynorsk in short text; low is about 3x faster.
    langid_accuracy: Literal["high", "low"] = "high"
    dedup: DedupConfig = DedupConfig()
    docs_per_shard: int = Field(50_000, ge=1)
    # Worker processes and the Slurm-array part to build: speed and scheduling, not content
    # (the output is byte-identical for any num_proc and num_shards; tested).
    num_proc: int = runtime_field(1, ge=1)
    shard_index: int | None = runtime_field(None, ge=0)
    num_shards: int = Field(1, ge=1)
    seed: int = 0

    @field_validator("languages", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        return _yaml_no(v)

    @field_validator("languages")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return _language_codes(v, "data.languages")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.shard_index is not None and self.shard_index >= self.num_shards:
            raise ValueError(f"data.shard_index={self.shard_index} must be below data.num_shards={self.num_shards}")
        if self.min_chars > self.max_chars:
            raise ValueError("data.min_chars must not exceed data.max_chars")
        return self


# ---------------------------------------------------------------------------------------------
# tokenization
# ---------------------------------------------------------------------------------------------


class TokenizerConfig(StrictModel):
    """The `tokenizer` section: train a tokenizer and pre-tokenise the corpus into packed shards."""

    kind: Literal["wordpiece", "unigram", "bpe"] = "wordpiece"
    # Rounded up to a multiple of 64 so the embedding and MLM-head matmuls tile well.
    vocab_size: int = Field(32_000, ge=64)
    # Special tokens of the model family (kompakt/families.py): bert ([CLS] [SEP] [MASK]...), albert, ...
    family: str = "bert"
    lowercase: bool = False
    strip_accents: bool = False
    min_frequency: int = Field(2, ge=1)
    # Chinese: character-level vocabulary plus a word lexicon for lattice models.
    chinese_chars: bool = False
    lexicon: str | None = Field(None, description="path to a word list, or 'jieba' for jieba's dictionary")
    lexicon_size: int = Field(50_000, ge=0)
    # Share of corpus documents held out for the tokenizer report (deterministic by document id).
    heldout_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    max_train_docs: int | None = Field(None, ge=1)
    model_max_length: int = Field(512, ge=8)
    docs_per_shard: int = Field(200_000, ge=1)
    num_proc: int = runtime_field(1, ge=1)

    @property
    def vocab_size_rounded(self) -> int:
        return (self.vocab_size + 63) // 64 * 64

    @model_validator(mode="after")
    def _check(self) -> TokenizerConfig:
        from kompakt import families

        if problem := families.unknown(self.family, "tokenizer.family"):
            raise ValueError(problem)
        # Character-level Chinese relies on BERT's normaliser putting spaces around CJK characters.
        if self.chinese_chars and self.kind != "wordpiece":
            raise ValueError("tokenizer.chinese_chars needs tokenizer.kind=wordpiece")
        if self.lexicon is not None and not self.chinese_chars:
            raise ValueError("tokenizer.lexicon is for Chinese; set tokenizer.chinese_chars=true or drop lexicon")
        return self


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------


class ReleaseConfig(StrictModel):
    """What a released model's card says about it (Hugging Face Hub metadata); not hashed.

    `language` defaults to `data.languages`. The data licence and attribution are the corpus's, for
    example "CC BY 4.0" and "Bokmålsordboka, Språkrådet and the University of Bergen".
    """

    language: list[str] = Field(default_factory=list, description="ISO 639-1 codes; empty: data.languages")
    license: str = Field("apache-2.0", description="the model's licence, as a Hub licence identifier")
    datasets: list[str] = Field(default_factory=list, description="Hub dataset ids or names of the corpora")
    data_license: str | None = None
    data_attribution: str | None = None
    tags: list[str] = Field(default_factory=list)

    @field_validator("language", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        return _yaml_no(v)

    @field_validator("language")
    @classmethod
    def _codes(cls, v: list[str]) -> list[str]:
        return _language_codes(v, "release.language")


class Recipe(StrictModel):
    """A complete recipe: one section per stage. Later issues add sections."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    run_dir: str = "runs"
    data: DataConfig
    tokenizer: TokenizerConfig | None = None
    model: ModelConfig | None = None
    pretrain: PretrainConfig | None = None
    compress: CompressConfig | None = None
    finetune: FinetuneConfig | None = None
    eval: EvalConfig | None = None
    release: ReleaseConfig = ReleaseConfig()

    def release_metadata(self) -> dict:
        """The release section with `language` filled from data.languages when left empty."""
        out = self.release.model_dump(mode="json")
        out["language"] = out["language"] or list(self.data.languages)
        return out

    def path(self, p: str) -> Path:
        """A path from the recipe: relative paths resolve against the working directory, as in any CLI."""
        return Path(p).expanduser()

    def resolve_inputs(self) -> list[Path]:
        """Expand `data.inputs` globs into sorted files; a pattern that matches nothing is an error."""
        files: list[Path] = []
        for pattern in self.data.inputs:
            full = str(self.path(pattern))
            matches = sorted(glob.glob(full, recursive=True)) if glob.has_magic(full) else [full]
            matches = [m for m in matches if Path(m).exists()]
            if not matches:
                raise ConfigError(f"data.inputs: {full} does not exist; check the path in the recipe")
            files.extend(Path(m) for m in matches)
        return files


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages
# ---------------------------------------------------------------------------------------------


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as a YAML scalar or flow list)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key.sub=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each dotted override into a nested dict (copied), creating sections as needed."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return out


def _model_for_loc(loc: tuple) -> type[BaseModel] | None:
    """Walk the Recipe's fields along an error location to the model that holds the last key."""
    model: type[BaseModel] = Recipe
    for key in loc[:-1]:
        field = model.model_fields.get(str(key))
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: the dotted key, what is wrong and the closest valid key."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(x) for x in loc) or "<recipe>"
        if e["type"] == "extra_forbidden":
            parent = _model_for_loc(loc)
            valid = list(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?" if close else ""
            lines.append(f"{source}: unknown key {key}{hint} (valid keys here: {', '.join(valid)})")
        elif e["type"] == "missing":
            lines.append(f"{source}: missing required key {key}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{source}: {key}: {e['msg']}{got_s}")
    return "\n".join(lines)


def validate_recipe(raw: dict, source: str = "recipe") -> Recipe:
    """Validate a raw dict into a Recipe, turning pydantic's report into ConfigError lines."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a recipe must be a YAML mapping with name, run_dir and sections")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML, apply dotted overrides and validate it strictly."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist; pass the path of a YAML file such as recipes/demo-nb.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"recipe {path} is not valid YAML: {first}") from None
    raw = apply_overrides(raw or {}, overrides or [])
    return validate_recipe(raw, source=str(path))


def section_dict(section: BaseModel | None) -> dict:
    """A section as plain JSON-able data, for writing the resolved config."""
    return {} if section is None else section.model_dump(mode="json")


def section_hash_dict(section: BaseModel | None) -> dict:
    """What of a section goes into its stage hash: all but run control and runtime fields."""
    return hashed_config(section)
