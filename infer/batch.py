"""`kompakt infer`: a model over a corpus, one Parquet output shard per input file, resumable and exact.

Layout of `--out DIR`:

    manifest.json             the run's settings (model fingerprint, task, options) and its inputs; `complete`
                              once every input has its shard
    shards/part-00000.parquet outputs of input 0 (sorted input order): `id` plus the task's columns
    shards/part-00000.json    written last, after the Parquet and the rejects: rows, rejects, seconds. A
                              shard without it is not done and is redone from scratch on the next run
    rejected/part-00000.jsonl rows that could not be processed: {"id", "reason"} (empty text, too many tokens
                              without --truncate, invalid UTF-8)

Every file is written under a temporary name, fsynced and renamed, so a kill at any moment leaves whole
shards and nothing half-written that looks done; a rerun with the same settings skips done shards and
redoes the rest, so no row is written twice or lost. A rerun with other settings into the same folder is
refused (one line), as mixing two models' outputs in one folder would be wrong.

Speed: texts are read and tokenised in a background thread one chunk (`--rows-per-chunk`) ahead of the
model, batches are length-bucketed (see kompakt.infer.runtime), and the runtime is the fastest the model
folder has. Scale-out: `--workers N` local processes, `--shard i/N` for one task of a Slurm array (what
`--slurm N` submits, followed by a task that checks and completes the manifest), or `--ray` with Ray Data.
Each input file's shard depends on that file and the model only, so every mode writes identical rows.
"""

from __future__ import annotations

import glob
import json
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np

from kompakt.errors import ConfigError, DataError
from kompakt.log import info, warn
from kompakt.runs import file_fingerprint, hash_obj, package_versions, write_json_atomic

FORMAT = 1
PROGRESS_EVERY_S = 10.0


# ------------------------------------------------------------------------------------------- settings

def expand_inputs(patterns: list[str]) -> list[Path]:
    """Input files in a stable order: each pattern's glob matches sorted, duplicates dropped."""
    from kompakt.readers import file_format

    if not patterns:
        raise ConfigError("no inputs: give input files or globs after the model folder")
    out: list[Path] = []
    for pat in patterns:
        matches = sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
        if not matches:
            raise DataError(f"{pat}: no input matches this pattern")
        for m in matches:
            p = Path(m)
            if not p.exists():
                raise DataError(f"{p}: no such input file")
            file_format(p)  # an unknown format is one line now, not after an hour of the others
            if p not in out:
                out.append(p)
    return out


def model_fingerprint(folder: Path) -> str:
    """Content hash of the files that decide the outputs: config, weights, tokenizer, ONNX graphs."""
    parts = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".onnx", ".txt", ".model", ".bin")):
            parts[f.name] = file_fingerprint(f)
    return hash_obj(parts, 16)


def settings_of(args, predictor, inputs: list[Path]) -> dict:
    """What the outputs depend on; two runs into one folder must agree on all of it."""
    return {
        "format": FORMAT, "model_fingerprint": model_fingerprint(predictor.folder),
        "task": predictor.task, "runtime": predictor.runtime, "max_length": predictor.max_length,
        "truncate": bool(args.truncate), "pooling": predictor.pooling if predictor.task == "embed" else None,
        "normalize": bool(predictor.normalize) if predictor.task == "embed" else None,
        "float16": bool(args.float16) if predictor.task == "embed" else None,
        "text_field": args.text_field, "id_field": args.id_field, "txt_document": args.txt_document,
        "inputs": [str(p.resolve()) for p in inputs],
    }


def _reader_config(args):
    from kompakt.config import DataConfig

    return DataConfig(inputs=["-"], txt_document=args.txt_document, text_field=args.text_field,
                      id_field=args.id_field, on_decode_error="skip")


def open_output(out: Path, settings: dict, model: str = "") -> dict:
    """Create or reopen the output folder; refuse one that holds another configuration's outputs. Temporary
    files of a killed run (`.part-*.tmp-<pid>`) are removed: their shards are redone from scratch."""
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "rejected").mkdir(exist_ok=True)
    for sub in ("shards", "rejected"):
        for stale in (out / sub).glob(".part-*.tmp-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if not (pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid))):
                stale.unlink(missing_ok=True)
    path = out / "manifest.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{path} is not valid JSON; move the folder away or use another --out") from None
        diff = sorted(k for k in set(old.get("settings", {})) | set(settings)
                      if old.get("settings", {}).get(k) != settings.get(k))
        if diff:
            raise DataError(f"{out} holds outputs made with other settings ({', '.join(diff)}); use another --out "
                            "or remove it")
        return old
    manifest = {"settings": settings, "complete": False, "versions": package_versions(), "model": model,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json_atomic(path, manifest)
    return manifest


def _alive(pid: int) -> bool:
    """Whether a process of this host still runs (an array task beside us writes its own temp files)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shard_name(k: int) -> str:
    return f"part-{k:05d}"


def shard_done(out: Path, k: int) -> dict | None:
    """The done record of input k's shard, or None when it must be (re)done."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rec = out / "shards" / f"{shard_name(k)}.json"
    if not rec.is_file():
        return None
    try:
        record = json.loads(rec.read_text(encoding="utf-8"))
        # The footer holds the row count: a truncated or corrupted Parquet file fails here and is redone.
        if pq.ParquetFile(out / "shards" / f"{shard_name(k)}.parquet").metadata.num_rows != record["rows"]:
            raise ValueError("row count")
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException, UnicodeDecodeError):
        warn(f"infer: {out / 'shards' / shard_name(k)}.parquet is missing or damaged; redoing it")
        rec.unlink(missing_ok=True)
        return None
    return record


# ---------------------------------------------------------------------------------------------- writing

def _schema(predictor, float16: bool):
    import pyarrow as pa

    if predictor.task == "classify":
        if predictor.regression:
            return pa.schema([("id", pa.string()), ("value", pa.float32())])
        return pa.schema([("id", pa.string()), ("label", pa.string()), ("score", pa.float32()),
                          ("probs", pa.list_(pa.float32(), len(predictor.labels)))])
    if predictor.task == "tokens":
        span = pa.struct([("start", pa.int32()), ("end", pa.int32()), ("label", pa.string()), ("score", pa.float32())])
        return pa.schema([("id", pa.string()), ("spans", pa.list_(span))])
    dim = int(predictor.config.get("hidden_size") or predictor.config.get("dim"))
    return pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float16() if float16 else pa.float32(), dim))])


def _table(ids: list[str], outputs: list[dict], schema, float16: bool):
    import pyarrow as pa

    cols: dict[str, object] = {"id": ids}
    names = schema.names[1:]
    if names == ["embedding"]:
        dtype = np.float16 if float16 else np.float32
        flat = (np.stack([o["embedding"] for o in outputs]).astype(dtype).reshape(-1) if outputs
                else np.zeros(0, dtype))
        cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(flat), schema.field("embedding").type.list_size)
    else:
        for n in names:
            cols[n] = [o[n] for o in outputs]
    return pa.Table.from_pydict(cols, schema=schema)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


# -------------------------------------------------------------------------------------------- one shard

def _chunks(path: Path, rcfg, predictor, rows_per_chunk: int, truncate: bool, counter):
    """(ids, encoded, ok rows, rejects, text bytes) per chunk of one input, read and tokenised."""
    from kompakt.readers import read_documents

    def flush(ids, texts):
        rejects = []
        keep_ids, keep_texts = [], []
        for i, t in zip(ids, texts):
            if not t.strip():
                rejects.append({"id": i, "reason": "empty text"})
            else:
                keep_ids.append(i)
                keep_texts.append(t)
        enc = predictor.encode(keep_texts) if keep_texts else None
        ok = []
        for r, i in enumerate(keep_ids):
            n = len(enc.ids[r])
            if n > predictor.max_length:
                if not truncate:
                    rejects.append({"id": i, "reason": f"{n} tokens, over the limit of {predictor.max_length} "
                                                       "(--truncate cuts such texts instead)"})
                    continue
                predictor.truncate(enc, r)
            ok.append(r)
        if counter.skipped:
            rejects += [{"id": i, "reason": why} for i, why in counter.skipped]
            counter.skipped.clear()
        nbytes = sum(len(t.encode("utf-8", "replace")) for t in texts)
        return keep_ids, enc, ok, rejects, nbytes

    ids, texts = [], []
    for doc_id, text in read_documents(path, rcfg, counter):
        ids.append(doc_id)
        texts.append(text)
        if len(ids) >= rows_per_chunk:
            yield flush(ids, texts)
            ids, texts = [], []
    if ids or counter.skipped:
        yield flush(ids, texts)


def _ahead(gen, depth: int = 2):
    """Run a generator in a thread, `depth` items ahead of the consumer; its exceptions re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = object()

    def work():
        try:
            for item in gen:
                q.put(item)
            q.put(stop)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
            q.put(err)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if item is stop:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


class Progress:
    """Rows per second and an estimated time to finish, from the bytes of input text done so far."""

    def __init__(self, total_bytes: int, label: str):
        self.total, self.label = max(total_bytes, 1), label
        self.t0 = self.last = time.monotonic()
        self.rows = self.bytes = 0

    def add(self, rows: int, nbytes: int, force: bool = False) -> None:
        self.rows += rows
        self.bytes = self.total if force else self.bytes + nbytes
        now = time.monotonic()
        if force or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            dt = max(now - self.t0, 1e-9)
            eta = dt * max(self.total - self.bytes, 0) / max(self.bytes, 1)
            info(f"infer{self.label}: {self.rows:,} rows, {self.rows / dt:,.1f} rows/s, "
                 f"{min(self.bytes / self.total, 1):.1%} of the input text, about {_hms(eta)} to go")


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def run_shard(k: int, path: Path, out: Path, predictor, args, progress: Progress) -> dict:
    """Input k into shards/part-k.parquet (+ rejects), atomically; the done record is written last."""
    import pyarrow.parquet as pq

    from kompakt.readers import DecodeCounter

    t0 = time.perf_counter()
    name = shard_name(k)
    final = out / "shards" / f"{name}.parquet"
    rej_final = out / "rejected" / f"{name}.jsonl"
    tmp, rej_tmp = _tmp(final), _tmp(rej_final)
    schema = _schema(predictor, args.float16)
    counter = DecodeCounter(keep=True)
    num_rows = num_rejected = 0
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer, open(rej_tmp, "w", encoding="utf-8") as rej:
            chunks = _chunks(path, _reader_config(args), predictor, args.rows_per_chunk, args.truncate, counter)
            for ids, enc, ok, rejects, nbytes in _ahead(chunks):
                outputs = predictor.predict_encoded(enc, ok) if ok else []
                writer.write_table(_table([ids[r] for r in ok], outputs, schema, args.float16))
                for r in rejects:
                    rej.write(json.dumps(r, ensure_ascii=False) + "\n")
                num_rows += len(ok)
                num_rejected += len(rejects)
                progress.add(len(ok) + len(rejects), nbytes)
            rej.flush()
            os.fsync(rej.fileno())
        _fsync_replace(tmp, final)
        os.replace(rej_tmp, rej_final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        rej_tmp.unlink(missing_ok=True)
        raise
    record = {"input": str(path), "input_fingerprint": file_fingerprint(path), "rows": num_rows,
              "rejected": num_rejected, "seconds": round(time.perf_counter() - t0, 3)}
    write_json_atomic(out / "shards" / f"{name}.json", record)
    return record


# ----------------------------------------------------------------------------------------------- drivers

def _predictor(args):
    from kompakt.infer.runtime import load_predictor

    return load_predictor(args.model, args.task, runtime=args.runtime, device=args.device, pooling=args.pooling,
                          normalize=args.normalize, max_length=args.max_length,
                          batch_tokens=args.batch_tokens, threads=args.threads)


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: write it as I/N, e.g. 0/8") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard {text!r}: I must be in 0..N-1")
    return i, n


def process(args, inputs: list[Path], out: Path, mine: list[int], label: str = "", predictor=None) -> list[dict]:
    """Do the shards `mine` that are not done yet, in this process."""
    todo = [k for k in mine if shard_done(out, k) is None]
    if not todo:
        return []
    predictor = predictor or _predictor(args)
    progress = Progress(sum(inputs[k].stat().st_size for k in todo), label)
    done = []
    for k in todo:
        done.append(run_shard(k, inputs[k], out, predictor, args, progress))
    progress.add(0, 0, force=True)
    return done


def _worker(argv: dict, inputs: list[str], out: str, mine: list[int], label: str) -> int:
    import argparse

    return len(process(argparse.Namespace(**argv), [Path(p) for p in inputs], Path(out), mine, label))


def finish(out: Path, inputs: list[Path]) -> dict:
    """Mark the manifest complete when every input's shard is done; returns the totals."""
    records = [shard_done(out, k) for k in range(len(inputs))]
    missing = [k for k, r in enumerate(records) if r is None]
    path = out / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    totals = {"num_inputs": len(inputs), "num_done": len(inputs) - len(missing),
              "rows": sum(r["rows"] for r in records if r), "rejected": sum(r["rejected"] for r in records if r)}
    manifest.update(totals, complete=not missing)
    write_json_atomic(path, manifest)
    return {**totals, "missing": missing}


def run_local(args, inputs: list[Path], out: Path, predictor=None) -> None:
    i, n = parse_shard(args.shard)
    mine = [k for k in range(len(inputs)) if k % n == i]
    workers = max(1, min(args.workers, len(mine)))
    if workers == 1:
        process(args, inputs, out, mine, f" [{i}/{n}]" if n > 1 else "", predictor)
        return
    import multiprocessing as mp

    # spawn, not fork: torch and tokenizers hold threads that a forked child would inherit broken.
    ctx = mp.get_context("spawn")
    per = max(1, (args.threads or os.cpu_count() or 1) // workers)
    argv = {**vars(args), "threads": per}
    with ctx.Pool(workers) as pool:
        jobs = [pool.apply_async(_worker, (argv, [str(p) for p in inputs], str(out), mine[w::workers], f" [w{w}]"))
                for w in range(workers)]
        for j in jobs:
            j.get()


def run_ray(args, inputs: list[Path], out: Path) -> None:
    """Ray Data: one item per input file, `map_batches` with a model actor per worker (the actor loads the
    model once and writes whole shards exactly as a local process does)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray Data: pip install 'ray[data]'") from None
    argv = dict(vars(args))
    todo = [k for k in range(len(inputs)) if shard_done(out, k) is None]
    if not todo:
        return

    class ShardWriter:
        def __init__(self):
            import argparse

            self.args = argparse.Namespace(**argv)
            self.predictor = _predictor(self.args)

        def __call__(self, batch):
            rows = []
            for k in batch["k"]:
                k = int(k)
                rec = run_shard(k, inputs[k], out, self.predictor, self.args, Progress(inputs[k].stat().st_size, " [ray]"))
                rows.append(rec["rows"])
            return {"k": batch["k"], "rows": np.asarray(rows)}

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)
    workers = max(1, min(args.workers, len(todo)))
    ds = ray.data.from_items([{"k": k} for k in todo])
    ds.map_batches(ShardWriter, batch_size=1, concurrency=workers).materialize()


def main(args) -> int:
    """The `kompakt infer` command (see kompakt/cli.py for its options)."""
    if args.export_onnx:
        from kompakt.hf_lattice import is_lattice_folder
        from kompakt.infer.runtime import folder_task
        from kompakt.onnx_export import export_task_onnx

        folder = Path(args.model)
        if is_lattice_folder(folder):
            info(f"infer: --export-onnx skipped: ONNX export does not support Lattice-BERT ({folder}: its graph would "
                 "lack the lattice_start/lattice_end inputs); inference runs the torch model")
        else:
            head = args.task if args.task in ("classify", "tokens") else (folder_task(folder) if args.task is None else None)
            report = export_task_onnx(folder, head=head)
            info(f"infer: wrote {', '.join(report.get('files', []))} into {folder} "
                 f"(fp32 ONNX within {report.get('max_abs_diff_fp32', float('nan')):.2g} of torch)")
        if not args.inputs:
            return 0
    if args.out is None:
        raise ConfigError("--out DIR is needed: the folder for the output shards")
    inputs = expand_inputs(args.inputs)
    out = Path(args.out)
    if args.slurm:
        from kompakt.slurm.submit import submit_infer

        submit_infer(args, inputs, out)
        return 0
    predictor = _predictor(args)  # refuses a wrong --task or folder before anything is written
    open_output(out, settings_of(args, predictor, inputs), str(Path(args.model).resolve()))
    t0 = time.perf_counter()
    if args.ray:
        run_ray(args, inputs, out)
    else:
        run_local(args, inputs, out, predictor if args.workers <= 1 else None)
    if args.shard is not None and parse_shard(args.shard)[1] > 1:
        return 0  # one array task: the final task completes the manifest
    totals = finish(out, inputs)
    if totals["missing"]:
        warn(f"infer: {len(totals['missing'])} of {len(inputs)} inputs have no shard yet; rerun to finish them")
        return 1
    info(f"infer: {totals['rows']:,} rows ({totals['rejected']:,} rejected, see {out / 'rejected'}) from "
         f"{len(inputs)} inputs in {time.perf_counter() - t0:.1f} s; {out / 'manifest.json'} complete")
    print(out)
    return 0
