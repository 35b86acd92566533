"""Data: text in many formats -> token shards on disk -> batches for training and evaluation.

- ``sources``: which files the inputs name, and one reader per format (text, JSON lines, Parquet)
- ``shards``: the shard file (a self-describing header), its writer and reader, and a split's
  shards read as one stream (``load_split``)
- ``prepare``: ``gptforge prepare``, inputs -> tokens -> shards, in parallel and resumable
- ``loader``: training batches with a resumable cursor, evaluation windows, and the feeder that
  takes batches to the device
- ``named``: datasets known by name (``shakespeare``), fetched once and verified

What the rest of gptforge uses is named here. The loader's names (it needs torch) are imported
on first use, so that ``prepare`` starts without torch (about a second of start-up).
"""

from typing import Any

from gptforge.data.named import (
    NAMED_DATASETS,
    NamedDataset,
    default_cache_dir,
    fetch_named_dataset,
)
from gptforge.data.prepare import DEFAULT_SHARD_TOKENS, prepare
from gptforge.data.shards import (
    ShardWriter,
    TokenStream,
    file_sha256,
    load_meta,
    load_split,
    read_shard,
    write_shard,
)
from gptforge.data.sources import FORMATS

_LOADER_NAMES = ("BatchFeeder", "TokenLoader", "count_eval_windows", "iter_eval_batches")


def __getattr__(name: str) -> Any:
    if name in _LOADER_NAMES:
        import gptforge.data.loader as loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "BatchFeeder",
    "DEFAULT_SHARD_TOKENS",
    "FORMATS",
    "NAMED_DATASETS",
    "NamedDataset",
    "ShardWriter",
    "TokenLoader",
    "TokenStream",
    "count_eval_windows",
    "default_cache_dir",
    "fetch_named_dataset",
    "file_sha256",
    "iter_eval_batches",
    "load_meta",
    "load_split",
    "prepare",
    "read_shard",
    "write_shard",
]
