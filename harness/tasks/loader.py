"""Dataset loader for the bundled codecllm tasks, referenced from their YAMLs as `custom_dataset`.

lm-eval hands `dataset_kwargs.data_files` to `datasets.load_dataset("json", ...)` unchanged, so a relative path
would resolve against the process's working directory. Resolving it here, against this directory, makes the
YAMLs work wherever the repository is cloned or installed, also straight from `lm_eval --include_path`.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_jsonl(data_files: dict[str, str], **_metadata):
    # lm-eval also passes the task's metadata (version, ...) as keyword arguments: not ours to use.
    import datasets

    files = {split: str(HERE / path) for split, path in data_files.items()}
    return datasets.load_dataset("json", data_files=files)
