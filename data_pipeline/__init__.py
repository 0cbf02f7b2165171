"""Offline text corpora, tokenizers and resumable packed batches for pretraining."""
