"""The data path: prepare packed token shards (prepare.py), stream batches from them (stream.py).

`streaming` is imported lazily (about 4 s) and only through `streaming_compat.import_streaming()`, which
works around the CPU-torch/CUDA-torchvision mismatch.
"""
from fwpkm_megatron.data.prepare import (DataError, existing_prep, load_tokenizer, prepare_corpus,
                                         read_manifest)
from fwpkm_megatron.data.stream import TokenStream, build_loader

__all__ = ["DataError", "TokenStream", "build_loader", "existing_prep", "load_tokenizer", "prepare_corpus",
           "read_manifest"]
