"""Serving Qwen-1 chat models: a continuous-batching engine, the OpenAI API over it
(:mod:`qwen.serving.app`, needs the ``serve`` extra: fastapi, uvicorn, sse-starlette)
and Qwen's ReAct function calling.

Not part of the remote-code file set: this subpackage imports ``qwen`` absolutely.
"""

from qwen.serving.engine import (
    Completion,
    ContextLengthError,
    Engine,
    EngineStoppedError,
    QueueFullError,
    SamplingParams,
    TokenLogprob,
    Update,
)
from qwen.serving.function_call import ChatPrompt, ParsedReply, PromptError, build_chat_prompt, parse_react

__all__ = [
    "ChatPrompt",
    "Completion",
    "ContextLengthError",
    "Engine",
    "EngineStoppedError",
    "ParsedReply",
    "PromptError",
    "QueueFullError",
    "SamplingParams",
    "TokenLogprob",
    "Update",
    "build_chat_prompt",
    "parse_react",
]
