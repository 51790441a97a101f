"""The stages, declared: each is its recipe section, its upstream stages and its body.

`kompakt run`, the per-stage CLI commands and the stage directories all follow from `STAGES`:
a stage's directory is `<run_dir>/<name>-<hash>/`, the hash covering its section (less run control
and runtime fields, see kompakt/train_config.py) and its upstream stages' hashes. Running a stage
first ensures its upstream stages (skipped when complete), each resolved and reported once per
command. A new stage (compress, finetune, eval, infer) is one `Stage(...)` entry here plus its
package; stage bodies live in the stage packages, receive their own sections and input folders,
and never see the recipe.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kompakt.config import Recipe, section_hash_dict
from kompakt.errors import ConfigError
from kompakt.log import info
from kompakt.runs import artifact_digests, file_fingerprint, is_complete, open_stage, stage_dir


def _hash_of(stage_dir_: Path) -> str:
    """The hash part of a `<stage>-<hash>` directory name (the same as its manifest's `hash`)."""
    return stage_dir_.name.rsplit("-", 1)[1]


def _body(ref: str) -> Callable:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    `sections` are the recipe sections it reads (the first turns it on); `upstream` the stages whose
    outputs it reads; `body` a "module:function" called as `body(pipeline, stage, directory,
    config, inputs, force)` by `Pipeline.ensure`; `in_place` stages (training) use their directory
    in place so checkpoints survive kills, the others are built atomically by `open_stage`.
    """

    name: str
    sections: tuple[str, ...]
    upstream: tuple[str, ...]
    body: str
    help: str
    description: str = ""
    in_place: bool = False
    raw_inputs: bool = False  # hashes the recipe's input files rather than upstream stages
    # "module:function(recipe) -> (extra upstream stages, extra inputs)": what the recipe adds, e.g.
    # compress reads the pretrain stage only when its teacher is this recipe's own model.
    dynamic: str = ""

    def upstream_for(self, recipe: Recipe) -> tuple[tuple[str, ...], dict[str, str]]:
        if not self.dynamic:
            return self.upstream, {}
        more, inputs = _body(self.dynamic)(recipe)
        return self.upstream + tuple(more), inputs

    def enabled(self, recipe: Recipe) -> bool:
        return getattr(recipe, self.sections[0], None) is not None

    def config(self, recipe: Recipe) -> dict:
        if len(self.sections) == 1:
            return section_hash_dict(getattr(recipe, self.sections[0]))
        return {s: section_hash_dict(getattr(recipe, s)) for s in self.sections}


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("prepare", ("data",), (), "kompakt.pipeline:_prepare_body", raw_inputs=True,
          help="read, normalise, filter, deduplicate and split the raw corpus",
          description="data_prep: raw text/JSONL/Parquet/datasets folders -> Parquet shards (id, text, sentences, "
                      "lang) and stats.json. With data.num_shards>1 and data.shard_index=i it builds only part i "
                      "(for a Slurm array); without shard_index it builds missing parts and merges them with "
                      "cross-part dedup."),
    Stage("tokenizer", ("tokenizer",), ("prepare",), "kompakt.pipeline:_tokenizer_body",
          help="train a tokenizer, report on held-out text, write packed token shards",
          description="tokenization: trains WordPiece, Unigram or byte-level BPE on the prepared corpus (running "
                      "data_prep first if needed), saves an AutoTokenizer folder, writes report.json and packed "
                      "token shards: tokens/ for training, heldout/ for the held-out documents."),
    Stage("pretrain", ("pretrain", "model"), ("tokenizer",), "kompakt.pipeline:_pretrain_body", in_place=True,
          help="pretrain the model on the packed token shards with DeepSpeed",
          description="pretrain: trains the recipe's model on the tokenizer stage's shards on one CPU, one GPU or "
                      "many (launch with torchrun, srun or deepspeed), saving kill-safe checkpoints; run.resume: "
                      "auto continues. SIGTERM/SIGUSR1 or the time limit save and exit with status 75 for a "
                      "requeue. Ends with an HF export."),
    Stage("compress", ("compress",), ("tokenizer",), "kompakt.pipeline:_compress_body", in_place=True,
          dynamic="kompakt.pipeline:_compress_upstream",
          help="distil, drop layers, prune and quantize the teacher into smaller students",
          description="compress: turns the teacher (this recipe's pretraining export, or compress.teacher: a stock "
                      "BERT/ALBERT folder with the tokenizer stage's vocabulary) into the students of "
                      "compress.students: distill (TinyBERT, MiniLMv2 relations, CompRess), layer_drop, prune, "
                      "quantize. Each is a Hugging Face folder under students/ with a model card giving its size "
                      "and measured speed against the teacher. Distillation is kill-safe and resumes."),
    Stage("finetune", ("finetune",), (), "kompakt.pipeline:_finetune_body", in_place=True,
          dynamic="kompakt.pipeline:_finetune_upstream",
          help="fine-tune the teacher, the students and named models on a task suite, several seeds each",
          description="finetune: every model of finetune.models (teacher, students, student names, name: folder) on "
                      "every task of finetune.suite (a shipped suite such as demo-nb, or a suite YAML), "
                      "finetune.seeds seeds each, plus learning-curve sizes; each job early-stops on dev and writes "
                      "its dev and test predictions. finetune.shard=i/n runs every n-th job (a Slurm array)."),
    Stage("eval", ("eval", "finetune"), ("finetune",), "kompakt.pipeline:_eval_body",
          help="score the fine-tuned models beside baselines and write the report with plots",
          description="eval: scores every finetune job's test predictions, adds the TF-IDF and BiLSTM baselines on "
                      "the same splits, bootstrap intervals over test examples and seeds, retention against the "
                      "teacher, paired tests, CPU speed and size, and writes results.json, report.md, report.html "
                      "and PNG plots."),
]}


@dataclass
class Pipeline:
    """One command's view of a recipe: stage directories resolved and stages ensured once each."""

    recipe: Recipe
    _dirs: dict[str, tuple[Path, dict, dict]] = field(default_factory=dict)
    _done: dict[str, Path | None] = field(default_factory=dict)
    _parts: list | None = None

    @property
    def run_dir(self) -> Path:
        return self.recipe.path(self.recipe.run_dir)

    def stage(self, name: str) -> Stage:
        stage = STAGES[name]
        missing = sorted(s for s in stage.sections if getattr(self.recipe, s, None) is None)
        if missing:
            raise ConfigError(f"recipe has no {' or '.join(missing)} section, which the {name} stage needs; add "
                              f"{'it' if len(missing) == 1 else 'them'} (see recipes/demo-nb.yaml)")
        return stage

    def resolve(self, name: str) -> tuple[Path, dict, dict]:
        """(directory, hashed config, inputs) of a stage, from the recipe alone; nothing runs."""
        if name not in self._dirs:
            stage = self.stage(name)
            config = stage.config(self.recipe)
            if stage.raw_inputs:
                inputs = {d.name: _hash_of(d) for _, _, d in prepare_parts(self)}
            else:
                upstream, extra = stage.upstream_for(self.recipe)
                inputs = {up if up != "prepare" else "corpus": _hash_of(self.resolve(up)[0]) for up in upstream}
                inputs.update(extra)
            self._dirs[name] = (stage_dir(self.run_dir, name, config, inputs), config, inputs)
        return self._dirs[name]

    def ensure(self, name: str, force: bool = False) -> Path | None:
        """Run a stage if its directory is not complete (upstream first); returns its directory."""
        if name in self._done:
            return self._done[name]
        stage = self.stage(name)
        from kompakt import dist

        several = dist.detect().world_size > 1
        for up in stage.upstream_for(self.recipe)[0]:
            if several:  # ranks must not race to build upstream stages
                d = self.resolve(up)[0]
                if not is_complete(d):
                    raise ConfigError(f"the {up} stage is not complete; run `kompakt {up} RECIPE` in one process "
                                      f"before launching {name} on several")
                self._done[up] = d
            elif self.ensure(up) is None:
                raise ConfigError("data.shard_index is set; later stages need the merged corpus, so drop shard_index")
        d, config, inputs = self.resolve(name)
        if not force and is_complete(d):
            info(f"{name}: complete, skipped ({d})")
            self._done[name] = d
            return d
        self._done[name] = _body(stage.body)(self, stage, d, config, inputs, force)
        return self._done[name]

    def upstream_dir(self, name: str) -> Path:
        d = self._done.get(name)
        assert d is not None, f"{name} was not ensured"
        return d

    def run_all(self, force: bool = False) -> dict[str, Path | None]:
        """Every stage the recipe has, in order; complete stages are skipped."""
        return {name: self.ensure(name, force=force) for name, stage in STAGES.items() if stage.enabled(self.recipe)}


# --- data_prep: parts for a Slurm array, then the merge ------------------------------------------


def prepare_parts(p: Pipeline) -> list[tuple[list[Path], dict, Path]]:
    """Per data_prep part: its input files (`files[i::num_shards]`), its input hashes and its directory.

    Fingerprinting reads every input file (up to 256 MB each), so a command does it once.
    """
    if p._parts is None:
        p._parts = _prepare_parts(p)
    return p._parts


def _prepare_parts(p: Pipeline) -> list[tuple[list[Path], dict, Path]]:
    recipe = p.recipe
    files = recipe.resolve_inputs()
    n = recipe.data.num_shards
    config = section_hash_dict(recipe.data)
    out = []
    for i in range(n):
        part_files = files[i::n]
        inputs = {"part": f"{i}/{n}", **{str(f): file_fingerprint(f) for f in part_files}}
        out.append((part_files, inputs, stage_dir(p.run_dir, "prepare_part", config, inputs)))
    return out


def _prepare_body(p: Pipeline, stage: Stage, d: Path, config: dict, inputs: dict, force: bool) -> Path | None:
    """data_prep: raw files -> `prepare-<hash>/corpus/*.parquet` and `stats.json`.

    With `data.num_shards > 1` the inputs are split into parts (`prepare_part-<hash>`) that a Slurm
    array can build one per task (`data.shard_index=i`); a run without `shard_index` builds any
    missing parts and then merges them, deduplicating across parts. The output does not depend on
    `num_proc` or `num_shards`. Returns None when only one part was asked for.
    """
    from kompakt.data_prep import stage as data_stage

    cfg = p.recipe.data
    parts = prepare_parts(p)
    for i, (part_files, part_inputs, part_dir) in enumerate(parts):
        if cfg.shard_index is not None and i != cfg.shard_index:
            continue
        if force or not is_complete(part_dir):
            info(f"prepare: part {i + 1}/{len(parts)}, {len(part_files)} file(s) -> {part_dir}")
            with open_stage(p.run_dir, "prepare_part", config, part_inputs) as run:
                data_stage.run_part(cfg, part_files, run)
        else:
            info(f"prepare: part {i + 1}/{len(parts)} complete, skipped ({part_dir})")
    if cfg.shard_index is not None:
        return None
    with open_stage(p.run_dir, "prepare", config, inputs) as run:
        data_stage.merge(cfg, [part_dir for _, _, part_dir in parts], run)
    info(f"prepare: wrote {d}")
    return d


def _tokenizer_body(p: Pipeline, stage: Stage, d: Path, config: dict, inputs: dict, force: bool) -> Path:
    """tokenization: corpus -> `tokenizer-<hash>/tokenizer/` (HF folder), `report.json`, `tokens/`, `heldout/`."""
    from kompakt.tokenization import stage as tok_stage

    with open_stage(p.run_dir, "tokenizer", config, inputs) as run:
        tok_stage.run(p.recipe.tokenizer, p.upstream_dir("prepare"), run)
        # What the token ids mean, so a downstream stage can tell when they changed under it.
        run.extra["digests"] = artifact_digests(run.work_dir)
    info(f"tokenizer: wrote {d}")
    return d


def _pretrain_body(p: Pipeline, stage: Stage, d: Path, config: dict, inputs: dict, force: bool) -> Path:
    """pretrain: token shards -> `pretrain-<hash>/` with checkpoints/, metrics.jsonl, tb/ and export/.

    Unlike the other stages the directory is used in place (checkpoints survive kills and requeues);
    `manifest.json` with `complete: true` appears only after the export.
    """
    from kompakt.pretrain import stage as pretrain_stage

    info(f"pretrain: {d}")
    recipe = p.recipe
    return pretrain_stage.run(recipe.model, recipe.pretrain, p.upstream_dir("tokenizer"), d, stage_hash=_hash_of(d),
                              inputs=inputs, recipe_name=recipe.name, release=recipe.release_metadata())


def _compress_upstream(recipe: Recipe) -> tuple[tuple[str, ...], dict[str, str]]:
    teacher = recipe.compress.teacher
    if teacher == "pretrain":
        if recipe.pretrain is None:
            raise ConfigError("compress.teacher=pretrain but the recipe has no pretrain section; add one or set "
                              "compress.teacher to a BERT/ALBERT folder")
        return ("pretrain",), {}
    folder = recipe.path(teacher)
    if not folder.is_dir():
        raise ConfigError(f"compress.teacher: {folder} is not a folder; use 'pretrain' or a Hugging Face model folder")
    return (), {"teacher": file_fingerprint(folder)}


def _compress_body(p: Pipeline, stage: Stage, d: Path, config: dict, inputs: dict, force: bool) -> Path:
    """compress: teacher -> `compress-<hash>/students/<name>/` HF folders with model cards, and manifest.json."""
    from kompakt.compress import stage as compress_stage

    recipe = p.recipe
    cfg = recipe.compress
    if cfg.teacher == "pretrain":
        teacher_dir, label = p.upstream_dir("pretrain") / "export", f"{recipe.name} ({p.upstream_dir('pretrain').name})"
    else:
        teacher_dir, label = recipe.path(cfg.teacher), Path(cfg.teacher).name
    if force and d.exists():
        import shutil

        shutil.rmtree(d)
    info(f"compress: {d}")
    return compress_stage.run(cfg, teacher_dir, p.upstream_dir("tokenizer"), d, stage_hash=_hash_of(d), inputs=inputs,
                              recipe_name=recipe.name, release=recipe.release_metadata(), teacher_label=label,
                              cache_root=p.run_dir / "cache")


def _teacher_source(recipe: Recipe) -> tuple[str, Path | None]:
    """Where the run's teacher comes from: ("pretrain", None) or ("folder", path)."""
    if recipe.compress is not None and recipe.compress.teacher != "pretrain":
        return "folder", recipe.path(recipe.compress.teacher)
    return "pretrain", None


def _finetune_models(recipe: Recipe) -> tuple[list[tuple[str, str, object]], set[str]]:
    """[(name, kind, ref)] for finetune.models and the upstream stages they need. Kinds: pretrain (the
    export), compress (a student's name), folder (a path)."""
    out, ups = [], set()
    students = [s for s in (recipe.compress.students if recipe.compress else []) if s.method != "quantize"]
    for entry in recipe.finetune.models:
        if isinstance(entry, dict):
            out += [(name, "folder", recipe.path(path)) for name, path in entry.items()]
        elif entry == "teacher":
            kind, path = _teacher_source(recipe)
            if kind == "pretrain" and recipe.pretrain is None:
                raise ConfigError("finetune.models names the teacher but the recipe has neither a pretrain section nor "
                                  "compress.teacher; add one or name folders (finetune.models: [{name: path}])")
            out.append(("teacher", kind, path))
            ups.add("pretrain" if kind == "pretrain" else "compress")
        elif entry == "students":
            if not students:
                raise ConfigError("finetune.models names the students but compress.students has none that can be "
                                  "fine-tuned (int8 students are not; fine-tune first, then quantize)")
            out += [(s.name, "compress", s.name) for s in students]
            ups.add("compress")
        else:
            if entry not in {s.name for s in students}:
                raise ConfigError(f"finetune.models: {entry!r} is not 'teacher', 'students', a compress student that can "
                                  f"be fine-tuned ({', '.join(s.name for s in students) or 'none'}) or a {{name: folder}}")
            out.append((entry, "compress", entry))
            ups.add("compress")
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"finetune.models: a model name is used twice ({names})")
    if "compress" in ups and recipe.compress is None:
        raise ConfigError("finetune.models names students but the recipe has no compress section")
    return out, ups


def _finetune_upstream(recipe: Recipe) -> tuple[tuple[str, ...], dict[str, str]]:
    from kompakt.finetune.tasks import load_suite, suite_files

    models, ups = _finetune_models(recipe)
    inputs = {f"model:{n}": file_fingerprint(ref) for n, kind, ref in models if kind == "folder"}
    suite = load_suite(recipe.finetune.suite)
    base = suite.path.parent if suite.path else Path(".")
    inputs.update({f"suite:{f.relative_to(base) if f.is_relative_to(base) else f}": file_fingerprint(f)
                   for f in suite_files(suite)})
    return tuple(s for s in ("pretrain", "compress") if s in ups), inputs


def _finetune_body(p: Pipeline, stage: Stage, d: Path, config: dict, inputs: dict, force: bool) -> Path:
    """finetune: models x suite tasks x seeds -> `finetune-<hash>/jobs/.../result.json`, models/, manifest.json."""
    from kompakt.finetune import stage as finetune_stage

    models, _ = _finetune_models(p.recipe)
    folders = {}
    for name, kind, ref in models:
        if kind == "folder":
            folders[name] = ref
        elif kind == "pretrain":
            folders[name] = p.upstream_dir("pretrain") / "export"
        elif name == "teacher":
            folders[name] = _teacher_source(p.recipe)[1]
        else:
            folders[name] = p.upstream_dir("compress") / "students" / ref
    if force and d.exists():
        import shutil

        shutil.rmtree(d)
    info(f"finetune: {d}")
    return finetune_stage.run(p.recipe.finetune, folders, d, stage_hash=_hash_of(d), inputs=inputs,
                              recipe_name=p.recipe.name)


def _eval_body(p: Pipeline, stage: Stage, d: Path, config: dict, inputs: dict, force: bool) -> Path:
    """eval: finetune results -> `eval-<hash>/results.json`, report.md, report.html, *.png."""
    from kompakt.eval import stage as eval_stage

    with open_stage(p.run_dir, "eval", config, inputs) as run:
        eval_stage.run(p.recipe.eval, p.recipe.finetune, p.upstream_dir("finetune"), run.work_dir,
                       recipe_name=p.recipe.name)
    info(f"eval: wrote {d}")
    return d


# --- the functions the CLI and older callers use ---------------------------------------------------


def prepare_dir(recipe: Recipe) -> tuple[Path, dict]:
    """The merged data_prep directory of a recipe and its inputs, without running anything."""
    d, _, inputs = Pipeline(recipe).resolve("prepare")
    return d, inputs


def prepare(recipe: Recipe, force: bool = False) -> Path | None:
    return Pipeline(recipe).ensure("prepare", force=force)


def tokenizer(recipe: Recipe, force: bool = False) -> Path:
    return Pipeline(recipe).ensure("tokenizer", force=force)


def pretrain(recipe: Recipe, force: bool = False) -> Path:
    return Pipeline(recipe).ensure("pretrain", force=force)


def run_all(recipe: Recipe, force: bool = False) -> dict[str, Path | None]:
    return Pipeline(recipe).run_all(force=force)


def pretrain_dry_run(recipe: Recipe, world_size: int | None = None) -> dict:
    """`kompakt pretrain --dry-run`: print parameters, tokens per step, accumulation and FLOPs per token.

    Needs no corpus: the vocabulary comes from model.vocab_size or the tokenizer section, a lattice
    model's word table from tokenizer.lexicon_size; `world_size` defaults to the launcher's.
    """
    from kompakt import dist
    from kompakt.pretrain import stage as pretrain_stage

    Pipeline(recipe).stage("pretrain")
    vocab = recipe.model.vocab_size or (recipe.tokenizer.vocab_size_rounded if recipe.tokenizer else None)
    if vocab is None:
        raise ConfigError("set model.vocab_size or a tokenizer section so --dry-run knows the vocabulary")
    num_words = recipe.tokenizer.lexicon_size if recipe.tokenizer and recipe.tokenizer.lexicon else 0
    figures = pretrain_stage.dry_run(recipe.model, recipe.pretrain, vocab, world_size or dist.detect().world_size,
                                     num_words)
    pretrain_stage.print_dry_run(figures)
    return figures
