"""The data path: prepare token shards from corpora (prepare.py, readers.py), read a prepared directory
through its checked contract (layout.py), stream batches from one dataset or a weighted mixture
(stream.py), and build NIAH evaluation sets (niah.py).

`streaming` is imported lazily (about 4 s) and only through `streaming_compat.import_streaming()`, which
works around the CPU-torch/CUDA-torchvision mismatch.
"""
from fwpkm_megatron.data.layout import load_tokenizer, read_manifest, split_documents
from fwpkm_megatron.data.prepare import existing_prep, prepare_corpus
from fwpkm_megatron.data.readers import DataError
from fwpkm_megatron.data.stream import MixtureSource, TokenStream, build_loader

__all__ = ["DataError", "MixtureSource", "TokenStream", "build_loader", "existing_prep", "load_tokenizer",
           "prepare_corpus", "read_manifest", "split_documents"]
