"""QWenConfig rules that no checkpoint test reaches (found by scripts/mutation.py)."""

from __future__ import annotations

import pytest

from qwen.configuration_qwen import QWenConfig


def test_legacy_padded_vocab_size_wins_over_vocab_size():
    """The first release's ``padded_vocab_size`` is the embedding's real row count: it
    wins over a differing ``vocab_size`` instead of being an error (other legacy keys
    that disagree with their current name are)."""
    assert QWenConfig(padded_vocab_size=151936, vocab_size=151851).vocab_size == 151936
    with pytest.raises(ValueError, match="n_embd.*hidden_size"):
        QWenConfig(n_embd=64, hidden_size=128)


@pytest.mark.parametrize("rotary_pct", [0.5625, 0.0625])  # 16 channels: 9 and 1 rotate
def test_odd_or_empty_rotary_width_is_refused(rotary_pct):
    """RoPE rotates channel pairs: kv_channels * rotary_pct must be even and non-zero."""
    with pytest.raises(ValueError, match="rotary width"):
        QWenConfig(hidden_size=64, num_attention_heads=4, rotary_pct=rotary_pct)
    assert QWenConfig(hidden_size=64, num_attention_heads=4, rotary_pct=0.5).rotary_pct == 0.5


def test_untied_by_default():
    """Qwen-1 has a separate lm_head: a config.json without tie_word_embeddings (the
    first release's) must not tie it to the embedding."""
    from qwen import QWenLMHeadModel

    config = QWenConfig(
        vocab_size=1000, hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64
    )
    assert config.tie_word_embeddings is False
    model = QWenLMHeadModel(config)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
