"""Triton kernels for the FwPKM memory ops, each matching `ops/reference.py` forward and backward.

address.py  product-key addressing: sub-key scores, top-k per codebook, k*k merge, top-k, softmax (fused);
            its backward, and the addressing loss's key step (gradient and Hessian-vector product)
read.py     sparse read (embedding-bag over the H*k rows of a token), fp32 accumulation, and its backward
write.py    closed-form chunk value write (segmented, deterministic) and its backward
scan.py     the chunked read-then-write scan on these kernels (versioned row store, manual reverse pass)

Import through `fwpkm_megatron.ops` (the dispatcher), never directly from layers. On a machine without
a GPU the kernels run only under TRITON_INTERPRET=1, which must be set before triton is first imported.
docs/kernels.md describes what each kernel fuses and its memory traffic.
"""
from .address import addressing_loss_topk, pkm_address
from .read import pkm_read
from .scan import fwpkm_scan, fwpkm_scan_rows
from .write import value_write

__all__ = ["addressing_loss_topk", "fwpkm_scan", "fwpkm_scan_rows", "pkm_address", "pkm_read", "value_write"]
