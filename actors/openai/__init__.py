"""The OpenAI-compatible API, shared by a worker's HTTP front and the frontend:
request parsing and validation, tokenizers (run off the event loop), rendering
of responses and stream chunks, and the HTTP server itself."""

from .request import OpenAICall, Prompt, parse_call, prompt_payload
from .server import ModelBackend, OpenAIServer, OutputStream, ServedModel
from .tokenizer import ByteTokenizer, HfTokenizer, IncrementalDetokenizer, Tokenizer, TokenizerRunner

__all__ = [
    "ByteTokenizer",
    "HfTokenizer",
    "IncrementalDetokenizer",
    "ModelBackend",
    "OpenAICall",
    "OpenAIServer",
    "OutputStream",
    "Prompt",
    "ServedModel",
    "Tokenizer",
    "TokenizerRunner",
    "parse_call",
    "prompt_payload",
]
