"""What a run did and how good its result is: the JSON and HTML report (``build``),
its figures (``plots``), a checkpoint's per-layer summary (``summary``) and
perplexity, KL and zero-shot evaluation (``evaluation``).
"""
