"""Everything between raw text and training batches, in pipeline order:
sources.py -> clean.py -> dedup.py -> decontam.py -> prepare.py (shards.py) -> dataset.py"""
