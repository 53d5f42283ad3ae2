"""Text <-> token ids: GGUF and Hugging Face tokenizers, streaming detokenization, stop strings."""

from rillet.tokenizer.detokenizer import IncrementalDetokenizer
from rillet.tokenizer.stop import StopMatcher
from rillet.tokenizer.tokenizer import Tokenizer, TokenizerSettings

__all__ = ["IncrementalDetokenizer", "StopMatcher", "Tokenizer", "TokenizerSettings"]
