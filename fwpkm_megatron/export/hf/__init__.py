"""The remote code of an export directory (copied there by `writer.py`, next to a copy of
`ops/reference.py` named `fwpkm_reference.py` and of `ops/addressing.py` and `ops/row_products.py`, which it
imports).
`modeling_fwpkm.py` imports its siblings relatively, so it runs from an export directory, not from this
package; `configuration_fwpkm.py` and `fwpkm_integrity.py` have no relative imports and are also used by
the exporter."""
