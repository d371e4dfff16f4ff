"""Kiln data: raw sources (:mod:`.sources`), offline tokenize/pack/shard (:mod:`.prepare`), and
memory-mapped packed datasets with a stateless mixture sampler (:mod:`.dataset`).

Submodules are imported explicitly (``from trainer.data.dataset import open_train_data``) so
that importing one does not pull in the dependencies of the others.
"""
