"""Retrieval on embeddings as numpy arrays: exact search, mAP and Recall@k in memory or over shards, and the
evaluation protocol of an upgrade sequence (the named tests, the compatibility matrix, partial refresh). No Ray; torch
only as the search's sgemm."""
