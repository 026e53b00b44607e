"""The GPT model on megatron-core: `build_model(run, vocab_size)` and the shared attention `WindowControl`."""
from fwpkm_megatron.model.attention import WindowControl
from fwpkm_megatron.model.gpt import build_model, transformer_config

__all__ = ["WindowControl", "build_model", "transformer_config"]
