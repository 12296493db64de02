"""`--train-tokenizer`: a byte-level BPE trained on the run's own text, so fresh models need no hub.

Byte-level (GPT-2 style): every string is encodable, nothing maps to an unknown token. The result
is a `transformers.PreTrainedTokenizerFast` with distinct BOS, EOS and padding tokens, saved with
the model like any other tokenizer (`tokenizer.json`, `tokenizer_config.json`), so
`AutoTokenizer.from_pretrained` reads it back.
"""

from __future__ import annotations

from typing import Iterable

from dyn.core.errors import UsageError

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
DEFAULT_VOCAB_SIZE = 4096
# 256 byte symbols and the special tokens are always in the vocabulary.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, model_max_length: int = 1024):
    """Train a byte-level BPE on `texts`; returns a PreTrainedTokenizerFast (BOS/EOS/PAD set).

    Training is deterministic for the same texts and vocabulary size. The vocabulary may come out
    smaller than `vocab_size` when the text has fewer distinct merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise UsageError(f"--vocab-size {vocab_size}: must be at least {MIN_VOCAB_SIZE} (256 bytes + special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tokenizer, model_max_length)


def wrap_tokenizer(tokenizer, model_max_length: int = 1024):
    """A `tokenizers.Tokenizer` (or its JSON string) as a PreTrainedTokenizerFast with dyn's special tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, str):
        tokenizer = Tokenizer.from_str(tokenizer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def tokenizer_json(tokenizer) -> str:
    """The serialised fast tokenizer, to hand it to other processes."""
    return tokenizer.backend_tokenizer.to_str()
