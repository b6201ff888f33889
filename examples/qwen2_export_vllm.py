"""Qwen-1 on vLLM: export the checkpoint to the Qwen2 layout, then chat through a small wrapper.

vLLM dropped the Qwen-1 architecture, so the original ``vllm_wrapper.py`` no longer
runs. Within its trained context a Qwen-1 model is exactly a ``Qwen2ForCausalLM``
(see docs/export.md): ``python -m qwen convert-qwen2`` (here
``qwen.convert.convert_qwen2``) rewrites it once, and vLLM runs the export natively.
:class:`Qwen2Chat` keeps the chat API of ``model.chat`` and of the old wrapper,
``chat(query, history, system) -> (response, history)``, plus ``chat_batch`` for
many independent chats at once (where vLLM shines), over vLLM's ``LLM.chat`` when vLLM
is installed, else over plain transformers (``Qwen2ForCausalLM``, the same export).

    pip install vllm   # on a CUDA machine
    python examples/qwen2_export_vllm.py --model Qwen/Qwen-7B-Chat --export-dir Qwen-7B-Chat-qwen2/ \\
        --query 你好 --query "Tell me more."

The export is skipped when ``--export-dir`` already holds one. Sampling follows the
export's ``generation_config.json`` (the source model's settings: top_p 0.8,
repetition penalty 1.1 for the official chat models) unless ``--greedy``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
from collections.abc import Sequence
from pathlib import Path

DEFAULT_SYSTEM = "You are a helpful assistant."
History = list[tuple[str, str]]


def export(model_dir: str | Path, export_dir: str | Path, dtype: str | None = None) -> Path:
    """Convert ``model_dir`` (an official-layout Qwen-1 checkpoint directory) into
    ``export_dir``, unless that already holds a Qwen2 checkpoint. Returns ``export_dir``."""
    from qwen.convert import convert_qwen2

    export_dir = Path(export_dir)
    config = export_dir / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "qwen2":
        logging.info("%s already holds a Qwen2 export; using it", export_dir)
        return export_dir
    return convert_qwen2(model_dir, export_dir, dtype=dtype)


class Qwen2Chat:
    """``model.chat``'s API over an exported chat checkpoint, on vLLM or transformers.

    Args:
        model_dir: The export (``convert-qwen2`` output).
        backend: "vllm", "transformers" or "auto" (vLLM where it is installed).
        max_new_tokens: Reply length cap.
        greedy: Greedy decoding instead of the checkpoint's sampling settings.
        **engine_options: For vLLM's ``LLM`` (``tensor_parallel_size``,
            ``gpu_memory_utilization``, ``dtype``, ``max_model_len``, ...).
    """

    def __init__(
        self,
        model_dir: str | Path,
        backend: str = "auto",
        max_new_tokens: int = 512,
        greedy: bool = False,
        **engine_options,
    ):
        from transformers import AutoTokenizer, GenerationConfig

        if backend == "auto":
            backend = "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
        if backend not in ("vllm", "transformers"):
            raise ValueError(f"backend must be 'auto', 'vllm' or 'transformers', got {backend!r}")
        self.backend = backend
        self.model_dir = str(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.generation_config = GenerationConfig.from_pretrained(self.model_dir)
        self.max_new_tokens = max_new_tokens
        self.greedy = greedy or not self.generation_config.do_sample
        # Where Qwen-1's model.chat stops: <|im_end|>, <|im_start|> and <|endoftext|>.
        self.stop_token_ids = self.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>", "<|endoftext|>"])
        if backend == "vllm":
            from vllm import LLM

            self.llm = LLM(model=self.model_dir, **engine_options)
        else:
            import torch
            from transformers import AutoModelForCausalLM

            if engine_options:
                logging.warning("ignoring options for vLLM: %s", ", ".join(engine_options))
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, device_map=device).eval()

    @staticmethod
    def messages(query: str, history: History | None = None, system: str = DEFAULT_SYSTEM) -> list[dict]:
        """The OpenAI-style message list of a chat turn (what the chat template renders)."""
        messages = [{"role": "system", "content": system}]
        for user, assistant in history or []:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return messages + [{"role": "user", "content": query}]

    def chat(self, query: str, history: History | None = None, system: str = DEFAULT_SYSTEM) -> tuple[str, History]:
        """One turn: ``(response, history)``, the history a new list with the turn added."""
        responses, histories = self.chat_batch([query], [history], system)
        return responses[0], histories[0]

    def chat_batch(
        self, queries: Sequence[str], histories: Sequence[History | None] | None = None, system: str = DEFAULT_SYSTEM
    ) -> tuple[list[str], list[History]]:
        """Several independent chats: ``queries[i]`` continues ``histories[i]``."""
        histories = list(histories) if histories is not None else [None] * len(queries)
        if len(histories) != len(queries):
            raise ValueError("give one history (or None) per query")
        conversations = [self.messages(q, h, system) for q, h in zip(queries, histories, strict=True)]
        if self.backend == "vllm":
            responses = self._vllm(conversations)
        else:
            responses = [self._transformers(conversation) for conversation in conversations]
        new_histories = [[*(h or []), (q, r)] for q, h, r in zip(queries, histories, responses, strict=True)]
        return responses, new_histories

    def _vllm(self, conversations: list[list[dict]]) -> list[str]:
        from vllm import SamplingParams

        config = self.generation_config
        params = SamplingParams(
            temperature=0.0 if self.greedy else (config.temperature or 1.0),
            top_p=config.top_p or 1.0,
            top_k=config.top_k or 0,  # 0: no top-k (as in transformers)
            repetition_penalty=config.repetition_penalty or 1.0,
            max_tokens=self.max_new_tokens,
            stop_token_ids=self.stop_token_ids,
        )
        outputs = self.llm.chat(conversations, params, use_tqdm=False)
        return [output.outputs[0].text.strip() for output in outputs]

    def _transformers(self, conversation: list[dict]) -> str:
        import torch

        inputs = self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        ).to(self.model.device)
        config = copy.deepcopy(self.generation_config)
        config.max_new_tokens = self.max_new_tokens
        config.eos_token_id = self.stop_token_ids
        if self.greedy:
            # greedy; the sampling settings back at transformers' defaults (unused, and unwarned)
            config.do_sample, config.top_p, config.top_k, config.temperature = False, 1.0, 50, 1.0
        with torch.no_grad():
            output = self.model.generate(**inputs, generation_config=config)
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="Qwen/Qwen-7B-Chat",
        help="a Qwen-1 chat checkpoint: a directory in the official layout, or a hub id to download "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--export-dir",
        default="qwen2-export",
        help="where the Qwen2 export goes, reused if present (default %(default)s)",
    )
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="export dtype (default: as stored)")
    parser.add_argument("--backend", choices=["auto", "vllm", "transformers"], default="auto", help="default: auto")
    parser.add_argument("--query", action="append", help="a query (repeat for a multi-turn chat)")
    parser.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt (default %(default)r)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="reply length cap (default 512)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM: GPUs to split the model over")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        from huggingface_hub import snapshot_download

        logging.info("%s is not a directory: downloading it from the Hugging Face Hub", args.model)
        model_dir = Path(snapshot_download(args.model))
    if not (model_dir / "config.json").is_file():
        parser.error(f"--model {args.model} is not a checkpoint directory (no config.json)")

    from qwen.convert import ConversionError

    try:
        export_dir = export(model_dir, args.export_dir, args.dtype)
    except ConversionError as error:
        parser.error(str(error))
    options = {"tensor_parallel_size": args.tensor_parallel_size} if args.tensor_parallel_size != 1 else {}
    chat = Qwen2Chat(export_dir, args.backend, args.max_new_tokens, args.greedy, **options)
    print(f"backend: {chat.backend}")
    history: History = []
    for query in args.query or ["你好", "Tell me a short story about a young founder."]:
        response, history = chat.chat(query, history, system=args.system)
        print(f"user: {query}\nassistant: {response}")


if __name__ == "__main__":
    main()
