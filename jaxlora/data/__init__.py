"""Data for jaxlora's experiments: fortunes topics, chatterbot dialogues, batching.

Raw loaders return Python lists of texts; ``encode_*`` turns them into dicts of fixed-length
int32 numpy arrays; :class:`Batches` iterates over those, resumable from an integer
position, and :class:`BucketedBatches` pads each batch to the next of a few lengths only
(a jitted step compiles once per length). Everything is deterministic given a seed.
"""

from jaxlora.data.chatterbot import load_dialogues
from jaxlora.data.core import (
    Batches,
    BucketedBatches,
    bucket_lengths,
    bucketed_sequential_batches,
    pad_to_length,
    sequence_lengths,
    sequential_batches,
    train_validation_split,
)
from jaxlora.data.fortunes import TOPICS, fortune_topics, load_fortunes, read_fortune_file
from jaxlora.data.text import CHATML, encode_classification, encode_dialogues, encode_texts

__all__ = [
    "CHATML",
    "TOPICS",
    "Batches",
    "BucketedBatches",
    "bucket_lengths",
    "bucketed_sequential_batches",
    "encode_classification",
    "encode_dialogues",
    "encode_texts",
    "fortune_topics",
    "load_dialogues",
    "load_fortunes",
    "pad_to_length",
    "read_fortune_file",
    "sequence_lengths",
    "sequential_batches",
    "train_validation_split",
]
