"""The language models the image prefix feeds: OPT and LLaMA (decoder-only), Flan-T5 (encoder-decoder)."""
