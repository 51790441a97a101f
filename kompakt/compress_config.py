"""The `compress` section of a recipe: one teacher, several students, each made by one method.

```yaml
compress:
  teacher: pretrain            # this recipe's pretraining export, or any stock BERT/ALBERT folder
  students:
    - {name: tiny, method: distill, student: {num_layers: 2, hidden_size: 64, num_heads: 2}, max_steps: 200}
    - {name: drop2, method: layer_drop, strategy: top, num_drop: 2}
    - {name: slim, method: prune, ffn_fraction: 0.5}
    - {name: tiny-int8, method: quantize, source: tiny, backend: onnx}
```

Each student is a Hugging Face folder `compress-<hash>/students/<name>/` with a model card (teacher,
method, parameters, disk size, measured speed against the teacher). `source` names the model a
method starts from: the teacher or an earlier student (quantizing a distilled student, say).
Distillation students are training sections (kompakt/train_config.py): the same optimizer, schedule,
engine and run keys as pretraining, the same checkpoints, signals and resume.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from kompakt.config_base import StrictModel
from kompakt.objective_config import DataLoaderConfig
from kompakt.train_config import TrainSection, runtime_field

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class StudentBase(StrictModel):
    name: str = Field(pattern=NAME)
    source: str = Field("teacher", description="'teacher' or the name of an earlier student")


class StudentShape(StrictModel):
    """The student's architecture; unset keys copy the teacher's.

    `init`: "teacher" copies the teacher's embeddings, heads and the layers of the layer map (only
    when the widths agree, as DistilBERT does); "random" starts from scratch (TinyBERT's 4x312
    student); a folder path starts from that model (its vocabulary must be the teacher's).
    """

    family: str | None = None
    num_layers: int = Field(ge=1)
    hidden_size: int | None = Field(None, ge=8)
    num_heads: int | None = Field(None, ge=1)
    intermediate_size: int | None = Field(None, ge=8)
    embedding_size: int | None = Field(None, ge=8, description="ALBERT students: factorised embedding width")
    init: str = "teacher"


class LossWeights(StrictModel):
    """Weights of the distillation losses; 0 turns one off.

    embedding  MSE of the embedding outputs (TinyBERT), through a learned projection when widths differ
    hidden     MSE of each mapped layer's hidden states (TinyBERT), through a learned projection
    attention  MSE of the pre-softmax attention scores of mapped layers (TinyBERT; needs equal head counts)
    logits     KL of the MLM predictions at masked positions at `temperature`, times T^2 (Hinton et al.)
    relation   MiniLMv2: KL of query-query, key-key and value-value relations of one teacher layer and
               the student's last layer, split into `num_relation_heads`; no projection, any widths
    similarity CompRess-1q: KL of the teacher's and the student's similarity distributions over a memory
               bank of teacher sentence embeddings (mean-pooled), for students used as sentence encoders
    mlm        the student's own MLM loss on the masked labels
    """

    embedding: float = Field(1.0, ge=0.0)
    hidden: float = Field(1.0, ge=0.0)
    attention: float = Field(1.0, ge=0.0)
    logits: float = Field(1.0, ge=0.0)
    relation: float = Field(0.0, ge=0.0)
    similarity: float = Field(0.0, ge=0.0)
    mlm: float = Field(0.0, ge=0.0)


class MaskingConfig(StrictModel):
    """What the teacher and student read: examples of `max_seq_len` tokens from the tokenizer stage's
    shards, a `mask_rate` share of whole words masked (80% [MASK], 10% random, 10% kept) so the MLM
    predictions can be distilled; `mask_rate: 0` feeds clean text (TinyBERT's general distillation)."""

    max_seq_len: int = Field(128, ge=8, le=65_536)
    mask_rate: float = Field(0.15, ge=0.0, lt=1.0)


class DistillStudent(StudentBase, TrainSection):
    """TinyBERT, MiniLMv2 relations and CompRess similarity distillation on the packed token shards."""

    method: Literal["distill"]
    student: StudentShape
    losses: LossWeights = LossWeights()
    temperature: float = Field(1.0, gt=0.0)
    # uniform: student layer i (1-based) learns teacher layer i*k, k = teacher layers / student layers
    # (TinyBERT's g(m) = 3m for 4 of 12); last: the teacher's last n layers; or an explicit list of
    # teacher layers (1-based), one per student layer.
    layer_map: Literal["uniform", "last"] | list[int] = "uniform"
    relation_layer: int = Field(-1, description="MiniLMv2: teacher layer (1-based; -1 the last) for relations")
    num_relation_heads: int | None = Field(None, ge=1, description="default: the teacher's head count")
    similarity_bank: int = Field(1024, ge=2, description="CompRess: teacher embeddings in the memory bank")
    similarity_temperature: float = Field(0.04, gt=0.0)
    masking: MaskingConfig = MaskingConfig()
    data: DataLoaderConfig = DataLoaderConfig(tokens_per_micro_batch=2048, global_batch_tokens=4096)
    # Teacher outputs of each micro-batch on disk, content-addressed by teacher and batch, so a second
    # student or a rerun with the same data skips the teacher's forward; exact (fp32), so out of the hash.
    cache_teacher: bool = runtime_field(False)

    @model_validator(mode="after")
    def _check(self) -> DistillStudent:
        if self.data.global_batch_tokens < self.data.tokens_per_micro_batch:
            raise ValueError(f"students.{self.name}.data.global_batch_tokens is below data.tokens_per_micro_batch")
        if not any(v > 0 for v in self.losses.model_dump().values()):
            raise ValueError(f"students.{self.name}.losses: every weight is 0; give at least one loss a weight")
        return self

    def accumulation_steps(self, world_size: int) -> int:
        if self.engine.accumulation_steps is not None:
            return self.engine.accumulation_steps
        return max(1, -(-self.data.global_batch_tokens // (self.data.tokens_per_micro_batch * world_size)))


class TheseusStudent(StudentBase, TrainSection):
    """BERT-of-Theseus: successor layers replace modules of the teacher's layers during MLM training.

    The replacement rate is `replace_rate` (0.5 in the paper's constant setting) plus `rate_slope`
    per step (the paper's curriculum: 0.3 + k t); the last `successor_steps` train the successor alone.
    """

    method: Literal["theseus"]
    num_layers: int = Field(ge=1, description="successor layers; must divide the teacher's layers")
    replace_rate: float = Field(0.5, gt=0.0, le=1.0)
    rate_slope: float = Field(0.0, ge=0.0)
    successor_steps: int = Field(0, ge=0)
    masking: MaskingConfig = MaskingConfig()
    data: DataLoaderConfig = DataLoaderConfig(tokens_per_micro_batch=2048, global_batch_tokens=4096)

    @model_validator(mode="after")
    def _check(self) -> TheseusStudent:
        if self.successor_steps >= self.max_steps:
            raise ValueError(f"students.{self.name}.successor_steps must be below max_steps={self.max_steps}")
        if self.masking.mask_rate == 0:
            raise ValueError(f"students.{self.name}.masking.mask_rate: BERT-of-Theseus trains on the MLM loss; "
                             f"set a mask rate above 0")
        return self

    def accumulation_steps(self, world_size: int) -> int:
        return DistillStudent.accumulation_steps(self, world_size)


class LayerDropStudent(StudentBase):
    """Poor Man's BERT (Sajjad et al. 2020): drop layers, keep the rest's weights; no training."""

    method: Literal["layer_drop"]
    strategy: Literal["top", "bottom", "alternate", "symmetric", "contribution"] = "top"
    num_drop: int = Field(ge=1)


class PruneStudent(StudentBase):
    """Attention heads and feed-forward neurons by importance on held-out text, physically removed."""

    method: Literal["prune"]
    heads_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    ffn_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    importance: Literal["taylor", "contribution"] = "taylor"

    @model_validator(mode="after")
    def _check(self) -> PruneStudent:
        if self.heads_fraction == 0 and self.ffn_fraction == 0:
            raise ValueError(f"students.{self.name}: set heads_fraction or ffn_fraction above 0")
        return self


class QuantizeStudent(StudentBase):
    """int8: PyTorch dynamic quantization, or ONNX export with ONNX Runtime's graph optimisations and int8."""

    method: Literal["quantize"]
    backend: Literal["torch", "onnx"] = "onnx"


Student = Annotated[Union[DistillStudent, TheseusStudent, LayerDropStudent, PruneStudent, QuantizeStudent],
                    Field(discriminator="method")]


class CompressConfig(StrictModel):
    teacher: str = Field("pretrain", description="'pretrain' (this recipe's export) or a BERT/ALBERT folder")
    students: list[Student] = Field(min_length=1)
    # Held-out examples for layer scores, importance, agreement and speed (from the tokenizer stage's heldout/).
    heldout_examples: int = Field(256, ge=8)
    # Latency (batch 1, sequence 128, 1 thread) of teacher and students measured for the model cards.
    measure_speed: bool = runtime_field(True)

    @model_validator(mode="after")
    def _check(self) -> CompressConfig:
        seen: set[str] = set()
        for s in self.students:
            if s.name in seen or s.name == "teacher":
                raise ValueError(f"compress.students: the name {s.name!r} is used twice (or is 'teacher')")
            if s.source != "teacher" and s.source not in seen:
                raise ValueError(f"compress.students.{s.name}.source={s.source!r} is not the teacher or an "
                                 f"earlier student; use one of {['teacher', *sorted(seen)]}")
            seen.add(s.name)
        return self
