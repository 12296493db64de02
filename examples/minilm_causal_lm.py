"""MiniLM-L6 (dyn's bundled embedding model, a 6-layer BERT encoder) saved as a causal LM
(`BertLMHeadModel` with `is_decoder=True`: causal attention, an output layer tied to the token
embeddings, its transform freshly initialised), with its tokenizer, so `dyn train --model FOLDER`
can warm it up. The one pretrained network on an offline machine; docs/benchmarks.md (grad) shows
it is no question-conditioned LM after a short warm-up.

    python examples/minilm_causal_lm.py minilm-lm/
"""

from __future__ import annotations

import sys


def main(folder: str) -> None:
    from transformers import AutoTokenizer, BertConfig, BertLMHeadModel

    from dyn.core.embeddings import bundled_model_path

    source = bundled_model_path()
    config = BertConfig.from_pretrained(source)
    config.is_decoder, config.architectures = True, ["BertLMHeadModel"]
    BertLMHeadModel.from_pretrained(source, config=config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    print(f"wrote {folder}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "minilm-lm")
