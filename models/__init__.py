"""The hooked transformer, its loaders and the registry of named models."""

from models.frame import KVCache
from models.config import TransformerConfig
from models.encoder_decoder import DecoderInputError, HookedEncoderDecoder
from models.hooked_transformer import HookedTransformer, NoUnembedError
from models.loading import load, save_model
from models.registry import REGISTRY, MissingPackageError, UnknownModelError
from models.tokenizer import ContextLengthError, NoTokenizerError, Tokenized

__all__ = [
    "HookedTransformer", "HookedEncoderDecoder", "DecoderInputError", "TransformerConfig", "KVCache", "load", "save_model", "REGISTRY",
    "ContextLengthError", "NoTokenizerError", "NoUnembedError", "Tokenized", "UnknownModelError",
    "MissingPackageError",
]
