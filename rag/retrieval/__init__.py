"""Retrieval: BERT_d and BERT_q (encoders), the index folder and its dense (FAISS) and BM25 parts, fusion, the
retriever. Nothing here knows the generator."""
