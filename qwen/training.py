"""Finetuning Qwen-1 checkpoints on ``transformers.Trainer``: full, LoRA and Q-LoRA, with
DeepSpeed ZeRO-2/3 or plain DDP; and merging a LoRA adapter into a standalone checkpoint.

``finetune.py`` is the command line (:func:`main`); docs/finetune.md the guide. The data
(formats, labels, batching) is :mod:`qwen.finetune_data`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from .finetune_data import (
    LOSS_MODES,
    DataCollator,
    SupervisedDataset,
    load_conversations,
    render_labels,
)
from .qwen_generation_utils import DEFAULT_SYSTEM

logger = logging.getLogger(__name__)

# The original recipe's LoRA targets: the attention's qkv and output products, the MLP's
# two input products (and, through "c_proj", its output product).
LORA_TARGETS = ["c_attn", "c_proj", "w1", "w2"]
# Trained in full with LoRA on a base (chat_format "raw") checkpoint: base models never
# saw the ChatML tokens, their embeddings must learn them.
BASE_MODEL_MODULES_TO_SAVE = ["wte", "lm_head"]
# What a model finetuned on ChatML data generates with (the -Chat models' settings).
CHATML_GENERATION = {"chat_format": "chatml", "max_window_size": 6144, "stop_words_ids": None}


@dataclasses.dataclass
class ModelArguments:
    model_name_or_path: str = dataclasses.field(
        default="Qwen/Qwen-7B",
        metadata={"help": "The checkpoint to finetune: a directory in the official layout or a Hub name."},
    )


@dataclasses.dataclass
class DataArguments:
    data_path: str = dataclasses.field(
        default=None,
        metadata={
            "help": 'Training data: a JSON list or JSON Lines of {"id", "conversations": [{"from": '
            '"user"|"assistant"|"system", "value"}]} or {"messages": [{"role", "content"}]} samples.'
        },
    )
    eval_data_path: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Evaluation data, same formats; evaluated every epoch unless --eval_strategy says otherwise."
        },
    )
    lazy_preprocess: bool = dataclasses.field(
        default=False,
        metadata={"help": "Keep only sample lengths in memory and tokenize each sample again when it is read."},
    )
    loss_on: str = dataclasses.field(
        default="original",
        metadata={
            "help": "Which tokens are trained. original: the original Qwen scheme (every <|im_start|>, "
            "<|im_end|> and the newline after it, and the assistant contents); assistant: only the "
            "assistant contents and their <|im_end|>.",
            "choices": list(LOSS_MODES),
        },
    )
    packing: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Pack several samples into each row of up to model_max_length tokens, without attention "
            "across sample boundaries (rows are then the batch items)."
        },
    )
    overlong: str = dataclasses.field(
        default="truncate",
        metadata={
            "help": "Samples longer than model_max_length: truncate (cut after the last assistant turn "
            "that fits) or drop.",
            "choices": ["truncate", "drop"],
        },
    )
    system_prompt: str = dataclasses.field(
        default=DEFAULT_SYSTEM, metadata={"help": "System prompt of samples without their own system turn."}
    )
    dry_run: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Validate and tokenize the data, print its statistics and one sample with its trained "
            "tokens marked, and exit without loading the model."
        },
    )


@dataclasses.dataclass
class LoraArguments:
    use_lora: bool = dataclasses.field(default=False, metadata={"help": "Train a LoRA adapter (peft)."})
    q_lora: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Q-LoRA (implies --use_lora): LoRA on a GPTQ checkpoint (the official -Int4/-Int8, needs "
            "optimum and gptqmodel) as stored, or on a float checkpoint quantized on the fly to 4-bit NF4 "
            "with bitsandbytes."
        },
    )
    lora_r: int = dataclasses.field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = dataclasses.field(default=16, metadata={"help": "LoRA alpha (scale alpha/r)."})
    lora_dropout: float = dataclasses.field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = dataclasses.field(
        default_factory=lambda: list(LORA_TARGETS), metadata={"help": "Module names that get LoRA adapters."}
    )
    lora_modules_to_save: list[str] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Modules trained in full beside the adapter. Default: wte and lm_head for base checkpoints "
            '(chat_format "raw" in their generation config), none for chat checkpoints.'
        },
    )
    lora_weight_path: str = dataclasses.field(
        default="", metadata={"help": "An adapter to continue training from (a directory saved by this script)."}
    )
    lora_bias: str = dataclasses.field(
        default="none",
        metadata={"help": "Train biases: none, all or lora_only.", "choices": ["none", "all", "lora_only"]},
    )


@dataclasses.dataclass
class FinetuneTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the original script's additions and defaults."""

    cache_dir: str | None = dataclasses.field(default=None, metadata={"help": "Hub download cache."})
    optim: str = dataclasses.field(default="adamw_torch", metadata={"help": "Optimizer (Trainer's names)."})
    model_max_length: int = dataclasses.field(
        default=8192,
        metadata={"help": "Longest sample (or packed row) in tokens; longer samples are truncated or dropped."},
    )


def build_parser():
    """The argument parser of ``finetune.py``: the model, data and LoRA arguments above and
    every ``transformers.TrainingArguments`` option."""
    from transformers import HfArgumentParser

    return HfArgumentParser((ModelArguments, DataArguments, FinetuneTrainingArguments, LoraArguments))


# --------------------------------------------------------------------------- set-up


def _setup_cpu_distributed() -> None:
    """Several CPU processes under torchrun with DeepSpeed: the process group on gloo and
    accelerate told to use DeepSpeed before ``TrainingArguments`` is built (else it sees
    one process). No effect on CUDA machines or single processes."""
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if "--deepspeed" in sys.argv or any(a.startswith("--deepspeed=") for a in sys.argv):
        os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
    from accelerate import PartialState

    PartialState(backend="gloo")


def parse_args(argv: list[str] | None = None):
    """``(model_args, data_args, training_args, lora_args)`` from the command line."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    cpu_multi = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if cpu_multi:
        _setup_cpu_distributed()
        if not any(a.startswith("--accelerator_config") for a in argv):
            argv += ["--accelerator_config", '{"use_configured_state": true}']
    model_args, data_args, training_args, lora_args = parser.parse_args_into_dataclasses(args=argv)
    if lora_args.q_lora:
        lora_args.use_lora = True
    if data_args.data_path is None:
        raise ValueError("--data_path is required")
    return model_args, data_args, training_args, lora_args


def load_tokenizer(model_name_or_path: str, model_max_length: int, cache_dir: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_name_or_path, cache_dir=cache_dir, model_max_length=model_max_length, padding_side="right"
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eod_id
    return tokenizer


def load_data(data_args: DataArguments) -> tuple[list, list | None]:
    """Read and validate the training and evaluation data (every sample, before the
    tokenizer or the model load). Raises :class:`~qwen.finetune_data.DataError` on
    malformed samples."""
    train = load_conversations(data_args.data_path)
    evaluation = load_conversations(data_args.eval_data_path) if data_args.eval_data_path else None
    return train, evaluation


def make_datasets(data_args: DataArguments, tokenizer, max_len: int, conversations=None):
    """The encoded training and evaluation datasets (``conversations``: from :func:`load_data`)."""
    train_conversations, eval_conversations = conversations or load_data(data_args)
    common = dict(
        system=data_args.system_prompt,
        loss_on=data_args.loss_on,
        overlong=data_args.overlong,
        lazy=data_args.lazy_preprocess,
        packing=data_args.packing,
    )
    train = SupervisedDataset(train_conversations, tokenizer, max_len, name=data_args.data_path, **common)
    evaluation = None
    if eval_conversations is not None:
        evaluation = SupervisedDataset(eval_conversations, tokenizer, max_len, name=data_args.eval_data_path, **common)
    return train, evaluation


def describe_data(dataset: SupervisedDataset, tokenizer, color: bool = False) -> str:
    """Statistics of a dataset and its first sample with the trained tokens marked."""
    stats = dataset.stats()
    ids, labels = dataset.encoded(0)
    lines = [json.dumps(stats), "", f"sample 0 (id {dataset.conversations[0].id!r}); trained tokens marked "]
    lines[-1] += "in green" if color else "as [[...]]"
    lines += [render_labels(ids, labels, tokenizer, color=color)]
    return "\n".join(lines)


def chat_format_of(model_name_or_path: str, cache_dir: str | None = None) -> str:
    """The checkpoint's ``chat_format`` from its generation config ("raw" for the base
    models, "chatml" for the -Chat ones); "raw" where it has no generation config."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model_name_or_path, cache_dir=cache_dir)
    except OSError:
        logger.warning("%s has no generation_config.json: treated as a base checkpoint", model_name_or_path)
        return "raw"
    return getattr(config, "chat_format", "raw")


def _dtype(training_args) -> torch.dtype:
    return torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32


def _qlora_quantization(model_name_or_path: str, training_args, dtype: torch.dtype):
    """The ``quantization_config`` Q-LoRA loads the checkpoint with: a GPTQ checkpoint (the
    official -Int4/-Int8) as stored, through gptqmodel's kernels that support training
    (peft wraps them in ``GPTQLoraLinear``); a float checkpoint quantized on the fly to NF4
    by bitsandbytes."""
    from transformers import AutoConfig, BitsAndBytesConfig

    config = AutoConfig.from_pretrained(model_name_or_path, cache_dir=training_args.cache_dir)
    stored = getattr(config, "quantization_config", None)
    if stored is not None:
        stored = stored if isinstance(stored, dict) else stored.to_dict()
        method = stored.get("quant_method")
        if method != "gptq":
            raise ValueError(
                f"{model_name_or_path} is quantized with {method!r}; Q-LoRA takes a GPTQ checkpoint (the official "
                "-Int4/-Int8) or a float one (quantized to NF4 on the fly)"
            )
        if importlib.util.find_spec("gptqmodel") is None or importlib.util.find_spec("optimum") is None:
            raise ImportError(
                f"{model_name_or_path} is a GPTQ checkpoint: Q-LoRA on it needs optimum and gptqmodel "
                '(pip install -e ".[gptq]" in a checkout)'
            )
        from transformers import GPTQConfig

        # "auto_trainable": gptqmodel's fastest kernel with a backward pass (on CPU its torch kernels)
        return GPTQConfig(bits=stored["bits"], backend="auto_trainable")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def load_model(model_args: ModelArguments, training_args, lora_args: LoraArguments, base_model: bool):
    """The model to train: the checkpoint in the training dtype, or quantized for Q-LoRA
    (GPTQ as stored, else NF4), wrapped in a LoRA adapter when asked."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    dtype = _dtype(training_args)
    kwargs: dict[str, Any] = {"dtype": dtype, "cache_dir": training_args.cache_dir}
    if lora_args.q_lora:
        if is_deepspeed_zero3_enabled():
            raise ValueError("Q-LoRA does not work with ZeRO-3; use finetune/ds_config_zero2.json")
        kwargs["quantization_config"] = _qlora_quantization(model_args.model_name_or_path, training_args, dtype)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK") or 0)}
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    model.config.use_cache = False
    if not lora_args.use_lora:
        return model

    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if lora_args.q_lora:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=training_args.gradient_checkpointing,
            gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs,
        )
    modules_to_save = lora_args.lora_modules_to_save
    if modules_to_save is None:
        modules_to_save = list(BASE_MODEL_MODULES_TO_SAVE) if base_model else None
    if lora_args.lora_weight_path:
        model = PeftModel.from_pretrained(model, lora_args.lora_weight_path, is_trainable=True)
    else:
        config = LoraConfig(
            r=lora_args.lora_r,
            lora_alpha=lora_args.lora_alpha,
            target_modules=lora_args.lora_target_modules,
            lora_dropout=lora_args.lora_dropout,
            bias=lora_args.lora_bias,
            modules_to_save=modules_to_save,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA: %d of %d parameters trainable (%.2f%%)", trainable, total, 100 * trainable / total)
    return model


def _trainer_class():
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class FinetuneTrainer(Trainer):
        """``Trainer`` whose length grouping reads the dataset's known lengths (no pass
        over the data to measure them)."""

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
                return LengthGroupedSampler(
                    self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=dataset.lengths
                )
            return super()._get_train_sampler(train_dataset)

    return FinetuneTrainer


def finish_checkpoint(out_dir: str | Path, tokenizer, chat_generation: bool) -> None:
    """Make a saved full model an official-layout checkpoint: tokenizer files, the remote
    code and its ``auto_map``, and (``chat_generation``) a ChatML generation config."""
    from transformers import GenerationConfig

    from .remote_code import write_remote_code

    out = Path(out_dir)
    tokenizer.save_pretrained(out)
    if chat_generation:
        _chatml_generation_config(out)
    if (out / "config.json").is_file():
        write_remote_code(out, backup=False)
    GenerationConfig.from_pretrained(out)  # it must read back


def _chatml_generation_config(out: Path) -> None:
    path = out / "generation_config.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for key, value in CHATML_GENERATION.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def train(model_args, data_args, training_args, lora_args) -> Path | None:
    """Validate the data, load the model, train, save. Returns the output directory (None
    after a dry run)."""
    from transformers.trainer_utils import IntervalStrategy, get_last_checkpoint

    conversations = load_data(data_args)  # malformed data stops here, before anything loads
    tokenizer = load_tokenizer(model_args.model_name_or_path, training_args.model_max_length, training_args.cache_dir)
    train_data, eval_data = make_datasets(data_args, tokenizer, training_args.model_max_length, conversations)
    if data_args.dry_run:
        print(describe_data(train_data, tokenizer, color=sys.stdout.isatty()))
        if eval_data is not None:
            print(json.dumps({"eval": eval_data.stats()}))
        return None
    if eval_data is not None and training_args.eval_strategy == IntervalStrategy.NO:
        training_args.eval_strategy = IntervalStrategy.EPOCH
    if training_args.gradient_checkpointing and training_args.gradient_checkpointing_kwargs is None:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    base_model = chat_format_of(model_args.model_name_or_path, training_args.cache_dir) == "raw"
    model = load_model(model_args, training_args, lora_args, base_model)
    trainer = _trainer_class()(
        model=model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=DataCollator(pad_token_id=tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = get_last_checkpoint(training_args.output_dir)
        if resume is None:
            raise ValueError(
                f"--resume_from_checkpoint {training_args.resume_from_checkpoint}: no checkpoint in "
                f"{training_args.output_dir}"
            )
    trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    if training_args.should_save:
        out = Path(training_args.output_dir)
        if lora_args.use_lora:
            tokenizer.save_pretrained(out)
            model.generation_config.save_pretrained(out)
            if base_model:
                _chatml_generation_config(out)
        else:
            finish_checkpoint(out, tokenizer, chat_generation=base_model)
        logger.info("saved %s to %s", "the adapter" if lora_args.use_lora else "the model", out)
    return Path(training_args.output_dir)


def main(argv: list[str] | None = None) -> int:
    """``finetune.py``: parse the arguments, train; malformed data is reported (exit status 2)."""
    from .finetune_data import DataError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        train(*parse_args(argv))
    except (DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------- merge-lora


def merge_lora(adapter_dir: str | Path, out_dir: str | Path, dtype: str = "auto", base: str | None = None) -> Path:
    """Merge a LoRA adapter into its base model and write a standalone checkpoint in the
    official layout (weights, config, generation config, tokenizer files, remote code).

    ``base`` overrides the adapter's ``base_model_name_or_path``; ``dtype`` ("auto": the
    base checkpoint's stored dtype, or bf16/fp16/fp32) is that of the written weights.
    """
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    adapter = Path(adapter_dir)
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter} has no adapter_config.json; is it a LoRA adapter directory?")
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    base = base or adapter_config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_path} names no base_model_name_or_path; pass the base checkpoint")
    torch_dtype = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    out = Path(out_dir)
    if out.resolve() == adapter.resolve():
        raise ValueError("the merged checkpoint must go to another directory than the adapter")
    if getattr(AutoConfig.from_pretrained(base), "quantization_config", None) is not None:
        raise ValueError(
            f"the base {base} is quantized (Q-LoRA): LoRA weights cannot be merged into quantized weights; "
            "merge into the float checkpoint it was quantized from (--base PATH)"
        )
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if (adapter / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(adapter).save_pretrained(out)
    tokenizer_source = adapter if (adapter / "qwen.tiktoken").is_file() else base
    finish_checkpoint(out, load_tokenizer(str(tokenizer_source), 8192), chat_generation=False)
    return out
