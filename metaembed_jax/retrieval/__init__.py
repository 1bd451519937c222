"""Retrieval: the multi-vector index (its storage, placement and search kernels are private
modules here), the corpus reader, the encoder, the retriever and the Qdrant index."""
