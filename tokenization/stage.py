"""The tokenization stage: prepared corpus -> tokenizer, report and packed token shards.

Writes into `run.work_dir`:

- `tokenizer/`   a Hugging Face folder that `AutoTokenizer.from_pretrained` loads offline
- `report.json`  fertility (characters per token for Chinese), unknown rate, whole-word share or
                 lexicon coverage, and round trips on held-out documents (tokenization/report.py)
- `tokens/`      packed shards (kompakt/shards.py) of the training documents only
- `heldout/`     the same format, of the held-out documents only, for pretraining's evaluation
- `tokenizer/lexicon.txt`  Chinese with `lexicon` only: the word lexicon of lattice models, kept in
  the tokenizer folder because word k's id is vocab_size + k, so it travels with the tokenizer

Held-out documents (by a hash of their id, `heldout_fraction`; at least one when the corpus has
two or more) are left out of tokenizer training, so the report measures text the tokenizer has not
seen, and out of `tokens/`, so pretraining never trains on them: they go to `heldout/`, whole.
"""

from __future__ import annotations

from pathlib import Path

from kompakt.config import TokenizerConfig
from kompakt.errors import DataError
from kompakt.log import info, table
from kompakt.runs import StageRun, write_json_atomic
from kompakt.tokenization.corpus import corpus_files, heldout_split, iter_texts, row_counts
from kompakt.tokenization.lexicon import build_lexicon, lexicon_source, write_lexicon
from kompakt.tokenization.pretokenize import pretokenize
from kompakt.tokenization.report import evaluate, report_rows
from kompakt.tokenization.train import save_hf, special_tokens, train_tokenizer


def run(cfg: TokenizerConfig, corpus_dir: Path, run: StageRun) -> None:
    """Train the tokenizer on `corpus_dir/corpus/*.parquet`, report on held-out text, write shards."""
    files = corpus_files(corpus_dir)
    num_docs = sum(row_counts(files))
    if num_docs == 0:
        raise DataError(f"{corpus_dir}/corpus: the corpus has no documents; check the data section's filters")
    info(f"tokenizer: training {cfg.kind} ({cfg.family}, vocab {cfg.vocab_size_rounded}) on {num_docs:,} documents "
         f"less a {cfg.heldout_fraction:.0%} held-out share")

    split = heldout_split(files, cfg.heldout_fraction)
    with run.timed("train_s"):
        tok = train_tokenizer(cfg, lambda: iter_texts(files, split, heldout=False, max_docs=cfg.max_train_docs))
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    save_hf(tok, cfg, run.work_dir / "tokenizer")

    num_lexicon_words, lexicon = None, None
    if cfg.lexicon is not None:
        words = build_lexicon(tok.get_vocab(with_added_tokens=False), lexicon_source(cfg.lexicon), cfg.lexicon_size)
        write_lexicon(run.work_dir / "tokenizer" / "lexicon.txt", words)
        num_lexicon_words, lexicon = len(words), [w for w, _ in words]

    with run.timed("report_s"):
        scores = evaluate(tok, cfg.kind, iter_texts(files, split, heldout=True),
                          special_tokens(cfg.family)["unk_token"], chinese_chars=cfg.chinese_chars, lexicon=lexicon)
    report = {"kind": cfg.kind, "family": cfg.family, "vocab_size": vocab_size, "lowercase": cfg.lowercase,
              "strip_accents": cfg.strip_accents, "heldout": scores}
    if num_lexicon_words is not None:
        report.update(num_lexicon_words=num_lexicon_words, lexicon="tokenizer/lexicon.txt")
    write_json_atomic(run.work_dir / "report.json", report)
    table(f"tokenizer {cfg.kind}/{cfg.family}, held-out documents", ["metric", "value"],
          report_rows(scores, vocab_size))

    with run.timed("pretokenize_s"):
        indexes = pretokenize(tok, files, run.work_dir / "tokens", cfg.docs_per_shard, cfg.num_proc,
                              split=split, heldout_dir=run.work_dir / "heldout")
    index, held = indexes["train"], indexes["heldout"]
    run.counts.update({"num_docs": index["num_docs"], "num_sentences": index["num_sentences"],
                       "num_tokens": index["num_tokens"], "num_shards": len(index["shards"]),
                       "vocab_size": vocab_size, "num_heldout_docs": held["num_docs"],
                       "num_heldout_tokens": held["num_tokens"]})
    if num_lexicon_words is not None:
        run.counts["num_lexicon_words"] = num_lexicon_words
    info(f"tokenizer: {index['num_tokens']:,} training tokens in {len(index['shards'])} shard(s), "
         f"{index['num_docs']:,} documents, {index['num_sentences']:,} sentences; "
         f"{held['num_tokens']:,} tokens of {held['num_docs']:,} held-out documents in heldout/")
