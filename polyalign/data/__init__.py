"""Datasets as plain records: prompt sets for online RL, preference pairs, and the shipped sentiment
sentences (`sentiment.py`). Records in, tensors out; nothing here knows about trainers or losses."""
