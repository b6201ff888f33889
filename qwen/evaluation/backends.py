"""Where the answers come from: a model loaded here (batched), or an OpenAI-compatible server.

:class:`LocalBackend` batches everything: choice scoring through :class:`ChoiceScorer`,
chat through ``model.chat_batch``, plain completion through one left-padded ``generate``
per batch that stops each row at the first stop string. :class:`APIBackend` sends
concurrent requests to ``/v1/chat/completions`` or ``/v1/completions`` (this repository's
``openai_api.py``, or vLLM serving the Qwen2 export), with the standard library only.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..qwen_generation_utils import DEFAULT_SYSTEM
from .scoring import ChoiceScore, ChoiceScorer, _pad_id, choice_token_ids

logger = logging.getLogger(__name__)


def load_model(checkpoint: str | Path, dtype: str = "auto", device: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a checkpoint: full, GPTQ Int4/Int8 (through its quantization
    config), or a LoRA adapter directory (``adapter_config.json``; merged into its base)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    kwargs: dict[str, Any] = {}
    if dtype != "auto":
        if dtype not in dtypes:
            raise ValueError(f"dtype must be auto, bf16, fp16 or fp32; got {dtype!r}")
        kwargs["dtype"] = dtypes[dtype]
    if device is not None:
        kwargs["device_map"] = device
    elif torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    adapter = Path(checkpoint) / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel  # the finetuning extra

        base = json.loads(adapter.read_text())["base_model_name_or_path"]
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
        model = PeftModel.from_pretrained(model, str(checkpoint)).merge_and_unload()
        tokenizer_source = checkpoint if (Path(checkpoint) / "qwen.tiktoken").is_file() else base
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
        tokenizer_source = checkpoint
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    model.eval()
    model.generation_config.do_sample = False  # greedy, as the original evaluation
    return model, tokenizer


class _StopStrings(StoppingCriteria):
    """Stops each row once its generated text contains one of ``stops``."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_width: int, window: int = 12):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.width = prompt_width
        self.window = window

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stops:
            return done
        tails = input_ids[:, max(self.width, input_ids.shape[1] - self.window) :].tolist()
        for row, tail in enumerate(tails):
            text = self.tokenizer.decode(tail, errors="replace")
            done[row] = any(stop in text for stop in self.stops)
        return done


class LocalBackend:
    """A model in this process. ``batch_size`` rows per forward / ``generate``."""

    kind = "local"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @property
    def is_chat(self) -> bool:
        return getattr(self.model.generation_config, "chat_format", None) == "chatml"

    def scorer(self, choices: Sequence[str], choice_prefix: str, max_seq_len: int | None) -> ChoiceScorer:
        ids = choice_token_ids(self.tokenizer, choices, choice_prefix)
        return ChoiceScorer(self.model, self.tokenizer, ids, batch_size=self.batch_size, max_seq_len=max_seq_len)

    def score_choices(
        self, prefix: str, questions: Sequence[str], choices: Sequence[str], choice_prefix: str, max_seq_len: int | None
    ) -> list[ChoiceScore]:
        return self.scorer(choices, choice_prefix, max_seq_len).score(prefix, questions)

    def chat(
        self, queries: Sequence[str], system: str = DEFAULT_SYSTEM, max_new_tokens: int | None = None
    ) -> list[str]:
        kwargs: dict[str, Any] = {"do_sample": False}
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
        out: list[str] = []
        for start in range(0, len(queries), self.batch_size):
            responses, _ = self.model.chat_batch(
                self.tokenizer, list(queries[start : start + self.batch_size]), system=system, **kwargs
            )
            out.extend(responses)
        return out

    @torch.no_grad()
    def complete(self, prompts: Sequence[str], stops: Sequence[str], max_new_tokens: int | None = None) -> list[str]:
        """Greedy continuations of raw prompts, each cut at the first stop string."""
        from .extract import cut_at

        out: list[str] = []
        pad = _pad_id(self.tokenizer)
        eod = self.tokenizer.eod_id
        for start in range(0, len(prompts), self.batch_size):
            encoded = [list(self.tokenizer.encode(p)) for p in prompts[start : start + self.batch_size]]
            width = max(len(ids) for ids in encoded)
            input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for row, ids in enumerate(encoded):
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                mask[row, width - len(ids) :] = 1
            kwargs: dict[str, Any] = {"do_sample": False, "pad_token_id": pad}
            if max_new_tokens is not None:
                kwargs["max_new_tokens"] = max_new_tokens
            criteria = StoppingCriteriaList([_StopStrings(self.tokenizer, stops, width)])
            device = self.model.device
            sequences = self.model.generate(
                input_ids.to(device), attention_mask=mask.to(device), stopping_criteria=criteria, **kwargs
            )
            for row in sequences[:, width:].tolist():
                ends = [i for i, t in enumerate(row) if t in (eod, pad)]
                text = self.tokenizer.decode(row[: ends[0]] if ends else row, errors="replace")
                out.append(cut_at(text, stops))
        return out


class APIError(RuntimeError):
    """A request to the OpenAI-compatible server failed."""


class APIBackend:
    """An OpenAI-compatible server at ``base_url`` (``http://host:port/v1``)."""

    kind = "api"

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 600.0,
        is_chat: bool = True,
    ):
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY")
        self.concurrency = concurrency
        self.timeout = timeout
        self.is_chat = is_chat
        self.model = model or self._first_model()
        self.logprobs_supported: bool | None = None

    def _request(self, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:500]
            raise APIError(f"{path}: HTTP {error.code}: {detail}") from error
        except urllib.error.URLError as error:
            raise APIError(f"{self.base_url}{path}: {error.reason}") from error

    def _first_model(self) -> str:
        models = self._request("/models").get("data") or []
        if not models:
            raise APIError(f"{self.base_url}/models lists no model; pass the model name")
        return models[0]["id"]

    def _map(self, fn, items: Sequence[Any]) -> list[Any]:
        with concurrent.futures.ThreadPoolExecutor(max(1, self.concurrency)) as pool:
            return list(pool.map(fn, items))

    def chat(
        self, queries: Sequence[str], system: str = DEFAULT_SYSTEM, max_new_tokens: int | None = None
    ) -> list[str]:
        def one(query: str) -> str:
            body: dict[str, Any] = {
                "model": self.model,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": query}],
                "temperature": 0,
            }
            if max_new_tokens is not None:
                body["max_tokens"] = max_new_tokens
            return self._request("/chat/completions", body)["choices"][0]["message"]["content"] or ""

        return self._map(one, queries)

    def complete(self, prompts: Sequence[str], stops: Sequence[str], max_new_tokens: int | None = None) -> list[str]:
        from .extract import cut_at

        def one(prompt: str) -> str:
            body: dict[str, Any] = {"model": self.model, "prompt": prompt, "temperature": 0}
            body["max_tokens"] = max_new_tokens if max_new_tokens is not None else 512
            server_stops = [s for s in stops if s != "<|endoftext|>"][:4]  # OpenAI allows four
            if server_stops:
                body["stop"] = server_stops
            return cut_at(self._request("/completions", body)["choices"][0]["text"], stops)

        return self._map(one, prompts)

    def score_choices(
        self, prefix: str, questions: Sequence[str], choices: Sequence[str], choice_prefix: str, max_seq_len: int | None
    ) -> list[ChoiceScore]:
        """From the top log-probabilities of the first completion token where the server
        gives them (vLLM); else (this repository's server) from the greedy first token:
        the chosen letter scores 0, the others -inf (the argmax over the whole vocabulary,
        which can be no letter at all: then every choice is -inf and the question is wrong)."""
        answers = [choice_prefix + c for c in choices]

        def one(question: str) -> ChoiceScore:
            body: dict[str, Any] = {"model": self.model, "prompt": prefix + question, "max_tokens": 1, "temperature": 0}
            if self.logprobs_supported is not False:
                try:
                    reply = self._request("/completions", dict(body, logprobs=20))
                    self.logprobs_supported = True
                    top = (reply["choices"][0].get("logprobs") or {}).get("top_logprobs") or [{}]
                    return ChoiceScore([float(top[0].get(a, -math.inf)) for a in answers], reused_prefix=False)
                except APIError as error:
                    if "logprobs" not in str(error):
                        raise
                    logger.warning("the server gives no logprobs: scoring by its greedy first token instead")
                    self.logprobs_supported = False
            text = self._request("/completions", body)["choices"][0]["text"]
            return ChoiceScore([0.0 if text == a else -math.inf for a in answers], reused_prefix=False)

        return self._map(one, questions)
