"""Data: corpora, the SentencePiece tokenizer, packing, ArrayRecord storage and the grain input pipeline."""
