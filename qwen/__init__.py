"""qwen: the maintained home of the first-generation Qwen models.

Importing the package registers the Qwen-1 config, models and tokenizer with the
``transformers`` Auto classes for ``model_type: "qwen"``, so official checkpoint
directories load without ``trust_remote_code``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .configuration_qwen import QWenConfig
from .modeling_qwen import QWenLMHeadModel, QWenModel, QWenPreTrainedModel
from .tokenization_qwen import QWenTokenizer

__version__ = "0.1.0"

AutoConfig.register("qwen", QWenConfig, exist_ok=True)
AutoModel.register(QWenConfig, QWenModel, exist_ok=True)
AutoModelForCausalLM.register(QWenConfig, QWenLMHeadModel, exist_ok=True)
AutoTokenizer.register(QWenConfig, slow_tokenizer_class=QWenTokenizer, exist_ok=True)

__all__ = [
    "QWenConfig",
    "QWenLMHeadModel",
    "QWenModel",
    "QWenPreTrainedModel",
    "QWenTokenizer",
    "__version__",
]
