"""The demo model: a tiny Stable Diffusion 3 pipeline trained from scratch on procedural shapes.

- :mod:`.dataset`: the seeded shapes dataset, its captions and the held-out combinations (numpy + PIL);
- :mod:`.analyser`: a deterministic reader of an image's attributes and the accuracy score (numpy);
- :mod:`.evaluate`: the fixed evaluation prompts and their scoring (numpy + PIL), plus a diffusers generator;
- :mod:`.train`: the training script (torch, diffusers, transformers); ``pipeline/`` holds its output.

Only :mod:`.train` and :func:`.evaluate.generate_diffusers` / :func:`.evaluate.load_diffusers` need torch,
and they import it when called.
"""
