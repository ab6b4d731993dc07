"""Training data: the embedded byte-level corpus, user token files, and batch loaders.

``embedded_corpus`` and ``load_tokens`` (``corpus.py``) produce 1-D token arrays;
``BatchLoader``, ``eval_batches`` and ``unigram_entropy`` (``loader.py``) turn them into
deterministic, resumable batches and a baseline loss.
"""

from jds.data.corpus import embedded_corpus, load_tokens
from jds.data.loader import BatchLoader, eval_batches, unigram_entropy

__all__ = ["BatchLoader", "embedded_corpus", "eval_batches", "load_tokens", "unigram_entropy"]
