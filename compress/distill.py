"""Distillation of a teacher into a smaller student on the packed token shards (TinyBERT, MiniLMv2, CompRess).

Reads top to bottom: the layer map (checked before anything runs), the student (built from the
teacher's config with the student's sizes, initialised from the teacher's mapped layers when the
widths agree), the packed batches (whole-word masked, a pure function of each example's sample
index, so resume is exact; a Lattice-BERT teacher's are lattices of characters and lexicon words,
MSP-masked as in its pretraining), the teacher's outputs (computed, or read from a content-addressed
cache), the step (the losses of kompakt/compress/losses.py with their weights) and the shared
training loop (kompakt/loop.py: DeepSpeed engine, checkpoints, signals, metrics).

The teacher and the student both run packed (no padding); the teacher runs in inference mode.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kompakt.errors import ConfigError
from kompakt.log import info
from kompakt.model_config import ModelConfig
from kompakt.models.distill import DistillationModel, encoder_and_head, mean_pool, run_encoder
from kompakt.packed import Example, example_rng
from kompakt.tokenizer import SpecialIds

from kompakt.compress import losses as L


# ---------------------------------------------------------------------------------------------
# Layer maps
# ---------------------------------------------------------------------------------------------


def layer_map(spec, num_student: int, num_teacher: int, key: str = "layer_map") -> list[int]:
    """Teacher layer (1-based) each student layer (1-based) learns from.

    uniform: student layer i -> teacher layer i*k with k = num_teacher / num_student (an integer);
    last: the teacher's last num_student layers; a list: given explicitly, increasing. Teacher layer 0
    (the embeddings) is always mapped to the student's embeddings.
    """
    if num_student > num_teacher:
        raise ConfigError(f"{key}: the student has {num_student} layers, more than the teacher's {num_teacher}; "
                          f"a layer map needs a student no deeper than its teacher")
    if spec == "uniform":
        if num_teacher % num_student:
            raise ConfigError(f"{key}=uniform needs the teacher's {num_teacher} layers to divide into the student's "
                              f"{num_student}; use layer_map=last or an explicit list of {num_student} teacher layers")
        k = num_teacher // num_student
        return [i * k for i in range(1, num_student + 1)]
    if spec == "last":
        return list(range(num_teacher - num_student + 1, num_teacher + 1))
    layers = [int(x) for x in spec]
    if len(layers) != num_student:
        raise ConfigError(f"{key} lists {len(layers)} teacher layers for a student of {num_student}; give one per "
                          f"student layer")
    if any(not 1 <= x <= num_teacher for x in layers) or layers != sorted(set(layers)):
        raise ConfigError(f"{key}={layers}: teacher layers must be increasing and within 1..{num_teacher}")
    return layers


# ---------------------------------------------------------------------------------------------
# Student
# ---------------------------------------------------------------------------------------------


def student_config(shape, teacher_cfg: ModelConfig, name: str) -> ModelConfig:
    """The student's ModelConfig: the teacher's, with the shape's sizes; invalid shapes are one-line errors."""
    upd = {"num_layers": shape.num_layers}
    for key in ("family", "hidden_size", "num_heads", "intermediate_size", "embedding_size"):
        if getattr(shape, key) is not None:
            upd[key] = getattr(shape, key)
    family = upd.get("family", teacher_cfg.family)
    if teacher_cfg.family == "lattice" and family != "lattice":
        raise ConfigError(f"students.{name}.student.family={family}: a Lattice-BERT teacher reads lattices of "
                          f"characters and lexicon words, so its student must be one too; set student.family: "
                          f"lattice or leave it unset")
    if family == "lattice" and teacher_cfg.family != "lattice":
        raise ConfigError(f"students.{name}.student.family=lattice needs a Lattice-BERT teacher (this one is "
                          f"{teacher_cfg.family}, whose batches carry no lexicon words); leave student.family unset")
    if upd.get("family") == "albert" and teacher_cfg.family != "albert" and "embedding_size" not in upd:
        upd["embedding_size"] = min(128, upd.get("hidden_size", teacher_cfg.hidden_size))
    if upd.get("family", teacher_cfg.family) == "albert":
        upd.setdefault("num_hidden_groups", 1)
        upd["hidden_act"] = teacher_cfg.hidden_act
    data = {**teacher_cfg.model_dump(), **upd, "dropout": 0.0}
    if family == "lattice":
        # A Lattice-BERT folder loads with attention "padded" (its HF classes take padded rows); the student
        # trains packed, on the "rows" grid its pretraining uses.
        data["attention"] = "auto"
    if data["num_layers"] != teacher_cfg.num_layers:  # a teacher's explicit ModernBERT layer list fits its depth only
        data["modernbert"] = {**data["modernbert"], "layer_types": None}
    try:
        return ModelConfig.model_validate(data, context={"any_vocab_size": True})
    except Exception as err:  # pydantic's message names the field
        first = str(err).splitlines()
        raise ConfigError(f"students.{name}.student: {first[-1].strip() if first else err}") from None


def init_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module, mapping: list[int]) -> None:
    """DistilBERT's initialisation: the teacher's embeddings, head and mapped layers, copied (widths equal);
    a Lattice-BERT's relative-position bias table too (when the head counts agree, its width)."""
    s_enc, s_head = encoder_and_head(student)
    t_enc, t_head = encoder_and_head(teacher)
    s_enc.embeddings.load_state_dict(t_enc.embeddings.state_dict())
    s_bias, t_bias = getattr(s_enc, "position_bias", None), getattr(t_enc, "position_bias", None)
    if s_bias is not None and t_bias is not None:
        if s_bias.embeddings.weight.shape == t_bias.embeddings.weight.shape:
            s_bias.load_state_dict(t_bias.state_dict())
        else:
            info("compress: the student's lattice position bias starts random: its head count differs from the "
                 "teacher's")
    if s_head is not None and t_head is not None:
        s_head.load_state_dict(t_head.state_dict())
    if hasattr(s_enc.encoder, "layer") and hasattr(t_enc.encoder, "layer"):
        for i, t in enumerate(mapping):
            s_enc.encoder.layer[i].load_state_dict(t_enc.encoder.layer[t - 1].state_dict())
    elif hasattr(s_enc.encoder, "albert_layer_groups") and hasattr(t_enc.encoder, "albert_layer_groups"):
        s_enc.encoder.load_state_dict(t_enc.encoder.state_dict())  # shared layers: copy them whole
    else:
        raise ConfigError("student.init=teacher needs the student and teacher of one family; use init=random")


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskingCollator:
    """`[CLS] tokens [SEP]` per example, packed; a `mask_rate` share of whole words masked 80/10/10.

    Picklable, and a pure function of each example's sample index (seeded with `seed`), so a resumed
    run builds exactly the batches an uninterrupted one would."""

    cls_id: int
    sep_id: int
    mask_id: int
    vocab_size: int
    num_specials: int  # ids below this are special tokens, never drawn as random replacements
    mask_rate: float
    seed: int

    def __call__(self, examples: list[Example]) -> dict:
        ids, cu, positions, labels = [], [0], [], []
        for ex in examples:
            rng = example_rng(self.seed, ex.index)
            toks = ex.tokens.copy()
            n = len(toks)
            if self.mask_rate > 0 and n:
                starts = np.flatnonzero(ex.word_starts)
                if len(starts) == 0 or starts[0] != 0:
                    starts = np.concatenate(([0], starts))
                ends = np.append(starts[1:], n)
                want = max(1, round(self.mask_rate * n))
                chosen, total = [], 0
                for w in rng.permutation(len(starts)):
                    if total >= want:
                        break
                    chosen.append(w)
                    total += int(ends[w] - starts[w])
                pos = np.sort(np.concatenate([np.arange(starts[w], ends[w]) for w in chosen]))
                u = rng.random(len(pos))
                orig = toks[pos].copy()
                toks[pos[u < 0.8]] = self.mask_id
                rand = pos[(u >= 0.8) & (u < 0.9)]
                toks[rand] = rng.integers(self.num_specials, self.vocab_size, len(rand))
                positions.append(pos + cu[-1] + 1)
                labels.append(orig)
            ids.append(np.concatenate(([self.cls_id], toks, [self.sep_id])))
            cu.append(cu[-1] + n + 2)
        lengths = np.diff(cu)
        cat = lambda xs: torch.from_numpy(np.concatenate(xs)) if xs else torch.zeros(0, dtype=torch.long)  # noqa: E731
        return {"input_ids": torch.from_numpy(np.concatenate(ids)).long(),
                "cu_seqlens": torch.tensor(cu, dtype=torch.int32), "max_seqlen": int(lengths.max()),
                "mlm_positions": cat(positions).long(), "mlm_labels": cat(labels).long()}


class LatticeMaskingCollator:
    """A Lattice-BERT teacher's batches: each example becomes `[CLS] characters [SEP] lexicon words`,
    MSP-masked and packed exactly as in its pretraining (kompakt.lattice_inputs.msp_batch).

    Picklable, and a pure function of each example's sample index (seeded with `seed`), as
    MaskingCollator is. The lexicon is read from `tokenizer_dir` (word ids start at the model's
    vocab_size) on first use in whichever process collates, and never pickled."""

    def __init__(self, specials: SpecialIds, tokenizer_dir: Path, model_cfg: ModelConfig, *, max_seq_len: int,
                 mask_rate: float, seed: int):
        self.specials, self.tokenizer_dir, self.model_cfg = specials, str(tokenizer_dir), model_cfg
        self.max_seq_len, self.mask_rate, self.seed = max_seq_len, mask_rate, seed
        self._lexicon = None

    def lexicon(self):
        """The tokenization run's `Lexicon`, loaded once per process."""
        if self._lexicon is None:
            from kompakt.lattice_inputs import load_tokenizer_lexicon

            self._lexicon = load_tokenizer_lexicon(self.tokenizer_dir, self.model_cfg)
        return self._lexicon

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_lexicon": None}

    def __call__(self, examples: list[Example]) -> dict:
        from kompakt.lattice_inputs import msp_batch

        return msp_batch(examples, self.lexicon(), self.specials, self.seed, max_seq_len=self.max_seq_len,
                         mask_rate=self.mask_rate)


# ---------------------------------------------------------------------------------------------
# Teacher outputs and their cache
# ---------------------------------------------------------------------------------------------


@dataclass
class Needs:
    """Which teacher tensors the losses read: mapped layers' hidden states and projections, the
    relation layer's projections, the MLM logits, the pooled embedding."""

    hidden_layers: list[int]          # 0 = embeddings
    qkv_layers: list[int]
    logits: bool
    pooled: bool

    def describe(self) -> str:
        return json.dumps({"hidden": self.hidden_layers, "qkv": self.qkv_layers, "logits": self.logits,
                           "pooled": self.pooled}, sort_keys=True)


@torch.no_grad()  # not inference_mode: its tensors could not enter the student's autograd graph
def teacher_outputs(teacher: torch.nn.Module, batch: dict, needs: Needs) -> dict[str, torch.Tensor]:
    """The teacher's tensors the losses need, as a flat dict (`hidden.3`, `qkv.6`, `logits`, `pooled`)."""
    encoder, head = encoder_and_head(teacher)
    taps: list[dict] = []
    x_TD = run_encoder(encoder, batch["input_ids"], batch["cu_seqlens"], batch.get("max_seqlen"),
                       batch.get("position_ids"), batch.get("token_type_ids"), batch.get("lattice_start"),
                       batch.get("lattice_end"), taps=taps)
    out = {f"hidden.{i}": taps[i]["hidden"] for i in needs.hidden_layers}
    out.update({f"qkv.{i}": taps[i]["qkv"] for i in needs.qkv_layers})
    if needs.logits:
        out["logits"] = head(x_TD[batch["mlm_positions"]])
    if needs.pooled:
        out["pooled"] = mean_pool(x_TD, batch["cu_seqlens"])
    return {k: v.float().contiguous() for k, v in out.items()}


@dataclass
class TeacherCache:
    """Teacher outputs per micro-batch on disk: `<root>/<key>.safetensors`, key = sha256 of the teacher's
    weights digest, what is cached and the batch's tensors (a lattice batch's spans and token types
    too, when it has them: they change the teacher's outputs). Written to a temporary name and renamed,
    so a kill never leaves a half-written entry that a later run would read."""

    root: Path | None
    teacher_digest: str
    needs: Needs
    hits: int = 0
    misses: int = 0
    teacher_forwards: int = 0
    _prefix: bytes = field(default=b"", init=False)

    def __post_init__(self) -> None:
        self._prefix = (self.teacher_digest + self.needs.describe()).encode()

    def key(self, batch: dict) -> str:
        h = hashlib.sha256(self._prefix)
        for name in ("input_ids", "cu_seqlens", "mlm_positions", "token_type_ids", "lattice_start", "lattice_end"):
            if name in batch:  # the optional ones are absent from a BERT batch, whose keys stay as they were
                h.update(name.encode())
                h.update(batch[name].detach().cpu().numpy().tobytes())
        return h.hexdigest()

    def get(self, teacher: torch.nn.Module, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file, save_file

        path = self.root / f"{self.key(batch)}.safetensors" if self.root is not None else None
        if path is not None and path.is_file():
            try:
                out = load_file(str(path), device=str(device))
                self.hits += 1
                return out
            except Exception:  # a damaged entry is recomputed and rewritten
                pass
        out = teacher_outputs(teacher, batch, self.needs)
        self.teacher_forwards += 1
        if path is not None:
            self.misses += 1
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file({k: v.cpu() for k, v in out.items()}, str(tmp))
            os.replace(tmp, path)
        return out


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


@dataclass
class DistillStep:
    """The loop's step function: teacher outputs (cached or computed), student forward, weighted losses."""

    weights: dict[str, float]
    mapping: list[int]
    relation_layer: int
    num_relation_heads: int
    temperature: float
    similarity_temperature: float
    cache: TeacherCache

    def __call__(self, model, batch: dict, teacher: torch.nn.Module) -> dict:
        device = batch["input_ids"].device
        t = self.cache.get(teacher, batch, device)
        s = model(**batch)
        w, cu = self.weights, batch["cu_seqlens"]
        losses: dict[str, torch.Tensor] = {}
        if w["embedding"]:
            losses["embedding"] = L.hidden_mse(s["hidden"][0], t["hidden.0"])
        if w["hidden"]:
            losses["hidden"] = sum(L.hidden_mse(s["hidden"][i], t[f"hidden.{j}"])
                                   for i, j in enumerate(self.mapping, start=1)) / len(self.mapping)
        if w["attention"]:
            losses["attention"] = sum(L.attention_mse(s["taps"][i]["qkv"], t[f"qkv.{j}"], cu)
                                      for i, j in enumerate(self.mapping, start=1)) / len(self.mapping)
        if w["relation"]:
            losses["relation"] = L.qkv_relations(s["taps"][-1]["qkv"], t[f"qkv.{self.relation_layer}"], cu,
                                                 self.num_relation_heads)
        if w["logits"] and batch["mlm_positions"].numel():
            losses["logits"] = L.logits_kl(s["mlm_logits"], t["logits"], self.temperature)
        if w["mlm"] and batch["mlm_positions"].numel():
            losses["mlm"] = torch.nn.functional.cross_entropy(s["mlm_logits"].float(), batch["mlm_labels"])
        if w["similarity"]:
            module = model.module if hasattr(model, "module") else model
            teacher_unit = torch.nn.functional.normalize(t["pooled"], dim=-1)
            # Held-out evaluation uses the batch's own anchors only, so its loss does not grow with the bank.
            filled = int(min(module.bank_count.item(), module.bank.shape[0])) if module.training else 0
            bank = torch.cat([teacher_unit, module.bank[:filled]])
            losses["similarity"] = L.similarity_kl(s["pooled"], t["pooled"], bank, self.similarity_temperature)
            if module.training:
                module.push_bank(teacher_unit)
        loss = sum(w[k] * v for k, v in losses.items())
        return {"loss": loss, "losses": losses, "num_predictions": max(1, int(batch["mlm_positions"].numel()))}


def needs_for(weights: dict[str, float], mapping: list[int], relation_layer: int, has_head: bool) -> Needs:
    return Needs(hidden_layers=sorted(({0} if weights["embedding"] else set())
                                      | (set(mapping) if weights["hidden"] else set())),
                 qkv_layers=sorted((set(mapping) if weights["attention"] else set())
                                   | ({relation_layer} if weights["relation"] else set())),
                 logits=bool(weights["logits"]) and has_head, pooled=bool(weights["similarity"]))


def check_losses(spec, teacher_cfg: ModelConfig, student_cfg: ModelConfig, teacher_has_head: bool) -> tuple[int, int]:
    """Refuse, before anything runs, losses this teacher/student pair cannot have; returns the relation
    layer (1-based) and head count."""
    w = spec.losses
    key = f"students.{spec.name}"
    if w.attention and student_cfg.num_heads != teacher_cfg.num_heads:
        raise ConfigError(f"{key}.losses.attention needs equal head counts (student {student_cfg.num_heads}, teacher "
                          f"{teacher_cfg.num_heads}); set it to 0 and use losses.relation (MiniLMv2), which needs none")
    if w.logits and not teacher_has_head:
        raise ConfigError(f"{key}.losses.logits: the teacher has no MLM head (a bare encoder); set logits to 0")
    relation_layer = spec.relation_layer if spec.relation_layer > 0 else teacher_cfg.num_layers + 1 + spec.relation_layer
    if w.relation and not 1 <= relation_layer <= teacher_cfg.num_layers:
        raise ConfigError(f"{key}.relation_layer={spec.relation_layer} is outside the teacher's 1..{teacher_cfg.num_layers}")
    heads = spec.num_relation_heads or teacher_cfg.num_heads
    if w.relation and (teacher_cfg.hidden_size % heads or student_cfg.hidden_size % heads):
        raise ConfigError(f"{key}.num_relation_heads={heads} must divide both widths (teacher {teacher_cfg.hidden_size}, "
                          f"student {student_cfg.hidden_size}); pick a common divisor")
    return relation_layer, heads


def log_plan(spec, mapping: list[int], student_cfg: ModelConfig, num_params: int) -> None:
    info(f"compress: {spec.name}: {student_cfg.num_layers} layers x {student_cfg.hidden_size} "
         f"({num_params:,} parameters), layer map {mapping}, losses "
         + ", ".join(f"{k} {v:g}" for k, v in spec.losses.model_dump().items() if v)
         + f", about {spec.max_steps * spec.data.global_batch_tokens:,} tokens")



# ---------------------------------------------------------------------------------------------
# One student, trained
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def heldout_mlm_loss(model: torch.nn.Module, batches: list[dict], device: torch.device) -> float | None:
    """Mean MLM loss per prediction of a model with an MLM head on held-out batches (None without a head);
    a Lattice-BERT's masked segment prediction loss ("msp", the MLM loss over characters and words)."""
    if encoder_and_head(model)[1] is None:
        return None
    from kompakt.engine import to_device

    was = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        b = to_device(b, device)
        n = int(b["mlm_positions"].numel())
        if n:
            losses = model(**b)["losses"]
            total += float(losses["mlm"] if "mlm" in losses else losses["msp"]) * n
            count += n
    model.train(was)
    return total / max(count, 1)


@dataclass
class Prepared:
    """What training a student needs, checked before anything runs."""

    student_cfg: ModelConfig
    mapping: list[int]
    relation_layer: int
    relation_heads: int
    needs: Needs


def prepare(spec, teacher_cfg: ModelConfig, teacher_has_head: bool) -> Prepared:
    """The checks a user's recipe can fail, all before the teacher runs: shape, layer map, losses."""
    student_cfg = student_config(spec.student, teacher_cfg, spec.name)
    mapping = layer_map(spec.layer_map, student_cfg.num_layers, teacher_cfg.num_layers,
                        key=f"students.{spec.name}.layer_map")
    relation_layer, heads = check_losses(spec, teacher_cfg, student_cfg, teacher_has_head)
    w = spec.losses.model_dump()
    return Prepared(student_cfg, mapping, relation_layer, heads, needs_for(w, mapping, relation_layer, teacher_has_head))


def build_loaders(spec, vocab_size: int, tokenizer_stage: Path, env, model_cfg: ModelConfig | None = None):
    """(training loader, held-out micro-batches): the tokenizer stage's tokens/ and heldout/ shards,
    whole-word masked by `spec.masking`, packed by `spec.data`. For a Lattice-BERT teacher (`model_cfg`
    of family lattice) the batches are its lattices, MSP-masked, and the micro-batch budget counts the
    lexicon words each example gains (as pretraining's lattice loader does)."""
    from kompakt.lattice_inputs import lattice_lengths
    from kompakt.packed import ExampleLayout, PackedLoader, build_examples
    from kompakt.shards import TokenShards
    from kompakt.tokenizer import load_tokenizer

    specials = SpecialIds.from_tokenizer(load_tokenizer(tokenizer_stage / "tokenizer"))
    lay = ExampleLayout(max_seq_len=spec.masking.max_seq_len, num_specials=2)
    lattice = model_cfg is not None and model_cfg.family == "lattice"
    if lattice:
        collator = LatticeMaskingCollator(specials, tokenizer_stage / "tokenizer", model_cfg,
                                          max_seq_len=spec.masking.max_seq_len, mask_rate=spec.masking.mask_rate,
                                          seed=spec.data.seed)
    else:
        collator = MaskingCollator(specials.cls, specials.sep, specials.mask, vocab_size, num_specials=5,
                                   mask_rate=spec.masking.mask_rate, seed=spec.data.seed)

    def packed_loader(shards, **kw):
        examples = build_examples(shards, lay.max_tokens)
        lengths = lattice_lengths(shards, examples, collator.lexicon(), lay.max_seq_len) if lattice else None
        return PackedLoader(shards, lay, spec.data, collator, env.rank, env.world_size, examples,
                            seq_lengths=lengths, **kw)

    shards = TokenShards(tokenizer_stage / "tokens")
    loader = packed_loader(shards, prefetch=spec.run.prefetch, num_workers=spec.run.num_workers)
    held_dir = tokenizer_stage / "heldout"
    held_shards = TokenShards(held_dir) if (held_dir / "index.json").is_file() else shards
    heldout = packed_loader(held_shards, prefetch=0, num_workers=0)
    it = iter(heldout)
    return loader, [next(it) for _ in range(spec.run.eval_batches)]


def resume_and_train(module: torch.nn.Module, spec, env, loader, eval_batches: list[dict], work_dir: Path, *,
                     step_fn, teacher, stop, extra_state: dict, before=None):
    """The engine for `module`, resume from `work_dir/checkpoints` (run.resume), the shared loop.

    Returns (LoopResult, the untrained held-out figure `before` as saved with the first checkpoint)."""
    from kompakt import checkpoint
    from kompakt.engine import build_engine
    from kompakt.loop import train_loop

    engine, _ = build_engine(module, spec, env, spec.accumulation_steps(env.world_size))
    ckpt_root = work_dir / "checkpoints"
    tag = checkpoint.resolve_resume(spec.run.resume, ckpt_root)
    start = None
    if tag is not None:
        start, loader_state = checkpoint.load(engine, tag, spec.engine.zero_stage, spec.seed)
        start["checkpoint"] = str(tag)
        loader.load_state_dict(loader_state)
        before = checkpoint.read_train_state(tag).get("mlm_before", before)
        info(f"compress: {spec.name}: resumed from {tag} (step {start['step']:,})")
    result = train_loop(engine, spec, loader, out_dir=work_dir, ckpt_root=ckpt_root, step_fn=step_fn, teacher=teacher,
                        start=start, train_state_extra={**extra_state, "student": spec.name, "mlm_before": before},
                        eval_batches=eval_batches, stop=stop, name=spec.name)
    loader.close()
    return result, before


def train_student(spec, teacher: torch.nn.Module, teacher_digest: str, tokenizer_stage: Path, work_dir: Path,
                  *, cache_root: Path | None, stop, extra_state: dict) -> dict:
    """Distil `teacher` into the student `spec` describes; checkpoints in `work_dir/checkpoints`.

    Returns the trained student model (fp32, on CPU) and its figures: held-out MLM loss of the
    student before and after, of the teacher, teacher outputs computed and read from the cache.
    The caller exits for a requeue when the loop stopped for a signal or the time limit.
    """
    from kompakt import checkpoint, dist
    from kompakt.engine import choose_device
    from kompakt.models import build_pretraining_model

    env = dist.setup_env()
    teacher_cfg = teacher.cfg
    _, t_head = encoder_and_head(teacher)
    plan = prepare(spec, teacher_cfg, t_head is not None)
    loader, eval_batches = build_loaders(spec, teacher_cfg.vocab_size, tokenizer_stage, env, teacher_cfg)

    # --- student
    checkpoint.seed_everything(spec.seed)
    student = build_pretraining_model(plan.student_cfg)
    init = spec.student.init
    if init == "teacher":
        same = (plan.student_cfg.hidden_size, plan.student_cfg.family, plan.student_cfg.embedding_size) == (
            teacher_cfg.hidden_size, teacher_cfg.family, teacher_cfg.embedding_size)
        if same:
            init_from_teacher(student, teacher, plan.mapping)
        else:
            info(f"compress: {spec.name}: widths differ from the teacher's, so the student starts from random "
                 f"weights (TinyBERT's general distillation does the same)")
            init = "random"
    elif init != "random":
        from kompakt.hf import load_pretrained

        loaded = load_pretrained(init)
        if loaded.cfg.model_dump(exclude={"family", "dropout"}) != plan.student_cfg.model_dump(exclude={"family", "dropout"}):
            raise ConfigError(f"students.{spec.name}.student.init={init}: that model's sizes differ from the student "
                              f"shape; make the shape match it")
        student.load_state_dict(loaded.state_dict(), strict=False)
    num_params = sum(p.numel() for p in student.parameters())
    log_plan(spec, plan.mapping, plan.student_cfg, num_params)
    module = DistillationModel(student, teacher_cfg.hidden_size, project=bool(spec.losses.hidden or spec.losses.embedding),
                               similarity_bank=spec.similarity_bank if spec.losses.similarity else 0)
    device = choose_device(env)
    teacher.to(device).eval().requires_grad_(False)
    before = heldout_mlm_loss(student.to(device), eval_batches, device)
    teacher_loss = heldout_mlm_loss(teacher, eval_batches, device) if t_head is not None else None
    cache = TeacherCache(cache_root if spec.cache_teacher else None, teacher_digest, plan.needs)
    step_fn = DistillStep(weights=spec.losses.model_dump(), mapping=plan.mapping, relation_layer=plan.relation_layer,
                          num_relation_heads=plan.relation_heads, temperature=spec.temperature,
                          similarity_temperature=spec.similarity_temperature, cache=cache)
    result, before = resume_and_train(module, spec, env, loader, eval_batches, work_dir, step_fn=step_fn,
                                      teacher=teacher, stop=stop, before=before,
                                      extra_state={**extra_state, "model": plan.student_cfg.model_dump(mode="json")})
    after = heldout_mlm_loss(student, eval_batches, device)
    return {"model": student.cpu().eval(), "result": result, "num_params": num_params, "mapping": plan.mapping,
            "init": init, "mlm_before": before, "mlm_after": after, "mlm_teacher": teacher_loss,
            "cache": {"enabled": spec.cache_teacher, "hits": cache.hits, "misses": cache.misses,
                      "teacher_forwards": cache.teacher_forwards}}
