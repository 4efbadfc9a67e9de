"""Training: the synthetic-scene data, the four Kandinsky 2.2 components and the recipe.

* :mod:`serve.training.data` — procedural captioned scenes (English and Russian).
* :mod:`serve.training.clip`, :mod:`~serve.training.movq`, :mod:`~serve.training.prior`,
  :mod:`~serve.training.decoder` — one component each: build, loss, plain torch loop.
* :mod:`serve.training.recipe` — all four in order, from one seed.
* :mod:`serve.training.distributed` — the prior loop on a Ray cluster (Ray Train, DDP).
"""
