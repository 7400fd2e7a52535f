"""Generation: the generator (seq2seq or causal), RAG-sequence and RAG-token marginals, and decoding. Nothing here
knows the index."""
